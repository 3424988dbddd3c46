"""Config presets (YAML), loaded by muse.config; shipped as package data."""
