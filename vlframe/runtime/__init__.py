"""The process a model runs in: torchrun process groups, numeric precision, per-block compile and checkpointing."""
