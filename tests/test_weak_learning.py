"""Beyond the paper: image-level diagnostics, the collapse flag, the image-level loss, the size-aware prior.

Oracles: brute-force pair counting (AUC), hand-computed and threshold-by-threshold
AP, explicit loops for pooled BCE, scipy SLSQP for the prior with per-class
demands (the same oracle as test_prior.py), and real training runs that collapse.
"""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from weakseg.config import load_config
from weakseg.diagnostics import ImageLevelMeter, average_precision, collapse_scalars, fg_demand, roc_auc
from weakseg.losses.image_level import image_level_loss, pooled_scores
from weakseg.losses.prior import adaptive_prior, foreground_demand

from conftest import TINY
from test_prior import entropy, masses, restrict, slsqp_oracle


# ------------------------------------------------------------------ AUC and AP


def brute_auc(s, y) -> float:
    pos = [a for a, t in zip(s, y) if t]
    neg = [a for a, t in zip(s, y) if not t]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def threshold_ap(s, y) -> float:
    """AP by definition: for each distinct threshold t (high to low), precision at t × recall gained at t."""
    s, y = np.asarray(s), np.asarray(y).astype(bool)
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        sel = s >= t
        tp = int((sel & y).sum())
        recall = tp / y.sum()
        ap += (recall - prev_recall) * tp / sel.sum()
        prev_recall = recall
    return ap


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_ap_against_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 30
    s = rng.integers(0, 8, n) / 8.0  # many ties
    y = rng.random(n) < 0.4
    y[0], y[1] = True, False
    assert roc_auc(s, y) == pytest.approx(brute_auc(s, y), abs=1e-12)
    assert average_precision(s, y) == pytest.approx(threshold_ap(s, y), abs=1e-12)


def test_ap_hand_computed_and_degenerate_cases():
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1])) and math.isnan(average_precision([0.1], [0]))


def test_image_level_meter_by_hand():
    m = ImageLevelMeter(3)
    # image 1 holds class 1: p(1) peaks at 0.9; image 2 holds class 2: p(1) peaks at 0.3
    p1 = torch.tensor([[[0.1, 0.5]], [[0.9, 0.2]], [[0.0, 0.3]]])  # (3, 1, 2)
    p2 = torch.tensor([[[0.6, 0.2]], [[0.3, 0.1]], [[0.1, 0.7]]])
    m.add_probs(p1, torch.tensor([1.0, 1.0, 0.0]))
    m.add_probs(p2, torch.tensor([1.0, 0.0, 1.0]))
    m.add_prediction(torch.tensor([[1, 0]]), torch.tensor([[1, 1]]))  # half of the true fg predicted
    m.add_prediction(torch.tensor([[0, 0]]), torch.tensor([[255, 0]]))  # void pixel skipped
    out = m.compute()
    assert out["image_auc"] == pytest.approx(1.0)  # class 1: 0.9 > 0.3; class 2: 0.7 > 0.3
    assert out["image_auc/aeroplane"] == 1.0 and out["classes_per_image"] == 1.0
    assert out["fg_fraction"] == pytest.approx(0.25) and out["fg_fraction_true"] == pytest.approx(0.5)


def test_collapse_flag_rules():
    base = {"val/fg_fraction": 0.01, "val/fg_fraction_true": 0.3, "val/image_auc": 0.8}
    flag, why = collapse_scalars(base, "val", armed=True, min_auc=0.6)
    assert flag == {"val/collapsed": 1.0} and "foreground" in why
    assert collapse_scalars(base, "val", armed=False, min_auc=0.6)[0] == {"val/collapsed": 0.0}
    flag, why = collapse_scalars({**base, "val/fg_fraction": 0.2, "val/image_auc": 0.55}, "val", True, 0.6)
    assert flag["val/collapsed"] == 1.0 and "AUC 0.55" in why
    assert collapse_scalars({**base, "val/fg_fraction": 0.2}, "val", True, 0.6)[0]["val/collapsed"] == 0.0
    assert fg_demand(2.0, 0.4, 0.2) == pytest.approx(0.4) and fg_demand(4.0, 0.4, 0.2) == pytest.approx(0.6)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_a_run_that_collapses_is_flagged_warned_and_tagged(tiny_overrides, tmp_path: Path, capsys):
    """A prior that demands all background (c_bg = 1, c_fg = 0) really drives the model to background."""
    from mlflow.tracking import MlflowClient

    from weakseg.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = tiny_overrides + ["loss.c_bg=1.0", "loss.c_fg=0.0", "loss.variant=none", "optim.iterations=30",
                             "train.eval_every=15", "train.log_every=5", "train.collapse_after=0.6",
                             f"tracking.uri={uri}", "tracking.experiment=collapse"]
    code = main(["train", "demo", *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "run")])
    assert code == 0
    err = capsys.readouterr().err
    assert "WARNING: weak training looks collapsed at iteration 30" in err
    assert "iteration 15" not in err  # before the warm-up (0.6 × 30 iterations), no verdict
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert [float(r["val/collapsed"]) for r in rows] == [0.0, 1.0]
    assert float(rows[-1]["val/fg_fraction"]) < 0.1 * float(rows[-1]["val/fg_fraction_true"])
    log = read_csv(tmp_path / "run" / "train_log.csv")  # training losses without looking at MLflow
    assert [int(float(r["iteration"])) for r in log] == [5, 10, 15, 20, 25, 30]
    assert all(math.isfinite(float(r["train/loss"])) for r in log)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("collapse").experiment_id])[0]
    assert run.data.tags["weakseg.collapsed"].startswith("iteration 30")
    assert run.data.metrics["val/collapsed"] == 1.0 and "val/image_auc" in run.data.metrics


