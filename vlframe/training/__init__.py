"""Training: the loop, and the parts it composes (session, checkpointer, state, validation, optimiser, schedule)."""
