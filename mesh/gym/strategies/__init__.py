"""The built-in training algorithms (registered in pyproject.toml under ``mesh.strategies``)."""
