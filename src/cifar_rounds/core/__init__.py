"""Foundations every layer uses: errors and the stage runner, the params schema, YAML and atomic file I/O, names."""
