"""The process a model runs in: torchrun process groups and numeric precision."""
