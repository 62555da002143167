"""The package version: one definition, read by ``pyproject.toml`` and written into every model folder."""

__version__ = "0.1.0"