# ------------------------------------------------------------------ the image-level loss


def loop_pool(p: np.ndarray, pool: str, r: float, valid: np.ndarray, k: float = 0.1) -> np.ndarray:
    B, C = p.shape[:2]
    out = np.zeros((B, C - 1))
    for b in range(B):
        for c in range(1, C):
            xs = [p[b, c, i, j] for i in range(p.shape[2]) for j in range(p.shape[3]) if valid[b, i, j]]
            if pool == "avg":
                out[b, c - 1] = sum(xs) / len(xs)
            elif pool == "max":
                out[b, c - 1] = max(xs)
            elif pool == "topk":  # the mean of the ceil(k * n) largest
                top = sorted(xs, reverse=True)[: math.ceil(k * len(xs))]
                out[b, c - 1] = sum(top) / len(top)
            else:
                out[b, c - 1] = math.log(sum(math.exp(r * x) for x in xs) / len(xs)) / r
    return out


@pytest.mark.parametrize("pool", ["lse", "avg", "max", "topk"])
def test_pooled_bce_against_loops(pool):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) * 2
    p = logits.softmax(1)
    labels = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.float64)
    valid = torch.ones(2, 3, 5, dtype=torch.bool)
    valid[1, :, 3:] = False
    ref = loop_pool(p.numpy(), pool, 4.0, valid.numpy(), k=0.25)  # image 0: top 4 of 15 pixels, image 1: 3 of 9
    assert pooled_scores(p, pool, 4.0, valid, k=0.25).numpy() == pytest.approx(ref, abs=1e-12)
    y = labels[:, 1:].numpy()
    bce = -np.mean(y * np.log(ref) + (1 - y) * np.log(1 - ref))
    assert float(image_level_loss(p, labels, pool, 4.0, valid, k=0.25)) == pytest.approx(bce, abs=1e-10)


def test_topk_pooling_asks_for_the_objects_area_and_no_more():
    # a class on 10 % of the pixels at p = 1 scores 1 with k = 0.1 (no pull to grow), 0.5 with k = 0.2
    p = torch.zeros(1, 2, 10, 10)
    p[0, 0] = 1.0
    p[0, 1, :1], p[0, 0, :1] = 1.0, 0.0  # one row of ten pixels: 10 %
    assert float(pooled_scores(p, "topk", k=0.1)) == pytest.approx(1.0)
    assert float(pooled_scores(p, "topk", k=0.2)) == pytest.approx(0.5)
    assert float(pooled_scores(p, "topk", k=0.001)) == pytest.approx(1.0)  # at least one pixel


def test_pooled_probabilities_pull_on_the_background_logit():
    # on pooled softmax probabilities, raising a present class must lower the background: its logit gets gradient
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    image_level_loss(logits.softmax(1), torch.tensor([[1.0, 1.0, 0.0]]), "lse", 5.0).backward()
    assert (logits.grad[0, 0] > 0).all() and (logits.grad[0, 1] < 0).all()


def test_classification_first_phase_then_both(tiny_overrides, tmp_path: Path):
    from weakseg.engine import fit

    cfg = load_config("demo", tiny_overrides + ["loss.cls_weight=1", "loss.cls_only_iters=10", "loss.variant=none",
                                                "optim.iterations=20", "train.eval_every=20", "train.log_every=5"])
    fit(cfg, tmp_path / "run")
    log = read_csv(tmp_path / "run" / "train_log.csv")
    cls = {int(float(r["iteration"])): float(r["train/loss_class"]) for r in log}
    img = {int(float(r["iteration"])): float(r["train/loss_image"]) for r in log}
    assert cls[5] == 0.0 and cls[10] == 0.0 and cls[15] > 0 and cls[20] > 0  # pixel loss off, then on
    assert all(v > 0 for v in img.values())
    for it in (5, 20):  # total = class + weight × image (λ = 0)
        row = next(r for r in log if int(float(r["iteration"])) == it)
        assert float(row["train/loss"]) == pytest.approx(cls[it] + img[it], rel=1e-5)


