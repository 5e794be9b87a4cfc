"""Configuration: the root config model, config files (YAML, extends, --set), JSON Schema."""
