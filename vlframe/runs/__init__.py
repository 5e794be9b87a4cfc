"""Runs and their record: the run folder, checkpoints, and MLflow tracking through a journal."""
