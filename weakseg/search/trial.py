"""One search trial: the same `engine.fit` as `weakseg train`, reporting to Ray Tune.

A trial talks to Ray Tune only. At every evaluation it writes a checkpoint
folder — the training state (`checkpoint.pt`), the training log since the last
evaluation, the resolved config and the evaluation's tables and plots — and
hands it to `tune.report` together with the val metrics. Ray persists the
folder to the search's storage path; the driver logs metrics and artifacts to
MLflow from there (see `callbacks.MlflowCallback`). So trials on worker nodes
never need to reach the MLflow server, which can stay bound to localhost on
the head node, and the SQLite store of a local search has a single writer.

Order matters under ASHA and stop rules: code after a trial's last
`tune.report` may never run, so everything is written before the report.
A retried trial (FailureConfig) restarts from the checkpoint it last reported.
A trial whose loss diverges reports `diverged` with the reason and ends: a
retry would replay the same batches from the same checkpoint and diverge again.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from weakseg.config import build_config, mapping_settings
from weakseg.engine import TrainingDiverged, fit
from weakseg.io import csv_text
from weakseg.report import EVAL_FILES

CHECKPOINT_FILE = "checkpoint.pt"
TRAIN_LOG_FILE = "train_log.csv"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs besides its sampled parameters; plain data, cheap to ship to workers."""

    base_values: Mapping[str, Any]  # SearchSpace.base_values(): flat base + fixed, absolute paths
    metric: str


class TuneReporter:
    """engine.Reporter for a trial: collects the training log, reports each evaluation with its folder."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.train_log: list[dict[str, float]] = []

    def log(self, iteration: int, scalars: dict[str, float]) -> None:
        self.train_log.append({"iteration": iteration, **scalars})

    def evaluated(self, iteration: int, scalars: dict[str, float], result: Any, final: bool) -> None:
        import ray
        from ray import tune

        last_train = self.train_log[-1] if self.train_log else {}
        metrics = {**{k: v for k, v in last_train.items() if k != "iteration"}, **scalars, "iteration": iteration,
                   "node_id": ray.get_runtime_context().get_node_id()}
        with tempfile.TemporaryDirectory(prefix="weakseg-ckpt-") as tmp:
            folder = Path(tmp)
            shutil.copy2(self.run_dir / "checkpoints" / "last.pt", folder / CHECKPOINT_FILE)
            shutil.copy2(self.run_dir / "config.yaml", folder / "config.yaml")
            (folder / "eval").mkdir()
            for name in EVAL_FILES:  # those this evaluation wrote
                if (self.run_dir / "eval" / name).is_file():
                    shutil.copy2(self.run_dir / "eval" / name, folder / "eval" / name)
            (folder / TRAIN_LOG_FILE).write_text(csv_text(self.train_log))
            self.train_log = []
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Ray Tune function trainable."""
    from ray import tune

    ctx = tune.get_context()
    cfg = build_config(mapping_settings({**setup.base_values, **config}, f"trial {ctx.get_trial_id()}", None))
    run_dir = Path(ctx.get_trial_dir()) / "run"
    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume_from = run_dir / "checkpoints" / "resume.pt"
            resume_from.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(d) / CHECKPOINT_FILE, resume_from)
    reporter = TuneReporter(run_dir)
    try:
        fit(cfg, run_dir, resume_from=resume_from, reporter=reporter)
    except TrainingDiverged as e:
        # Counted as failed by the searcher and MLflow (see module docstring); the metric key must be present.
        tune.report({setup.metric: math.nan, "diverged": 1.0, "error": str(e)})
