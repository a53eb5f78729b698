"""Is weak training learning anything? Image-level checks computed from the predictions.

A weakly supervised model can settle on "background everywhere" and still
lower its loss: the pixel labels q come from its own p, so an uninformative p
gives uninformative targets. Two symptoms are cheap to see at every evaluation:

* the network does not know which classes an image holds: the per-class AUC
  of the pooled prediction max_pixels p(c) against the image labels is near
  chance (0.5);
* it predicts (almost) no foreground: the share of pixels whose argmax is an
  object class is a small part of the true one (val has masks).

`ImageLevelMeter` gathers both during `engine.evaluate`; `collapse_scalars`
turns them into the reported `val/collapsed` flag after a warm-up.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from torch import Tensor

from weakseg.data.classes import IGNORE_INDEX, VOC_CLASSES

COLLAPSE_FG = 0.1  # predicted foreground below this share of the true foreground: "all background"


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting ½.

    Mann–Whitney U from average ranks; NaN when either class is absent.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average rank (1-based) over each run of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """AP = Σ_k (R_k − R_{k−1}) P_k over the distinct score thresholds, highest first (tied scores form one step).

    NaN when there is no positive.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last item of each run of tied scores
    tp = np.cumsum(y)[last]
    seen = (np.flatnonzero(last) + 1).astype(np.float64)
    precision, recall = tp / seen, tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


class ImageLevelMeter:
    """Pooled class scores, image labels and foreground shares over an evaluation."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.scores: list[np.ndarray] = []  # (C-1,) max over pixels of p(c), object classes
        self.labels: list[np.ndarray] = []  # (C-1,) 0/1
        self.fg_pred: list[float] = []
        self.fg_true: list[float] = []

    def add_probs(self, probs: Tensor, labels: Tensor) -> None:
        """probs (C, H, W) softmax; labels (C,) image-level 0/1 (background entry ignored)."""
        self.scores.append(probs[1:].flatten(1).amax(1).float().cpu().numpy())
        self.labels.append((labels[1:] > 0.5).cpu().numpy())

    def add_prediction(self, pred: Tensor, mask: Tensor) -> None:
        """pred, mask (H, W): the shares of non-void pixels that are foreground, predicted and true."""
        real = mask != IGNORE_INDEX
        n = int(real.sum())
        if n:
            self.fg_pred.append(float(((pred != 0) & real).sum()) / n)
            self.fg_true.append(float(((mask != 0) & real).sum()) / n)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.scores:
            s, y = np.stack(self.scores), np.stack(self.labels)
            aucs = [roc_auc(s[:, k], y[:, k]) for k in range(s.shape[1])]
            aps = [average_precision(s[:, k], y[:, k]) for k in range(s.shape[1])]
            aucs_ok = [a for a in aucs if not math.isnan(a)]
            aps_ok = [a for a in aps if not math.isnan(a)]
            out["image_auc"] = float(np.mean(aucs_ok)) if aucs_ok else math.nan
            out["image_map"] = float(np.mean(aps_ok)) if aps_ok else math.nan
            out["classes_per_image"] = float(y.sum(1).mean())
            for k, a in enumerate(aucs):
                if not math.isnan(a):
                    out[f"image_auc/{VOC_CLASSES[k + 1]}"] = a
        if self.fg_pred:
            out["fg_fraction"] = float(np.mean(self.fg_pred))
            out["fg_fraction_true"] = float(np.mean(self.fg_true))
        return out


def object_iou(iou: np.ndarray) -> float:
    """Mean IoU over the object classes (background excluded), NaN classes skipped."""
    vals = [float(v) for v in np.asarray(iou)[1:] if not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else math.nan


def fg_demand(classes_per_image: float, c_bg: float, c_fg: float) -> float:
    """The foreground share the prior asks for on an image with this many object classes: Σ c_fg, capped by c_bg."""
    return min(classes_per_image * c_fg, 1.0 - c_bg) if classes_per_image > 0 else 0.0


def collapse_scalars(scalars: dict[str, float], prefix: str, armed: bool, min_auc: float) -> tuple[dict[str, float], str]:
    """`{prefix}/collapsed` (1.0 or 0.0) and the reason; only `armed` (after the warm-up) can it be 1."""
    reasons = []
    fg, fg_true = scalars.get(f"{prefix}/fg_fraction"), scalars.get(f"{prefix}/fg_fraction_true")
    if fg is not None and fg_true is not None and fg_true > 0 and fg < COLLAPSE_FG * fg_true:
        reasons.append(f"predicted foreground {100 * fg:.1f}% of the pixels against {100 * fg_true:.1f}% true")
    auc = scalars.get(f"{prefix}/image_auc")
    if auc is not None and not math.isnan(auc) and auc < min_auc:
        reasons.append(f"image-level AUC {auc:.2f} (chance: 0.5)")
    collapsed = armed and bool(reasons)
    return {f"{prefix}/collapsed": float(collapsed)}, "; ".join(reasons) if collapsed else ""
