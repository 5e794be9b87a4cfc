"""Training: the loop, the optimiser and the learning-rate schedule."""
