"""Built-in model builders."""
