"""The driver-side Ray Tune callback that keeps one MLflow child run per trial.

on_trial_start:   get-or-create the trial's run (tagged by trial id), log its params
on_trial_result:  log the reported val/* and train/* metrics at step = training iteration
on_checkpoint:    log the training log since the last evaluation and the evaluation's artifacts,
                  read from the persisted checkpoint folder (local, shared or s3:// / gs://)
on_trial_complete / on_trial_error: the final status (completed, stopped early, diverged, failed)

Defined at module level so that Ray can pickle it with the experiment state.
"""

from __future__ import annotations

import contextlib
import csv
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ray.tune import Callback

from weakseg.config import build_config, mapping_settings
from weakseg.search.tracking import SearchRun, _client, _log_files, _log_metrics, _log_params, retry, tag_collapsed
from weakseg.search.trial import EVAL_FILES, TRAIN_LOG_FILE


class MlflowCallback(Callback):
    def __init__(self, search: SearchRun, base_values: Mapping[str, Any], full_iterations: int):
        self.search = search
        self.base_values = dict(base_values)
        self.full_iterations = full_iterations
        self.runs: dict[str, str] = {}  # trial id -> run id: a cache, the tag is the truth

    def run_of(self, trial) -> str:
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = self.search.child(trial.trial_id, str(trial))
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self.run_of(trial)
        client = _client(self.search.uri)
        retry(lambda: client.update_run(run_id, status="RUNNING"), "reopening a trial run")
        sampled = dict(trial.config)
        cfg = build_config(mapping_settings({**self.base_values, **sampled}, "trial", None))
        _log_params(client, run_id, {**cfg.flat(), "trial_id": trial.trial_id,
                                     **{f"sampled/{k}": v for k, v in sampled.items()}})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "iteration" not in result:
            return  # e.g. the report of a diverged trial: recorded at completion
        # train/* come with the checkpoint's training log, at their own iterations
        scalars = {k: v for k, v in result.items() if k.startswith("val/")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        client = _client(self.search.uri)
        _log_metrics(client, self.run_of(trial), scalars, int(result["iteration"]))
        tag_collapsed(client, self.run_of(trial), scalars, int(result["iteration"]))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        run_id = self.run_of(trial)
        client = _client(self.search.uri)
        with tempfile.TemporaryDirectory(prefix="weakseg-mlflow-") as tmp:
            names = [TRAIN_LOG_FILE, "config.yaml"] + [f"eval/{n}" for n in EVAL_FILES]
            got = fetch_files(checkpoint, names, Path(tmp))
            log = got.pop(TRAIN_LOG_FILE, None)
            if log is not None:
                with log.open() as f:
                    for row in csv.DictReader(f):
                        step = int(float(row.pop("iteration")))
                        _log_metrics(client, run_id, {k: float(v) for k, v in row.items() if v}, step)
            _log_files(client, run_id, {n: p for n, p in got.items() if n.startswith("eval/")}, "eval")
            if "config.yaml" in got:
                _log_files(client, run_id, {"config.yaml": got["config.yaml"]}, None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if last.get("diverged"):
            self.search.close_child(trial.trial_id, "FAILED", "diverged", error=str(last.get("error", "")))
            return
        early = int(last.get("iteration", self.full_iterations)) < self.full_iterations
        self.search.close_child(trial.trial_id, "FINISHED", "stopped_early" if early else "completed")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.search.close_child(trial.trial_id, "FAILED", "failed", error=trial_error(trial))


def fetch_files(checkpoint, names: list[str], into: Path) -> dict[str, Path]:
    """Copy small files out of a persisted Tune checkpoint (any pyarrow file system) to a local folder."""
    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    got: dict[str, Path] = {}
    for name in names:
        try:
            with fs.open_input_stream(f"{root}/{name}") as f:
                data = f.read()
        except (FileNotFoundError, OSError):
            continue
        dst = into / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        got[name] = dst
    return got


def trial_error(trial) -> str:
    """The last line of the trial's error (Ray keeps the traceback in error.txt)."""
    path = getattr(trial, "error_file", None) or ""
    with contextlib.suppress(OSError):
        lines = [l for l in Path(path).read_text().splitlines() if l.strip()]
        if lines:
            return lines[-1].strip()
    return "trial failed (see Ray's error.txt for the trial)"
