"""Ray Tune searches over job configs: ``ran tune SPACE.yaml --job JOB.yaml``.

- :mod:`ran.tune.space` — space files (``tune_spaces/*.yaml``): distributions over dotted job keys,
  search settings, validation before Ray starts (imports no Ray).
- :mod:`ran.tune.search` — the search: one Ray Train run per trial, ASHA or FIFO, random or Optuna
  TPE, a parent MLflow run with nested trial runs, the best model registered.
"""
