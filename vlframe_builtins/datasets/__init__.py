"""Built-in image-text datasets."""
