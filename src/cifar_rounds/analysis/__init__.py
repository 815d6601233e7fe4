"""Rounds and their comparison: presets, replicates, the verdict, the report, next-round proposals."""
