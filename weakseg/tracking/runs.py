"""All of weakseg's MLflow calls: one experiment per search, a parent run per search, a child run per trial
(logging and loading models: `weakseg.tracking.models`).

Every MLflow call of a search happens on the driver, in a Ray Tune callback
(`weakseg.search.callbacks.MlflowCallback`): trials report to Tune only, with their metrics and a
checkpoint folder that also holds the evaluation's tables and plots. So worker
nodes never need to reach the tracking server (which can stay bound to
localhost on the head node) and a local SQLite store has a single writer.

Child runs are created with `MlflowClient` and the `mlflow.parentRunId` tag
(what `mlflow.start_run(parent_run_id=...)` writes) plus a `weakseg.trial_id`
tag, and are found again by that tag when a trial is retried or a search is
resumed: a trial never gets two runs. The driver, which alone knows whether a
trial completed, was stopped early by ASHA, diverged or failed, sets the final
status. Ray's `MLflowLoggerCallback` is not used: it creates a second run for
every trial after `Tuner.restore`.
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

TAG_SEARCH = "weakseg.search"  # on the parent: the Ray experiment path it tracks
TAG_ROLE = "weakseg.role"  # "search" | "trial" | "abandoned" | "train" | "evaluate"
TAG_TRIAL = "weakseg.trial_id"
TAG_OUTCOME = "weakseg.outcome"  # completed | stopped_early | failed | diverged
TAG_ERROR = "weakseg.error"
TAG_CHECKPOINT = "weakseg.checkpoint"  # a trial's last checkpoint; on the parent, the chosen trial's
TAG_ABSENT = "weakseg.absent_classes"  # classes with no IoU (absent from prediction and truth) at the last evaluation
TAG_DIRTY = "weakseg.git_dirty"  # "true" when the checkout had uncommitted changes
TAG_MODEL = "weakseg.model_uri"  # on a search's parent run: the registered model (models:/NAME/VERSION)
GIT_COMMIT_TAG = "mlflow.source.git.commit"
SUMMARY_KEYS = ("val/miou", "val/boundary_iou")  # logged once more per run as best/<key> and final/<key>
TAG_COLLAPSED = "weakseg.collapsed"  # an evaluation flagged val/collapsed: its iteration, image AUC, foreground
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"


def _client(uri: str):
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


def _make_sqlite_folder(uri: str) -> None:
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
    client = _client(uri)

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
    # NaN (e.g. the IoU of a class absent from prediction and truth) is skipped, not logged: see absent_classes
    return [Metric(k, float(v), ts, step) for k, v in scalars.items() if k != "iteration" and math.isfinite(v)]


def absent_classes(scalars: Mapping[str, float], prefix: str = "val") -> str:
    """The classes whose IoU is undefined (absent from prediction and truth), for the TAG_ABSENT tag."""
    head = f"{prefix}/iou/"
    return ",".join(k[len(head):] for k, v in scalars.items() if k.startswith(head) and not math.isfinite(v)) or "none"


def summary_metrics(scalars: Mapping[str, float], logged: Mapping[str, float]) -> dict[str, float]:
    """final/<key> (this evaluation) and best/<key> (the best so far, `logged` holding the run's metrics)
    of the SUMMARY_KEYS: one value per run, so that the runs table can sort by them."""
    out = {}
    for key in SUMMARY_KEYS:
        v = scalars.get(key)
        if v is None or not math.isfinite(v):
            continue
        out[f"final/{key}"] = float(v)
        out[f"best/{key}"] = max(float(v), logged.get(f"best/{key}", -math.inf))
    return out


def _log_metrics(client, run_id: str, scalars: Mapping[str, float], step: int) -> None:
    batch = _metric_batch(scalars, step)
    for i in range(0, len(batch), 500):  # MLflow's per-request limit is 1000 metrics
        chunk = batch[i : i + 500]
        retry(lambda: client.log_batch(run_id, metrics=chunk), f"logging metrics to run {run_id}")


def _log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, "null" if v is None else str(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), 90):  # MLflow's per-request limit is 100 params
        chunk = items[i : i + 90]
        retry(lambda: client.log_batch(run_id, params=chunk), f"logging params to run {run_id}")


def _log_files(client, run_id: str, files: Mapping[str, Path], artifact_path: str | None) -> None:
    for name, path in files.items():
        if Path(path).is_file():
            retry(lambda: client.log_artifact(run_id, str(path), artifact_path), f"uploading {name} to run {run_id}")


# ------------------------------------------------------------------- lineage


def git_state() -> tuple[str, bool] | None:
    """(commit, dirty) of the checkout weakseg runs from; None for an installed package."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip(), bool(status.stdout.strip())


def lineage_tags() -> dict[str, str]:
    """Tags every weakseg run carries: the code it ran (version, git commit and whether it was dirty)."""
    import weakseg

    tags = {"weakseg.version": weakseg.__version__, "mlflow.source.name": "weakseg"}
    state = git_state()
    if state is not None:
        tags[GIT_COMMIT_TAG], tags[TAG_DIRTY] = state[0], "true" if state[1] else "false"
    return tags


def log_dataset(client, run_id: str, fp: Any, context: str = "training") -> None:
    """The data set as an MLflow dataset input (`fp`: a weakseg.data.fingerprint.DataFingerprint)."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(name=fp.name, digest=fp.digest, source_type="local", source=json.dumps({"uri": fp.source}),
                 profile=json.dumps({"images": fp.images}))
    retry(lambda: client.log_inputs(run_id, datasets=[DatasetInput(ds, [InputTag("mlflow.data.context", context)])]),
          f"logging the data set of run {run_id}")


def start_system_metrics(uri: str, run_id: str, resume: bool = False):
    """MLflow's sampler of this node's CPU, memory, disk, network (and GPU with nvidia-ml-py) for a run;
    None when psutil is missing. Stop it with `.finish()`."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return None
    import logging

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=uri)
    monitor.start()
    return monitor


