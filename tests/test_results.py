"""Model selection is honest: every score a train run or a search reports is a LAST evaluation.

A run whose val mIoU peaks early and falls at the end must report the fallen value, with the
checkpoint that scored it; the peak may only appear labelled as information.
"""

import csv
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from weakseg.data.classes import VOC_CLASSES
from weakseg.search.results import chosen_trial, rows_from_results, write_summary


def fake_result(trial_id: str, mious: list[float], tmp_path: Path, lam: float) -> SimpleNamespace:
    """What Ray Tune's Result offers rows_from_results: a trial evaluated at iterations 2, 4, ..."""
    iterations = [2 * (k + 1) for k in range(len(mious))]
    df = pd.DataFrame({"iteration": iterations, "val/miou": mious,
                       "val/iou/background": [m + 0.1 for m in mious], "val/iou/cat": [m - 0.1 for m in mious]})
    last_ckpt = tmp_path / trial_id / f"checkpoint_{len(mious) - 1:06d}"
    last_ckpt.mkdir(parents=True)
    return SimpleNamespace(metrics={"iteration": iterations[-1], "val/miou": mious[-1], "trial_id": trial_id},
                           metrics_dataframe=df, error=None, config={"loss.lam": lam, "loss.variant": "exp"},
                           path=str(tmp_path / trial_id), checkpoint=SimpleNamespace(path=str(last_ckpt)),
                           best_checkpoints=[])


def test_search_ranks_and_reports_each_trials_last_evaluation(tmp_path: Path):
    # a: peaks at 60 % then falls to 20 %; b: ends at 35 %. Ranking by the peak would pick a.
    grid = [fake_result("a", [0.6, 0.2], tmp_path, 0.1), fake_result("b", [0.3, 0.35], tmp_path, 0.3),
            fake_result("c", [0.25, 0.5, 0.1], tmp_path, 1.0)]
    rows = {r.trial_id: r for r in rows_from_results(grid, "val/miou", "max", full_iterations=4)}
    assert (rows["a"].final, rows["a"].peak) == (0.2, 0.6)
    assert (rows["c"].final, rows["c"].peak) == (0.1, 0.5)
    assert rows["a"].per_class == pytest.approx({"background": 0.3, "cat": 0.1})  # at the last evaluation
    assert rows["a"].checkpoint.endswith("a/checkpoint_000001")  # the latest, not the peak's

    out = tmp_path / "results"
    summary = write_summary(list(rows.values()), out, metric="val/miou", mode="max", best_config={"x": 1},
                            title="t")
    assert chosen_trial(list(rows.values()), "max").trial_id == summary.best.trial_id == "b"
    assert (out / "best_checkpoint.txt").read_text().strip() == rows["b"].checkpoint
    table = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["trial_id"] for r in table] == ["b", "a", "c"]
    assert [float(r["final val/miou"]) for r in table] == [0.35, 0.2, 0.1]
    md = (out / "trials.md").read_text()
    assert "Chosen: trial `b`, final val/miou = 35.0" in md and "60.0" in md  # the peak only as a column
    # min mode: the lowest final value wins, whatever the peaks were
    assert chosen_trial(list(rows.values()), "min").trial_id == "c"


class _Scripted:
    """Wraps engine.evaluate: the real evaluation, then a confusion matrix whose mIoU is scripted."""

    def __init__(self, real, predictions):
        self.real, self.predictions, self.calls = real, list(predictions), 0

    def __call__(self, *args, **kwargs):
        import dataclasses

        from weakseg.metrics import ConfusionMatrix

        result = self.real(*args, **kwargs)
        cm = ConfusionMatrix(21, class_names=VOC_CLASSES)
        cm.update(torch.tensor(self.predictions[self.calls]), torch.tensor([0, 0, 1, 1]))
        self.calls += 1
        return dataclasses.replace(result, metrics=cm.compute())


@pytest.mark.slow  # ~30 s on the shared 2-core machine, most of it MLflow's SQLite set-up
def test_train_reports_the_last_evaluation_when_val_miou_falls_at_the_end(tmp_path: Path, tiny_overrides,
                                                                           monkeypatch, capsys):
    from mlflow import MlflowClient

    from weakseg import engine
    from weakseg.checkpoint import load_checkpoint
    from weakseg.cli import main

    # evaluation 1: perfect (mIoU 1); evaluation 2: one pixel wrong, IoU 2/3 and 1/2 -> mIoU 7/12
    monkeypatch.setattr(engine, "evaluate", _Scripted(engine.evaluate, [[0, 0, 1, 1], [0, 0, 0, 1]]))
    final = (2 / 3 + 1 / 2) / 2
    uri = f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}"
    sets = [x for o in tiny_overrides + ["optim.iterations=2", "train.eval_every=1", "data.val_limit=1",
                                         f"tracking.uri={uri}", "tracking.experiment=honest"]
            for x in ("--set", o)]
    run = tmp_path / "run"
    assert main(["train", "demo", *sets, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"val mIoU {100 * final:5.1f}% (last evaluation" in out, out
    assert "peak over evaluations 100.0%, picked on val: not a result" in out  # shown, but labelled
    # the only checkpoint is the last one, and it carries the last score
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["iteration"] == 2 and ck["metrics"]["val/miou"] == pytest.approx(final)
    # MLflow's run value of val/miou (its latest) is the last evaluation too
    client = MlflowClient(uri)
    (r,) = client.search_runs([client.get_experiment_by_name("honest").experiment_id])
    assert r.data.metrics["val/miou"] == pytest.approx(final)
    assert [m.value for m in client.get_metric_history(r.info.run_id, "val/miou")] == pytest.approx([1.0, final])
