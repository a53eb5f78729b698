"""MLflow as a platform service: the runs of `weakseg train`, `evaluate` and `search`, and their models."""