def finish_system_metrics(monitor) -> None:
    """Stop the sampler and log the samples it holds since its last publish.

    MLflow's sampler logs once per interval (10 s) and drops the samples of the interval in which it is
    stopped, so a run shorter than one interval would get no system metrics at all."""
    monitor.finish()  # joins the sampler thread: what follows cannot race it
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:  # noqa: BLE001 -- system metrics are a nicety; never fail a run's close for them
        print(f"MLflow: the last system metrics were not logged: {e}", flush=True)


# ------------------------------------------------------------------- parent (driver)


class SearchRun:
    """The parent run of a search, created on the driver; found again on resume."""

    def __init__(self, uri: str, experiment: str, search_key: str):
        self.uri, self.experiment_name, self.search_key = uri, experiment, search_key
        self.experiment_id = ""
        self.run_id = ""
        self.monitor = None  # MLflow's system metrics of the driver's node, on the parent run

    def __getstate__(self) -> dict[str, Any]:
        """Ray pickles the callback holding this with the experiment state: not the sampler thread."""
        return {**self.__dict__, "monitor": None}

    def start(self, resume: bool, params: Mapping[str, Any], space_file: Path, code_version: str,
              data: Any = None) -> str:
        """Create (or, resuming, reopen) the parent run; `data`: the base config's DataFingerprint."""
        self.run_id = self._start(resume, params, space_file, code_version)
        client = _client(self.uri)
        for k, v in lineage_tags().items():
            retry(lambda: client.set_tag(self.run_id, k, v), "tagging the search run")
        if data is not None:
            log_dataset(client, self.run_id, data)
        self.monitor = start_system_metrics(self.uri, self.run_id, resume=resume)
        return self.run_id

    def _start(self, resume: bool, params: Mapping[str, Any], space_file: Path, code_version: str) -> str:
        check_reachable(self.uri)
        _make_sqlite_folder(self.uri)
        client = _client(self.uri)
        self.experiment_id = ensure_experiment(self.uri, self.experiment_name)
        found = self._find_parent(client)
        if found is not None and resume:
            self.run_id = found
            retry(lambda: client.update_run(found, status="RUNNING"), "reopening the search run")
            return self.run_id
        run = retry(
            lambda: client.create_run(
                self.experiment_id,
                tags={TAG_SEARCH: self.search_key, TAG_ROLE: "search", "weakseg.code_version": code_version},
                run_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
            ),
            "creating the search run",
        )
        self.run_id = run.info.run_id
        _log_params(client, self.run_id, params)
        _log_files(client, self.run_id, {"space": space_file}, None)
        return self.run_id

    def _find_parent(self, client) -> str | None:
        key = self.search_key.replace("'", "\\'")
        runs = retry(
            lambda: client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{TAG_SEARCH}` = '{key}' and tags.`{TAG_ROLE}` = 'search'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            ),
            "looking up the search run",
        )
        return runs[0].info.run_id if runs else None

    def retire_previous(self) -> str | None:
        """Before a --restart: close the old search's parent and trial runs that are still RUNNING
        (a driver killed mid-search leaves them so) as KILLED, and move their checkpoint tags,
        which name deleted checkpoints, to `weakseg.checkpoint_deleted`. Returns the old parent's id."""
        client = _client(self.uri)
        self.experiment_id = ensure_experiment(self.uri, self.experiment_name)
        old = self._find_parent(client)
        if old is None:
            return None
        runs = retry(lambda: client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{old}'"),
                     "listing the previous search's trial runs")
        for run in [*runs, client.get_run(old)]:
            rid = run.info.run_id
            location = run.data.tags.get(TAG_CHECKPOINT)
            if location:
                retry(lambda: client.set_tag(rid, TAG_CHECKPOINT + "_deleted", location), "retagging a run")
                retry(lambda: client.delete_tag(rid, TAG_CHECKPOINT), "retagging a run")
            if run.info.status == "RUNNING":
                retry(lambda: client.set_tag(rid, TAG_OUTCOME, "restarted"), "tagging a run")
                retry(lambda: client.set_terminated(rid, status="KILLED"), "closing a run of the previous search")
        return old

    def tag(self, key: str, value: str) -> None:
        """Set a tag on the search run (e.g. how it ended, what --resume changed)."""
        client = _client(self.uri)
        retry(lambda: client.set_tag(self.run_id, key, value[:5000]), "tagging the search run")

    def children(self) -> dict[str, Any]:
        """trial id -> child run (one per trial, by construction)."""
        client = _client(self.uri)
        runs = retry(
            lambda: client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}'"),
            "listing trial runs",
        )
        return {r.data.tags.get(TAG_TRIAL, r.info.run_id): r for r in runs}

    def finish(self, status: str, metrics: Mapping[str, float], files: Mapping[str, Path]) -> None:
        if self.monitor is not None:
            finish_system_metrics(self.monitor)
            self.monitor = None
        client = _client(self.uri)
        if metrics:
            _log_metrics(client, self.run_id, metrics, step=0)
        _log_files(client, self.run_id, files, "summary")
        retry(lambda: client.set_terminated(self.run_id, status=status), "closing the search run")

    def _runs_of_trial(self, client, trial_id: str) -> list:
        return retry(
            lambda: client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'",
            ),
            f"looking up the run of trial {trial_id}",
        )

    def child(self, trial_id: str, trial_name: str) -> str:
        """The run of one trial, created on first sight and found again by its tag ever after."""
        client = _client(self.uri)
        runs = self._runs_of_trial(client, trial_id)
        if runs:
            return runs[0].info.run_id
        run = retry(
            lambda: client.create_run(
                self.experiment_id,
                tags={PARENT_TAG: self.run_id, TAG_TRIAL: trial_id, TAG_ROLE: "trial", **lineage_tags()},
                run_name=trial_name,
            ),
            f"creating the run of trial {trial_id}",
        )
        return run.info.run_id

    def tag_checkpoints(self, by_trial: Mapping[str, str], best: str | None) -> None:
        """Record each trial's last checkpoint, and the chosen trial's on the parent (`export-voc --mlflow-run`)."""
        client = _client(self.uri)
        for trial_id, run in self.children().items():
            if trial_id in by_trial:
                retry(lambda: client.set_tag(run.info.run_id, TAG_CHECKPOINT, by_trial[trial_id]), "tagging a run")
        if best:
            retry(lambda: client.set_tag(self.run_id, TAG_CHECKPOINT, best), "tagging the search run")

    def log_model(self, trial_id: str, checkpoint: Path, location: str, register_as: str) -> str:
        """Log the selected trial's checkpoint as the model of its run, register it as `register_as`
        (tagged with the search, its parent run and the trial) and note it on the parent run."""
        from weakseg.tracking.models import log_checkpoint_model

        run = self.children()[trial_id]
        tags = {TAG_SEARCH: self.search_key, "weakseg.search_run_id": self.run_id, TAG_TRIAL: trial_id,
                "weakseg.trial_run_id": run.info.run_id, TAG_CHECKPOINT: location}
        uri = log_checkpoint_model(self.uri, run.info.run_id, checkpoint, register_as, tags,
                                   f"The selected trial ({trial_id}, run {run.info.run_name}) of the search "
                                   f"{self.search_key}: checkpoint {location}")
        retry(lambda: _client(self.uri).set_tag(self.run_id, TAG_MODEL, uri), "tagging the search run")
        return uri

    def close_child(self, trial_id: str, status: str, outcome: str, error: str | None = None,
                    role: str | None = None) -> None:
        """Set a trial run's final status (driver side); `role` re-tags it (e.g. "abandoned": not a trial)."""
        client = _client(self.uri)
        for r in self._runs_of_trial(client, trial_id):
            retry(lambda: client.set_tag(r.info.run_id, TAG_OUTCOME, outcome), "tagging a trial run")
            if role:
                retry(lambda: client.set_tag(r.info.run_id, TAG_ROLE, role), "tagging a trial run")
            if error:
                retry(lambda: client.set_tag(r.info.run_id, TAG_ERROR, error[:4000]), "tagging a trial run")
            retry(lambda: client.set_terminated(r.info.run_id, status=status), "closing a trial run")


def checkpoint_of_run(uri: str, run_id: str) -> str:
    """The checkpoint recorded on an MLflow run: a trial's last, or the chosen trial's last on a search's parent run."""
    check_reachable(uri)
    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:  # MlflowException (no such run) or the store's own error: one line for the user
        raise UserError(f"--mlflow-run {run_id}: no such run at {uri} ({str(e).splitlines()[0]})") from None
    location = run.data.tags.get(TAG_CHECKPOINT)
    if not location:
        raise UserError(f"--mlflow-run {run_id}: the run has no {TAG_CHECKPOINT} tag (not a finished weakseg search)")
    return location


# ------------------------------------------------------------------ `weakseg train`


class TrainRunReporter:
    """MLflow logging for a single `weakseg train` run (tracking.uri / tracking.experiment set).

    The run's id is kept in RUN_DIR/mlflow_run_id, so `--resume` continues the same MLflow run
    (metrics carry on at their iterations) instead of starting a second one.
    """

    RUN_ID_FILE = "mlflow_run_id"

    def __init__(self, cfg, run_dir: Path, inner=None, resume: bool = False):
        uri = cfg.tracking.uri or f"sqlite:///{(Path(run_dir).parent / 'mlflow.db').resolve()}"
        check_reachable(uri)
        _make_sqlite_folder(uri)
        self.inner = inner
        self.client = _client(uri)
        self.run_dir = Path(run_dir)
        exp_name = cfg.tracking.experiment or cfg.name
        exp_id = ensure_experiment(uri, exp_name)
        id_file = self.run_dir / self.RUN_ID_FILE
        previous = self._previous_run(id_file, exp_id) if resume else None
        if previous is not None:
            self.run_id = previous.info.run_id
            retry(lambda: self.client.update_run(self.run_id, status="RUNNING"), "reopening the training run")
            logged = previous.data.params
            flat = {k: "null" if v is None else str(v) for k, v in cfg.flat().items()}
            _log_params(self.client, self.run_id, {k: v for k, v in flat.items() if k not in logged})
            for k, v in flat.items():  # MLflow params are immutable: record what --resume changed as tags
                if k in logged and logged[k] != v:
                    retry(lambda: self.client.set_tag(self.run_id, f"resumed.{k}", v), "tagging the training run")
            what = "continuing"
        else:
            run = retry(
                lambda: self.client.create_run(exp_id, tags={TAG_ROLE: "train", **lineage_tags()},
                                               run_name=self.run_dir.name),
                "creating the training run",
            )
            self.run_id = run.info.run_id
            _log_params(self.client, self.run_id, cfg.flat())
            from weakseg.io import atomic_write_text

            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(id_file, self.run_id + "\n")
            what = "run"
        if previous is not None:  # the code may have changed since: the tags say what ran last
            for k, v in lineage_tags().items():
                retry(lambda: self.client.set_tag(self.run_id, k, v), "tagging the training run")
        from weakseg.data.fingerprint import fingerprint

        log_dataset(self.client, self.run_id, fingerprint(cfg))
        self.uri = uri
        self.monitor = start_system_metrics(uri, self.run_id, resume=previous is not None)
        print(f"MLflow: {what} {self.run_id} in experiment {exp_name} at {uri}", flush=True)

    def _previous_run(self, id_file: Path, exp_id: str):
        """The run this run folder logged to before, if it is in this store and experiment."""
        if not id_file.is_file():
            return None
        from mlflow.exceptions import MlflowException

        run_id = id_file.read_text().strip()
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None  # logged to another store: start a new run here
            raise UserError(f"MLflow: looking up the run {run_id} of {self.run_dir} failed: {e.message}") from None
        if run.info.experiment_id != exp_id or run.info.lifecycle_stage != "active":
            return None  # another experiment, or deleted in the UI: start a new run
        with contextlib.suppress(Exception):  # the error of the attempt that stopped is history now
            self.client.delete_tag(run_id, TAG_ERROR)
        return run

    def log(self, iteration: int, scalars: dict[str, float]) -> None:
        _log_metrics(self.client, self.run_id, scalars, iteration)
        if self.inner is not None:
            self.inner.log(iteration, scalars)

    def evaluated(self, iteration, scalars, result, final) -> None:
        logged = retry(lambda: self.client.get_run(self.run_id), "reading the training run").data.metrics
        _log_metrics(self.client, self.run_id, {**scalars, **summary_metrics(scalars, logged)}, iteration)
        retry(lambda: self.client.set_tag(self.run_id, TAG_ABSENT, absent_classes(scalars)), "tagging the training run")
        tag_collapsed(self.client, self.run_id, scalars, iteration)
        _log_files(self.client, self.run_id, eval_artifacts(self.run_dir), "eval")
        if self.inner is not None:
            self.inner.evaluated(iteration, scalars, result, final)

    def close(self, error: BaseException | None = None) -> None:
        if self.monitor is not None:
            finish_system_metrics(self.monitor)
        status = "FINISHED" if error is None else ("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        last = self.run_dir / "checkpoints" / "last.pt"
        if error is None and last.is_file():  # the run's model: its last checkpoint, as a search selects
            from weakseg.tracking.models import log_checkpoint_model

            uri = log_checkpoint_model(self.uri, self.run_id, last)
            print(f"MLflow: model {uri}", flush=True)
        if error is not None:
            with contextlib.suppress(Exception):
                self.client.set_tag(self.run_id, TAG_ERROR, str(error)[:4000])
        retry(lambda: self.client.set_terminated(self.run_id, status=status), "closing the training run")


def tag_collapsed(client, run_id: str, scalars: Mapping[str, float], iteration: int) -> None:
    """Tag a run whose evaluation reported val/collapsed = 1 (weak training learning nothing); the latest one wins."""
    if scalars.get("val/collapsed", 0.0) >= 0.5:
        auc, fg = scalars.get("val/image_auc", math.nan), scalars.get("val/fg_fraction", math.nan)
        text = f"iteration {iteration}: image AUC {auc:.3f}, predicted foreground {fg:.3f}"
        retry(lambda: client.set_tag(run_id, TAG_COLLAPSED, text), "tagging a collapsed run")


def log_evaluation(uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
                   metrics: Mapping[str, float], files: Mapping[str, Path]) -> str:
    """One finished MLflow run for a `weakseg evaluate`: its params, metrics and tables."""
    check_reachable(uri)
    _make_sqlite_folder(uri)
    client = _client(uri)
    exp_id = ensure_experiment(uri, experiment)
    run = retry(lambda: client.create_run(exp_id, tags={TAG_ROLE: "evaluate", **lineage_tags(),
                                                         TAG_ABSENT: absent_classes(metrics, str(params.get("split", "val")))},
                                          run_name=run_name),
                "creating the evaluation run")
    _log_params(client, run.info.run_id, params)
    _log_metrics(client, run.info.run_id, metrics, step=0)
    _log_files(client, run.info.run_id, files, "eval")
    retry(lambda: client.set_terminated(run.info.run_id, status="FINISHED"), "closing the evaluation run")
    return run.info.run_id


def eval_artifacts(run_dir: Path) -> dict[str, Path]:
    """The files `engine.fit` writes at each evaluation, worth attaching to a run."""
    from weakseg.report import eval_files

    return {"config": run_dir / "config.yaml", **eval_files(run_dir / "eval")}


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
