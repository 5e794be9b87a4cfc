"""Built-in tracking sinks: MLflow."""
