"""Hyperparameter search: Ray Tune + Optuna + MLflow. The only package that imports ray or mlflow."""
