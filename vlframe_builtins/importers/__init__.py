"""Checkpoint importers: other frameworks' weights into vlframe models."""
