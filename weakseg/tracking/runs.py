"""What every weakseg MLflow run carries, and the runs of `weakseg train` and `weakseg evaluate`.

The tags (role, lineage, outcome, checkpoint, ...) are named here once for every run, a search's
included (its parent and trial runs: `weakseg.search.tracking`). Every run gets the code it ran
(version, git commit, dirty or not), the data set as an MLflow dataset input, and MLflow's system
metrics of its node; a run that evaluates gets best/ and final/ summary metrics, the classes without
an IoU as a tag, and a tag when training collapsed. Models: `weakseg.tracking.models`.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Mapping

from weakseg.errors import UserError
from weakseg.tracking.client import (check_reachable, ensure_experiment, log_files, log_metrics, log_params,
                                     make_sqlite_folder, mlflow_client, retry)

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


def checkpoint_of_run(uri: str, run_id: str) -> str:
    """The checkpoint recorded on an MLflow run: a trial's last, or the chosen trial's last on a search's parent run."""
    check_reachable(uri)
    client = mlflow_client(uri)
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
        make_sqlite_folder(uri)
        self.inner = inner
        self.client = mlflow_client(uri)
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
            log_params(self.client, self.run_id, {k: v for k, v in flat.items() if k not in logged})
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
            log_params(self.client, self.run_id, cfg.flat())
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
        log_metrics(self.client, self.run_id, scalars, iteration)
        if self.inner is not None:
            self.inner.log(iteration, scalars)

    def evaluated(self, iteration, scalars, result, final) -> None:
        logged = retry(lambda: self.client.get_run(self.run_id), "reading the training run").data.metrics
        log_metrics(self.client, self.run_id, {**scalars, **summary_metrics(scalars, logged)}, iteration)
        retry(lambda: self.client.set_tag(self.run_id, TAG_ABSENT, absent_classes(scalars)), "tagging the training run")
        tag_collapsed(self.client, self.run_id, scalars, iteration)
        log_files(self.client, self.run_id, eval_artifacts(self.run_dir), "eval")
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
    make_sqlite_folder(uri)
    client = mlflow_client(uri)
    exp_id = ensure_experiment(uri, experiment)
    run = retry(lambda: client.create_run(exp_id, tags={TAG_ROLE: "evaluate", **lineage_tags(),
                                                         TAG_ABSENT: absent_classes(metrics, str(params.get("split", "val")))},
                                          run_name=run_name),
                "creating the evaluation run")
    log_params(client, run.info.run_id, params)
    log_metrics(client, run.info.run_id, metrics, step=0)
    log_files(client, run.info.run_id, files, "eval")
    retry(lambda: client.set_terminated(run.info.run_id, status="FINISHED"), "closing the evaluation run")
    return run.info.run_id


def eval_artifacts(run_dir: Path) -> dict[str, Path]:
    """The files `engine.fit` writes at each evaluation, worth attaching to a run."""
    from weakseg.report import eval_files

    return {"config": run_dir / "config.yaml", **eval_files(run_dir / "eval")}
