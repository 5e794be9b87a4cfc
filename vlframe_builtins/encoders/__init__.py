"""Built-in image encoders."""
