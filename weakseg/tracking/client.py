"""Talking to an MLflow store: a client, retries, store set-up, batched logging and a quieter console.

Nothing here knows weakseg's run layout (its tags, roles, parent and child runs): that is
`weakseg.tracking.runs` (train and evaluate runs) and `weakseg.search.tracking` (a search's runs).
Only MLflow is imported, inside the functions: importing this module imports no MLflow.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from weakseg.errors import UserError

T = TypeVar("T")


def mlflow_client(uri: str):
    """A client of the store at `uri` (the caller's one place to swap it, as tests do for an outage)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def retry(fn: Callable[[], T], what: str, attempts: int = 5) -> T:
    """Retry a tracking call: SQLite stores answer "database is locked" under concurrent trials."""
    delay = 0.2
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # MLflow raises MlflowException / requests errors / sqlalchemy errors
            if i == attempts - 1:
                raise UserError(f"MLflow: {what} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with the URI in the message, when the tracking server can't be reached."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        host = parsed.hostname or "localhost"
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as e:
            raise UserError(f"MLflow tracking URI {uri} is unreachable ({e.strerror or e}); start the server or fix "
                            "settings.mlflow.tracking_uri") from None
    elif parsed.scheme == "sqlite":
        db = Path(parsed.path[1:] if parsed.path.startswith("//") else parsed.path)
        existing = next(p for p in (db.parent, *db.parent.parents) if p.exists())
        if not os.access(existing, os.W_OK):
            raise UserError(f"MLflow tracking URI {uri}: {existing} is not writable")
    elif parsed.scheme in ("databricks",):
        pass


def make_sqlite_folder(uri: str) -> None:
    """Create the folder of a sqlite:/// store: SQLite creates the file, not its folder."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        Path(parsed.path[1:] if parsed.path.startswith("//") else parsed.path).parent.mkdir(parents=True, exist_ok=True)


def default_artifact_root(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (MLflow's default would be ./mlruns in the working directory)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(parsed.path[1:] if parsed.path.startswith("//") else parsed.path)
        return (db.parent / "mlartifacts").resolve().as_uri()
    if parsed.scheme in ("", "file"):
        return None
    return None  # a server chooses (mlflow-artifacts:/ with --serve-artifacts)


def ensure_experiment(uri: str, name: str) -> str:
    client = mlflow_client(uri)

    def get_or_create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise UserError(f"MLflow experiment {name!r} is deleted: restore it in the UI or pick another name")
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=default_artifact_root(uri))
        except Exception:  # MlflowException or the store's IntegrityError on a race; re-raised unless a race
            exp = client.get_experiment_by_name(name)  # created by someone else in between
            if exp is None:
                raise
            return exp.experiment_id

    return retry(get_or_create, f"creating experiment {name!r} at {uri}")


def _metric_batch(scalars: Mapping[str, float], step: int):
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    # NaN (e.g. the IoU of a class absent from prediction and truth) is skipped, not logged: see runs.absent_classes
    return [Metric(k, float(v), ts, step) for k, v in scalars.items() if k != "iteration" and math.isfinite(v)]


def log_metrics(client, run_id: str, scalars: Mapping[str, float], step: int) -> None:
    """Log `scalars` at `step`, in batches under MLflow's request limit (`iteration` and non-finite values skipped)."""
    batch = _metric_batch(scalars, step)
    for i in range(0, len(batch), 500):  # MLflow's per-request limit is 1000 metrics
        chunk = batch[i : i + 500]
        retry(lambda: client.log_batch(run_id, metrics=chunk), f"logging metrics to run {run_id}")


def log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    """Log `params` as strings (None as "null"), in batches under MLflow's request limit."""
    from mlflow.entities import Param

    items = [Param(k, "null" if v is None else str(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), 90):  # MLflow's per-request limit is 100 params
        chunk = items[i : i + 90]
        retry(lambda: client.log_batch(run_id, params=chunk), f"logging params to run {run_id}")


def log_files(client, run_id: str, files: Mapping[str, Path], artifact_path: str | None) -> None:
    """Upload those of `files` that exist as the run's artifacts under `artifact_path`."""
    for name, path in files.items():
        if Path(path).is_file():
            retry(lambda: client.log_artifact(run_id, str(path), artifact_path), f"uploading {name} to run {run_id}")


@contextlib.contextmanager
def quiet_mlflow(level: int = 30) -> Iterator[None]:
    """MLflow's SQLite migrations print INFO lines on first use; keep the console readable (30: WARNING)."""
    import logging

    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [l.level for l in loggers]
    for l in loggers:
        l.setLevel(level)
    try:
        yield
    finally:
        for l, lv in zip(loggers, levels):
            l.setLevel(lv)
