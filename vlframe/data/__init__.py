"""Data plumbing shared by training and evaluation: samples, image transforms, loaders."""
