"""MLflow as a platform service for `weakseg train`, `evaluate` and `search`: the one package that imports
mlflow (besides `weakseg.compat`). `client`: talking to a store; `runs`: the tags every run carries and the
train and evaluate runs; `models`: checkpoints as MLflow models. A search's own runs: `weakseg.search.tracking`."""
