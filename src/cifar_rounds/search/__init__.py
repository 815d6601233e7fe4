"""The search for round N+1: sweep files, the study, its workers on Optuna's own loop, the report, promotion."""
