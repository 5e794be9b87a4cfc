"""Runs and their record: the run folder, checkpoint folders and their formats, and tracking through a journal to a sink."""
