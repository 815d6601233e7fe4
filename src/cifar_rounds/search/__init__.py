"""The search for round N+1: sweep files, the Optuna driver over DVC's queue, the train stage's trial, the report."""
