"""Formats in and out: other frameworks' checkpoints, WebDataset shards, derived task files."""
