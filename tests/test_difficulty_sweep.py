"""scripts/difficulty_sweep.py: its table against hand-computed means, ranges, ratios and gains; a smoke run."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dataclasses import replace

from weakseg.config import load_config

REPO = Path(__file__).resolve().parents[1]


def sweep_module():
    spec = importlib.util.spec_from_file_location("difficulty_sweep", REPO / "scripts" / "difficulty_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_run(d: Path, evals: list[dict], seconds: float | None = None) -> None:
    """A metrics.csv as the engine writes it: one row per evaluation, the union of the keys as columns."""
    d.mkdir(parents=True)
    keys = list(dict.fromkeys(k for e in evals for k in e))
    with (d / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(evals)
    if seconds is not None:
        (d / "wall_seconds.txt").write_text(f"{seconds}\n")


def ev(it: int, miou: float, obj: float = 0.0, auc: float = 0.5, collapsed: float = 0.0) -> dict:
    return {"iteration": it, "val/miou": miou, "val/object_iou": obj, "val/image_auc": auc,
            "val/collapsed": collapsed}


def test_report_means_ranges_ratios_gains_and_collapse_alarm(tmp_path):
    m = sweep_module()
    it = 3000
    # last val mIoU per seed (0, 1): full .6/.8, lam0 .1/.2, paper .15/.3, recipe .42/.48, recipe_lam0 .40/.50
    last = {"full": (0.6, 0.8), "lam0": (0.1, 0.2), "paper": (0.15, 0.3), "recipe": (0.42, 0.48),
            "recipe_lam0": (0.40, 0.50)}
    for row, vals in last.items():
        for seed, v in enumerate(vals):
            evals = [ev(1500, 0.99), ev(it, v, obj={"full": (0.5, 0.7)}.get(row, (0.0, 0.0))[seed],
                                        auc={"full": (0.9, 0.96)}.get(row, (0.5, 0.5))[seed])]
            if row == "lam0" and seed == 1:
                evals = [ev(1500, 0.05, collapsed=1.0), ev(it, 0.2, collapsed=1.0)]
            fake_run(m.run_dir(tmp_path, "small", row, seed, it), evals,
                     seconds={"full": (120, 240)}.get(row, (60, 60))[seed])
    results = m.load_results(tmp_path, ["small"], list(m.ROWS), 2, it)
    assert len(results) == 10
    text = "\n".join(m.report(results, ["small"], list(m.ROWS), 2))
    rows = {l.split(" | ")[0].lstrip("| "): l.split(" | ") for l in text.splitlines() if l.startswith("| ")}
    # full: mIoU (60 + 80) / 2, object IoU (50 + 70) / 2, AUC (.90 + .96) / 2, wall (2 + 4) / 2 min
    assert rows["full supervision"][1:] == ["2", "70.0 (60.0–80.0)", "60.0 (50.0–70.0)", "0.93 (0.90–0.96)", "–",
                                            "0", "3.0 (2.0–4.0) |"]
    # recipe: mean 45.0; ratio of means .45 / .7 = 0.643; seed ratios .42/.6 = 0.70, .48/.8 = 0.60
    assert rows["shipped recipe (demo_weak)"][2] == "45.0 (42.0–48.0)"
    assert rows["shipped recipe (demo_weak)"][5] == "0.64 (0.60–0.70)"
    # lam0: .15 / .7 = 0.214; seed ratios .1/.6 = 0.17, .2/.8 = 0.25; one collapsed seed
    assert rows["weak, λ = 0 (the paper's prior alone)"][5:7] == ["0.21 (0.17–0.25)", "1"]
    # gains seed by seed: paper - lam0 = 5, 10 points; recipe - recipe_lam0 = +2, -2 points
    assert "λ = 0 (the paper's prior alone), seed by seed: 7.5 (5.0–10.0) mIoU points over 2 seed(s)" in text
    assert "no neighbourhood loss), seed by seed: 0.0 (-2.0–2.0) mIoU points over 2 seed(s)" in text
    assert "reaches 0.64 × full supervision: meets the target of 0.5 ×" in text
    alarms = [l for l in text.splitlines() if "COLLAPSED" in l]
    assert alarms == ["- **COLLAPSED: small, weak, λ = 0 (the paper's prior alone), seed 1: val/collapsed = 1 at "
                      "iteration(s) 1500, 3000**"]


def test_run_folders_are_named_by_config_and_overrides(tmp_path):
    m = sweep_module()
    d = m.run_dir(tmp_path, "small", "recipe", 1, 3000)
    assert d == tmp_path / "small" / "demo_weak_loss.cls_only_iters-1000_loss.object_fraction-0.07_train.seed-1"
    assert m.run_dir(tmp_path, "default", "full", 0, 3000).name == "demo_supervision-full_train.seed-0"


def test_shipped_recipe_config_is_the_sweeps_recipe():
    """demo_weak = the demo run + replicate padding, AdamW, the classification-first phase with top-k pooling,
    the size-aware prior and exp λ = 0.3: otherwise the same net, data and schedule as the demo."""
    cfg, demo = load_config("demo_weak"), load_config("demo")
    assert (cfg.loss.cls_weight, cfg.loss.cls_pool, cfg.loss.cls_only_iters, cfg.loss.c_fg_mode) == (1.0, "topk", 130,
                                                                                                     "size")
    assert (cfg.loss.variant, cfg.loss.lam, cfg.loss.grad) == ("exp", 0.3, "detach")
    assert (cfg.optim.optimizer, cfg.optim.lr_new, cfg.optim.lr_pretrained) == ("adamw", 1e-3, 1e-3)
    assert cfg.model.padding == "replicate" and cfg.model == replace(demo.model, padding="replicate")
    assert cfg.data == demo.data
    assert (cfg.optim.iterations, cfg.optim.lr_step, cfg.optim.batch_size) == (demo.optim.iterations,
                                                                               demo.optim.lr_step, demo.optim.batch_size)
    assert sweep_module().OBJECT_FRACTION["default"] == cfg.loss.object_fraction


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    """--iterations 4 on a tiny set: the data is generated, each run trains, and the table names each row."""
    small = ["data.synthetic_train=8", "data.synthetic_val=4", "data.synthetic_test=2", "data.synthetic_size=64",
             "data.crop_size=64", "optim.batch_size=2", "model.decoder_channels=16", "model.skip_channels=4",
             "train.overlays=0"]
    md = tmp_path / "difficulty.md"
    cmd = [sys.executable, str(REPO / "scripts" / "difficulty_sweep.py"), "--iterations", "4", "--seeds", "1",
           "--presets", "small", "--rows", "full,recipe", "--jobs", "1", "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "runs"), "--md", str(md), *[x for s in small for x in ("--set", s)]]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = (tmp_path / "data" / "small" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt")
    assert len(manifest.read_text().split()) == 8
    text = md.read_text()
    assert "## Preset `small`" in text and "| full supervision | 1 |" in text and "| shipped recipe (demo_weak) | 1 |" in text
    run = tmp_path / "runs" / "small" / "demo_weak_loss.cls_only_iters-1_loss.object_fraction-0.07_train.seed-0"
    assert (run / "metrics.csv").is_file()
    # a second call finds every run done: nothing retrains, the wall time is unchanged
    before = (run / "wall_seconds.txt").read_text()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and (run / "wall_seconds.txt").read_text() == before
    # --report-only with a row and seeds never trained: the table of what exists, no new run folder
    only = [c if c != "full,recipe" else "full,recipe,recipe_lam0" for c in cmd] + ["--report-only", "--seeds", "2"]
    r = subprocess.run(only, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(d.name for d in (tmp_path / "runs" / "small").iterdir()) == [
        "demo_supervision-full_train.seed-0", run.name]
    text = md.read_text()
    assert "| shipped recipe (demo_weak) | 1 |" in text and "| shipped recipe, λ = 0 (no neighbourhood loss) |" not in text


def test_ratios_are_to_the_better_full_supervision_row(tmp_path):
    """full .6/.8 (mean .7), full_recipe .8 on seed 0 only (mean .8): the recipe's .45 mean is 0.56 × the latter."""
    m = sweep_module()
    it = 3000
    for row, vals in {"full": (0.6, 0.8), "full_recipe": (0.8,), "recipe": (0.42, 0.48)}.items():
        for seed, v in enumerate(vals):
            fake_run(m.run_dir(tmp_path, "small", row, seed, it), [ev(it, v)])
    fake_run(m.run_dir(tmp_path, "small", "recipe_lam0", 0, it), [ev(1500, 0.3)])  # still training: left out
    assert m.run_dir(tmp_path, "small", "full_recipe", 0, it).name == "demo_weak_supervision-full_train.seed-0"
    results = m.load_results(tmp_path, ["small"], list(m.ROWS), 2, it)
    text = "\n".join(m.report(results, ["small"], list(m.ROWS), 2))
    rows = {l.split(" | ")[0].lstrip("| "): l.split(" | ") for l in text.splitlines() if l.startswith("| ")}
    assert rows["shipped recipe (demo_weak)"][5] == "0.56"  # one seed paired: no range
    assert rows["full supervision, the recipe's net and optimizer"][1:3] == ["1", "80.0"]
    assert "relative to full supervision, the recipe's net and optimizer" in text
    assert "reaches 0.56 × full supervision: meets the target of 0.5 ×" in text
    assert "| shipped recipe, λ = 0 (no neighbourhood loss) |" not in text and len(results) == 5
