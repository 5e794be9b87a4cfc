"""vlframe's built-in components. Each module registers what it defines through the ``vlframe``
entry-point group, exactly as a third-party package would (see pyproject.toml)."""
