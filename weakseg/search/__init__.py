"""Hyperparameter search: Ray Tune + Optuna, with a search's MLflow runs. The only package that imports Ray
(besides `weakseg.cluster` and `weakseg.compat`); MLflow through `weakseg.tracking`."""