def test_auc_switch_ends_the_phase_early():
    from weakseg.engine import TrainState, _check_learning, in_image_phase

    cfg = load_config("demo", TINY + ["loss.cls_weight=1", "loss.cls_only_iters=100", "loss.cls_switch_auc=0.8"])
    state = TrainState(None, None, None, None, iteration=40)
    assert in_image_phase(cfg, state)
    _check_learning(state, cfg, {"val/image_auc": 0.7})
    assert in_image_phase(cfg, state)
    _check_learning(state, cfg, {"val/image_auc": 0.85})
    assert not in_image_phase(cfg, state)


@pytest.mark.parametrize("sets, message", [
    (["loss.cls_only_iters=10"], "loss.cls_only_iters"),
    (["loss.cls_weight=1", "loss.cls_switch_auc=0.9"], "loss.cls_switch_auc"),
    (["loss.c_fg_mode=confident", "loss.object_fraction=0.3"], "loss.object_fraction"),
    (["train.collapse_auc=2"], "train.collapse_auc"),
])
def test_bad_keys_name_the_key(sets, message):
    from weakseg.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("demo", sets)


# ------------------------------------------------------------------ the size-aware prior


def test_confident_demand_by_hand():
    p = torch.zeros(1, 3, 2, 5, dtype=torch.float64)
    p[0, 1, 0, :3] = 0.9  # class 1 confident on 3 of 10 pixels
    p[0, 2, 0, 0] = 0.6  # class 2 on 1 of 10
    p[0, 0] = 1 - p[0, 1] - p[0, 2]
    labels = torch.tensor([[1.0, 1.0, 1.0]])
    c = foreground_demand(p, labels, "confident", 0.2, 0.15)
    assert c[0, 1].item() == pytest.approx(0.2) and c[0, 2].item() == pytest.approx(0.15)  # 0.3 capped, 0.1 floored
    valid = torch.ones(1, 2, 5, dtype=torch.bool)
    valid[0, 1] = False  # over the 5 real pixels: 3/5 and 1/5
    c = foreground_demand(p, labels, "confident", 0.5, 0.1, valid)
    assert c[0, 1].item() == pytest.approx(0.5) and c[0, 2].item() == pytest.approx(0.2)
    assert foreground_demand(p, labels, "size", 0.2, 0.07) == 0.07
    assert foreground_demand(p, labels, "fixed", 0.2, 0.07) == 0.2


@pytest.mark.parametrize("seed", range(3))
def test_per_class_demand_matches_slsqp(seed):
    rng = np.random.default_rng(seed)
    C, h, w, B = 6, 6, 7, 4
    probs = torch.tensor(rng.dirichlet(np.ones(C) * 0.5, size=(B, h, w)).transpose(0, 3, 1, 2).copy())
    labels = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        labels[b, 0] = 1
        labels[b, rng.choice(np.arange(1, C), 2 + b % 3, replace=False)] = 1
    c_fg = torch.tensor(rng.uniform(0.03, 0.3, size=(B, C)))
    beta = adaptive_prior(probs, labels, c_bg=0.3, c_fg=c_fg).numpy()
    for b in range(B):
        present = labels[b].numpy() > 0
        P = restrict(probs[b].numpy(), present)
        c = np.r_[0.3, c_fg[b].numpy()[present][1:]]
        h_ref, b_ref = slsqp_oracle(P, c, rng)
        mine = beta[b][present]
        if c.sum() <= 1:
            assert np.all(masses(P, mine) >= c - 1e-3)
        else:
            assert np.all(masses(P, mine) <= c + 1e-3)
        assert entropy(mine) >= h_ref - 1e-3
    # a constant tensor is the scalar case, bit for bit
    same = adaptive_prior(probs, labels, c_bg=0.3, c_fg=torch.full((B, C), 0.15, dtype=torch.float64))
    assert torch.equal(same, adaptive_prior(probs, labels, c_bg=0.3, c_fg=0.15))


def test_size_mode_changes_the_targets_as_object_fraction(tiny_overrides):
    from weakseg.losses.objective import weak_loss

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 21, 8, 8, generator=g)
    labels = torch.zeros(2, 21)
    labels[:, 0] = 1
    labels[0, 3] = labels[1, 7] = labels[1, 9] = 1
    image = torch.rand(2, 3, 32, 32, generator=g) * 255
    size = load_config("demo", ["loss.c_fg_mode=size", "loss.object_fraction=0.06", "loss.variant=none"]).loss
    fixed = load_config("demo", ["loss.c_fg=0.06", "loss.variant=none"]).loss
    assert float(weak_loss(logits, labels, image, size, 0.0).cls) == float(weak_loss(logits, labels, image, fixed, 0.0).cls)
