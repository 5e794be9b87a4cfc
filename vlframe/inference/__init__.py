"""Using a trained model: loading a run back, generating captions."""
