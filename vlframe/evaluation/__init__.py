"""Evaluation: the task dispatcher, dataset resolution and metrics (tasks themselves are plugins)."""
