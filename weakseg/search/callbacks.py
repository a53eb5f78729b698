"""The driver-side Ray Tune callback that keeps one MLflow child run per trial.

on_trial_start:   get-or-create the trial's run (tagged by trial id), log its params
on_trial_result:  log the reported val/* and train/* metrics at step = training iteration
on_checkpoint:    log the training log since the last evaluation and the evaluation's artifacts,
                  read from the persisted checkpoint folder (local, shared or s3:// / gs://)
on_trial_complete / on_trial_error: the final status (completed, stopped early, diverged, failed)
on_step_end:      the status of every trial, so that a signal's cut trials can be told from finished ones

Every tracking call goes through a queue, in order. When the tracking server is unreachable the
calls stay queued and training goes on (trials never talk to MLflow); the queue is retried every
RETRY_EVERY_S, an outage longer than OUTAGE_REPORT_S is reported on the console, and the queue
is sent when the server returns. A metric point (key, step) a run already holds is never sent
again: after `--resume` a trial replays the iterations since its last checkpoint.

Defined at module level so that Ray can pickle it with the experiment state (the queue is not pickled).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ray.tune import Callback

from weakseg.config import build_config, mapping_settings
from weakseg.report import EVAL_FILES
from weakseg.search.tracking import SearchRun
from weakseg.search.trial import TRAIN_LOG_FILE
from weakseg.tracking.client import log_files, log_metrics, log_params, mlflow_client, retry
from weakseg.tracking.runs import TAG_ABSENT, absent_classes, log_dataset, summary_metrics, tag_collapsed


class MlflowCallback(Callback):
    OUTAGE_REPORT_S = 60.0  # an unreachable tracking server is reported once it has been down this long
    RETRY_EVERY_S = 10.0  # while it is down, the queue is retried this often (the Tune loop goes on between)
    END_WAIT_S = 300.0  # at the end of the search, how long to wait for it to return

    def __init__(self, search: SearchRun, base_values: Mapping[str, Any], full_iterations: int):
        self.search = search
        self.base_values = dict(base_values)
        self.full_iterations = full_iterations
        self.runs: dict[str, str] = {}  # trial id -> run id: a cache, the tag is the truth
        self.__setstate__(self.__getstate__())

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in ("search", "base_values", "full_iterations", "runs")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.pending: list[tuple[str, Callable[[], None]]] = []
        self.down_since: float | None = None
        self.reported = False
        self.last_try = 0.0
        self.last_error = ""
        self.status: dict[str, str] = {}  # trial id -> Tune status at the end of the last loop step
        self.last_steps: dict[str, dict[str, int]] = {}  # run id -> metric key -> last step it holds
        self.data: dict[tuple, Any] = {}  # data config -> DataFingerprint, computed once per data set

    # ----------------------------------------------------------------------------- the queue
    def send(self, what: str, op: Callable[[], None]) -> None:
        self.pending.append((what, op))
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send the queued calls in order; True when nothing is left."""
        now = time.monotonic()
        if self.down_since is not None and not force and now - self.last_try < self.RETRY_EVERY_S:
            self._report(now)
            return False
        self.last_try = now
        while self.pending:
            what, op = self.pending[0]
            try:
                op()
            except Exception as e:  # UserError from `retry`, or anything the client raises
                self.down_since = self.down_since if self.down_since is not None else now
                self.last_error = f"{what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                self._report(time.monotonic())
                return False
            self.pending.pop(0)
        if self.down_since is not None and self.reported:
            print(f"MLflow at {self.search.uri} answers again after {now - self.down_since:.0f} s; "
                  "every buffered call was sent", flush=True)
        self.down_since, self.reported = None, False
        return True

    def _report(self, now: float) -> None:
        if self.down_since is not None and not self.reported and now - self.down_since >= self.OUTAGE_REPORT_S:
            print(f"warning: MLflow at {self.search.uri} has failed for {now - self.down_since:.0f} s "
                  f"({self.last_error}); training goes on, {len(self.pending)} tracking call(s) are buffered "
                  "and will be sent when it returns", flush=True)
            self.reported = True

    def on_step_begin(self, iteration, trials, **info):
        if self.pending:
            self.flush()

    def on_step_end(self, iteration, trials, **info):
        self.status = {t.trial_id: t.status for t in trials}

    def on_experiment_end(self, trials, **info):
        deadline = time.monotonic() + self.END_WAIT_S
        while not self.flush(force=True) and time.monotonic() < deadline:
            time.sleep(self.RETRY_EVERY_S)

    def log_new_metrics(self, client, run_id: str, scalars: Mapping[str, float], step: int) -> None:
        """Log the points the run does not hold yet: a resumed trial replays iterations since its checkpoint."""
        if run_id not in self.last_steps:
            run = retry(lambda: client.get_run(run_id), f"reading run {run_id}")
            self.last_steps[run_id] = {
                k: max((m.step for m in retry(lambda: client.get_metric_history(run_id, k), "reading metrics")),
                       default=-1)
                for k in run.data.metrics}
        last = self.last_steps[run_id]
        fresh = {k: v for k, v in scalars.items() if step > last.get(k, -1)}
        if fresh:
            log_metrics(client, run_id, fresh, step)
            last.update({k: step for k in fresh})

    def run_of(self, trial) -> str:
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = self.search.child(trial.trial_id, str(trial))
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.send(f"starting the run of trial {trial.trial_id}", lambda: self._trial_started(trial))

    def _trial_started(self, trial) -> None:
        run_id = self.run_of(trial)
        client = mlflow_client(self.search.uri)
        retry(lambda: client.update_run(run_id, status="RUNNING"), "reopening a trial run")
        sampled = dict(trial.config)
        cfg = build_config(mapping_settings({**self.base_values, **sampled}, "trial", None))
        log_params(client, run_id, {**cfg.flat(), "trial_id": trial.trial_id,
                                     **{f"sampled/{k}": v for k, v in sampled.items()}})
        key = tuple(sorted(dataclasses.asdict(cfg.data).items()))
        if key not in self.data:
            from weakseg.data.fingerprint import fingerprint

            self.data[key] = fingerprint(cfg)
        log_dataset(client, run_id, self.data[key])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "iteration" not in result:
            return  # e.g. the report of a diverged trial: recorded at completion
        # train/* come with the checkpoint's training log, at their own iterations
        scalars = {k: v for k, v in result.items() if k.startswith("val/")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = int(result["iteration"])
        self.send(f"logging trial {trial.trial_id}", lambda: self._log_result(trial, scalars, step))

    def _log_result(self, trial, scalars: Mapping[str, float], step: int) -> None:
        client, run_id = mlflow_client(self.search.uri), self.run_of(trial)
        logged = retry(lambda: client.get_run(run_id), "reading a trial run").data.metrics
        self.log_new_metrics(client, run_id, {**scalars, **summary_metrics(scalars, logged)}, step)
        retry(lambda: client.set_tag(run_id, TAG_ABSENT, absent_classes(scalars)), "tagging a trial run")
        tag_collapsed(client, run_id, scalars, step)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self.send(f"logging the checkpoint of trial {trial.trial_id}", lambda: self._checkpointed(trial, checkpoint))

    def _checkpointed(self, trial, checkpoint) -> None:
        run_id = self.run_of(trial)
        client = mlflow_client(self.search.uri)
        with tempfile.TemporaryDirectory(prefix="weakseg-mlflow-") as tmp:
            names = [TRAIN_LOG_FILE, "config.yaml"] + [f"eval/{n}" for n in EVAL_FILES]
            got = fetch_files(checkpoint, names, Path(tmp))
            log = got.pop(TRAIN_LOG_FILE, None)
            if log is not None:
                with log.open() as f:
                    for row in csv.DictReader(f):
                        step = int(float(row.pop("iteration")))
                        self.log_new_metrics(client, run_id, {k: float(v) for k, v in row.items() if v}, step)
            log_files(client, run_id, {n: p for n, p in got.items() if n.startswith("eval/")}, "eval")
            if "config.yaml" in got:
                log_files(client, run_id, {"config.yaml": got["config.yaml"]}, None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if last.get("diverged"):
            error = str(last.get("error", ""))
            self.send("closing a trial run",
                      lambda: self.search.close_child(trial.trial_id, "FAILED", "diverged", error=error))
            return
        early = int(last.get("iteration", self.full_iterations)) < self.full_iterations
        outcome = "stopped_early" if early else "completed"
        self.send("closing a trial run", lambda: self.search.close_child(trial.trial_id, "FINISHED", outcome))

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial_error(trial)
        self.send("closing a trial run", lambda: self.search.close_child(trial.trial_id, "FAILED", "failed",
                                                                          error=error))


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
