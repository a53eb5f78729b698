"""Segmentation metrics: the one confusion matrix (mIoU) and boundary quality.

`ConfusionMatrix` is the only mIoU implementation in weakseg: training-time
validation, `weakseg evaluate` and search trials all use it, so their numbers
agree. `BoundaryMetrics` measures what the neighbourhood loss is meant to
improve, the alignment of predicted and true object boundaries:

- Boundary IoU: B. Cheng, R. Girshick, P. Dollár, A. C. Berg, A. Kirillov,
  "Boundary IoU: Improving Object-Centric Image Segmentation Evaluation",
  CVPR 2021.
- Trimap accuracy: P. Kohli, L. Ladický, P. H. S. Torr, "Robust higher order
  potentials for enforcing label consistency", IJCV 2009; reported near object
  boundaries by DeepLab (Chen et al., ICLR 2015) and CRF-as-RNN
  (Zheng et al., ICCV 2015).

Every metric ignores pixels whose ground truth is `ignore_index` (VOC "void").
Boundary IoU's bands are the official implementation's (erosion by a 3×3
square, i.e. chessboard distance); trimap bands follow label boundaries from
scikit-image (`segmentation.find_boundaries`) with scipy's exact Euclidean
distance transform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import find_boundaries

from weakseg.data.classes import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES

__all__ = [
    "SegMetrics",
    "ConfusionMatrix",
    "BoundaryResult",
    "BoundaryMetrics",
    "boundary_band",
    "boundary_band_euclidean",
    "trimap_distance",
]


def _default_names(num_classes: int, class_names: Sequence[str] | None) -> tuple[str, ...]:
    if class_names is None:
        if num_classes == NUM_CLASSES:
            return VOC_CLASSES
        return tuple(str(c) for c in range(num_classes))
    names = tuple(str(n) for n in class_names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return names


def _nanmean(x: np.ndarray) -> float:
    """Mean over the finite entries; NaN (without a warning) when there are none."""
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den as float64, NaN where den == 0 (undefined, not zero)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a)  # own copy, so freezing it cannot touch the caller's array
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class SegMetrics:
    """Metrics from one confusion matrix.

    `iou[c]` is NaN when class c has no union, i.e. it occurs neither in the
    ground truth nor in the predictions; such classes are left out of `miou`
    (a NaN-mean), as the VOC devkit leaves out classes that do not occur.
    On the full VOC 2012 val set every class occurs, so `miou` is then the
    plain mean over all 21 classes. A class that is predicted but absent from
    the ground truth has IoU 0 and does count.
    """

    matrix: np.ndarray  # (C, C) int64, rows = ground truth, cols = prediction
    iou: np.ndarray  # (C,) float64, NaN where undefined
    miou: float
    pixel_acc: float  # correct / labelled pixels
    class_acc: np.ndarray  # (C,) float64 per-class recall, NaN where the class has no GT pixel
    mean_acc: float  # NaN-mean of class_acc
    class_names: tuple[str, ...]

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat scalars for logging, e.g. `{"val/miou": ..., "val/iou/cat": ...}`."""
        out = {
            f"{prefix}miou": self.miou,
            f"{prefix}pixel_acc": self.pixel_acc,
            f"{prefix}mean_acc": self.mean_acc,
        }
        for name, v in zip(self.class_names, self.iou):
            out[f"{prefix}iou/{name}"] = float(v)
        return out

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, class_names: Sequence[str] | None = None) -> "SegMetrics":
        """Derive every metric from a (C, C) matrix (rows = ground truth)."""
        h = np.asarray(matrix)
        if h.ndim != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"confusion matrix must be square (C, C), got shape {h.shape}")
        h = h.astype(np.int64)
        tp = np.diag(h)
        gt = h.sum(axis=1)
        pr = h.sum(axis=0)
        iou = _ratio(tp, gt + pr - tp)
        class_acc = _ratio(tp, gt)
        total = h.sum()
        return cls(
            matrix=_frozen(h),
            iou=_frozen(iou),
            miou=_nanmean(iou),
            pixel_acc=float(tp.sum() / total) if total > 0 else math.nan,
            class_acc=_frozen(class_acc),
            mean_acc=_nanmean(class_acc),
            class_names=_default_names(h.shape[0], class_names),
        )


def _scatter_count(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Histogram of `idx` in [0, n) with no host synchronisation.

    `torch.bincount` on CUDA reads `idx.min()` and `idx.max()` back to the host
    to size its output; a scatter-add into a fixed-size buffer does not.
    """
    out = torch.zeros(n, dtype=torch.int64, device=idx.device)
    return out.scatter_add_(0, idx, torch.ones_like(idx))


def _count(idx: torch.Tensor, n: int) -> torch.Tensor:
    if idx.device.type == "cpu":
        return torch.bincount(idx, minlength=n)
    return _scatter_count(idx, n)


def _as_tensor(x, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach() if device is None else x.detach().to(device)
    return torch.as_tensor(np.asarray(x), device=device)


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix over a data set, on the inputs' device.

    `update` adds `bincount(C * target + pred)` over the pixels whose target is
    not `ignore_index`, as torchvision's segmentation references do
    (`torch.bincount` on the CPU; on accelerators a scatter-add into a fixed
    buffer, because CUDA's bincount reads min/max back to the host). The
    counts stay in int64 on the device of the first update and nothing is
    read back until `compute`, so it costs no GPU sync per batch.

    Predictions outside [0, C) and targets outside [0, C) that are not
    `ignore_index` are bugs upstream (the data layer validates mask files):
    they raise ValueError, at once for CPU tensors and at `compute` for tensors
    on an accelerator (checking earlier would need a sync).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id in [0, {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = _default_names(num_classes, class_names)
        # C*C cells, then three overflow bins: ignored, bad prediction, bad target.
        self._counts: torch.Tensor | None = None

    @property
    def _nbins(self) -> int:
        return self.num_classes * self.num_classes + 3

    def reset(self) -> None:
        self._counts = None

    def update(self, pred, target) -> None:
        """Add one batch: `pred`, `target` integer label maps of equal shape, e.g. (B, H, W).

        Accepts tensors (any device, integer or integer-valued float dtype) or
        numpy arrays; `target` is moved to `pred`'s device.
        """
        pred = _as_tensor(pred)
        target = _as_tensor(target, device=pred.device)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if self._counts is not None and self._counts.device != pred.device:
            raise ValueError(f"update on {pred.device} but the matrix lives on {self._counts.device}")
        C = self.num_classes
        p = pred.reshape(-1)
        t = target.reshape(-1)
        if p.is_floating_point():
            p_ok = (p >= 0) & (p < C) & (p == torch.floor(p))
        else:
            p_ok = (p >= 0) & (p < C)
        if t.is_floating_point():
            t_ok = (t >= 0) & (t < C) & (t == torch.floor(t))
        else:
            t_ok = (t >= 0) & (t < C)
        t_ign = t == self.ignore_index
        p = p.to(torch.int64)
        t = t.to(torch.int64)
        cell = C * t.clamp(0, C - 1) + p.clamp(0, C - 1)
        # Ignored pixels go to bin C*C; a bad target beats a bad prediction.
        idx = torch.where(p_ok, cell, C * C + 1)
        idx = torch.where(t_ok, idx, C * C + 2)
        idx = torch.where(t_ign, C * C, idx)
        counts = _count(idx, self._nbins)
        if counts.device.type == "cpu":
            self._check(counts)
        self._counts = counts if self._counts is None else self._counts + counts

    def _check(self, counts: torch.Tensor) -> None:
        C = self.num_classes
        bad_pred = int(counts[C * C + 1])
        bad_target = int(counts[C * C + 2])
        if bad_pred:
            raise ValueError(f"{bad_pred} predictions outside [0, {C}) (class ids must be integers 0..{C - 1})")
        if bad_target:
            raise ValueError(
                f"{bad_target} target pixels outside [0, {C}) that are not ignore_index {self.ignore_index}"
            )

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add `other`'s counts into this one (e.g. from another worker); returns self."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot merge {type(other).__name__} into ConfusionMatrix")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a matrix of {other.num_classes} classes (ignore {other.ignore_index}) "
                f"into one of {self.num_classes} classes (ignore {self.ignore_index})"
            )
        if other._counts is None:
            return self
        if self._counts is None:
            self._counts = other._counts.clone()
        else:
            self._counts = self._counts + other._counts.to(self._counts.device)
        return self

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        out = ConfusionMatrix(self.num_classes, self.ignore_index, self.class_names)
        return out.merge(self).merge(other)

    def all_reduce(self) -> None:
        """Sum the counts over all `torch.distributed` ranks (no-op when not initialised)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if self._counts is None:
            raise RuntimeError("all_reduce before any update: every rank must hold counts on the same device")
        torch.distributed.all_reduce(self._counts)

    @property
    def matrix(self) -> np.ndarray:
        """(C, C) int64 counts on the host (rows = ground truth, cols = prediction)."""
        C = self.num_classes
        if self._counts is None:
            return np.zeros((C, C), dtype=np.int64)
        return self._counts[: C * C].reshape(C, C).cpu().numpy().astype(np.int64)

    @classmethod
    def from_matrix(
        cls,
        matrix: np.ndarray,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
    ) -> "ConfusionMatrix":
        """Rebuild an accumulator from saved (C, C) counts, e.g. a worker's result."""
        m = np.asarray(matrix)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"confusion matrix must be square (C, C), got shape {m.shape}")
        if (m < 0).any():
            raise ValueError("confusion matrix has negative counts")
        cm = cls(m.shape[0], ignore_index, class_names)
        counts = torch.zeros(cm._nbins, dtype=torch.int64)
        counts[: m.size] = torch.as_tensor(m.astype(np.int64).reshape(-1))
        cm._counts = counts
        return cm

    def compute(self) -> SegMetrics:
        if self._counts is not None:
            self._check(self._counts.cpu())
        return SegMetrics.from_matrix(self.matrix, self.class_names)

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index})"


# ---------------------------------------------------------------------------
# Boundary quality
# ---------------------------------------------------------------------------


def _to_label_map(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a (H, W) label map, got shape {a.shape}")
    if a.dtype.kind == "f":
        if not np.all(a == np.floor(a)):
            raise ValueError(f"{name} has non-integer labels")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"{name} has dtype {a.dtype}, expected integer labels")
    return a.astype(np.int64)


def _band(mask: np.ndarray, distance: float, metric: str) -> np.ndarray:
    """Pixels of `mask` within `distance` (in `metric`) of the nearest pixel outside it.

    Pixels beyond the image border count as outside, so a mask cut by the border
    has a contour there. The distance transform only needs the mask's bounding
    box plus a one-pixel ring of non-mask pixels: every pixel outside the box is
    non-mask, and clamping any of them into the ring only brings it closer.
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(mask[r0:r1, c0:c1], 1)  # (h + 2, w + 2), False ring
    if metric == "chessboard":
        dist = ndimage.distance_transform_cdt(crop, metric="chessboard")
    else:
        dist = ndimage.distance_transform_edt(crop)
    out[r0:r1, c0:c1] = (dist <= distance)[1:-1, 1:-1] & crop[1:-1, 1:-1]
    return out


def boundary_band(mask: np.ndarray, distance: int) -> np.ndarray:
    """Boundary IoU's `G_d ∩ G` exactly as the official code computes it.

    Cheng et al.'s `mask_to_boundary` pads the mask with one ring of zeros,
    erodes it `d` times with a 3×3 square and keeps `mask − eroded`: the mask
    pixels within chessboard distance d of a pixel outside the mask (the
    image border counting as outside). `distance=1` keeps the 8-connected
    inner contour.
    """
    return _band(mask, distance, "chessboard")


def boundary_band_euclidean(mask: np.ndarray, distance: float) -> np.ndarray:
    """The paper's wording of `G_d ∩ G` with a Euclidean band instead of the code's chessboard one.

    Mask pixels whose centre lies within Euclidean `distance` of a pixel
    outside the mask. Thinner than `boundary_band` at the same d away from
    axis-aligned edges; kept for comparison, not used by `BoundaryMetrics`.
    """
    return _band(mask, distance, "euclidean")


def _boundary_pixels(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of a different label (both sides of every edge; the image border is none)."""
    return find_boundaries(labels, connectivity=1, mode="thick")


def trimap_distance(target: np.ndarray) -> np.ndarray:
    """(H, W) Euclidean distance of each pixel to the nearest ground-truth boundary pixel.

    Boundary pixels are those with a 4-neighbour of a different label, void
    included as a label of its own, so the band also follows VOC's void
    outlines, as in DeepLab's trimap. The image border is not a boundary.
    Infinite everywhere when the target holds a single label.
    """
    b = _boundary_pixels(np.asarray(target))
    if not b.any():
        return np.full(b.shape, np.inf)
    return ndimage.distance_transform_edt(~b)


@dataclass(frozen=True, eq=False)
class BoundaryResult:
    """Boundary metrics over a data set.

    `iou[c] = intersection[c] / union[c]`, summed over images as for mIoU; NaN
    when class c has no boundary pixel in any ground truth or prediction, and
    then left out of `miou`. `trimap_acc[k]` is the pixel accuracy over
    labelled pixels within `trimap_widths[k]` px of a ground-truth boundary
    (distance < width, so width 1 is the boundary pixels themselves, one on
    each side of an edge); `trimap_miou[k]` is the mIoU over the same band.
    """

    intersection: np.ndarray  # (C,) int64
    union: np.ndarray  # (C,) int64
    iou: np.ndarray  # (C,) float64
    miou: float
    trimap_widths: tuple[int, ...]
    trimap_acc: np.ndarray  # (K,) float64
    trimap_miou: np.ndarray  # (K,) float64
    trimap_matrix: np.ndarray  # (K, C, C) int64 confusion matrices in each band
    class_names: tuple[str, ...]

    @property
    def mean_boundary_iou(self) -> float:
        """Same as `miou`, under the name the evaluation loop reads."""
        return self.miou

    @property
    def trimap(self) -> dict[int, float]:
        """Trimap accuracy by band width in px."""
        return {w: float(a) for w, a in zip(self.trimap_widths, self.trimap_acc)}

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat scalars for logging, e.g. `{"val/biou": ..., "val/trimap_acc/4px": ...}`."""
        out = {f"{prefix}biou": self.miou}
        for name, v in zip(self.class_names, self.iou):
            out[f"{prefix}biou/{name}"] = float(v)
        for w, acc, miou in zip(self.trimap_widths, self.trimap_acc, self.trimap_miou):
            out[f"{prefix}trimap_acc/{w}px"] = float(acc)
            out[f"{prefix}trimap_miou/{w}px"] = float(miou)
        return out


class BoundaryMetrics:
    """Accumulates Boundary IoU (Cheng et al., CVPR 2021) and trimap accuracy (Kohli et al., IJCV 2009).

    Per class c and image, with G = (target == c), P = (pred == c) and d =
    max(1, round(dilation_ratio × image diagonal)) pixels, it adds
    |(G_d ∩ G) ∩ (P_d ∩ P)| and |(G_d ∩ G) ∪ (P_d ∩ P)| (see `boundary_band`)
    counted over labelled pixels only: void pixels shape the contours (void is
    "not c") but are never counted, as the official Boundary PQ code drops
    prediction pixels that fall on void. The default ratio 0.02 is the one
    the official API uses for COCO instance and panoptic (things and stuff)
    evaluation; the paper defines no separate semantic-segmentation protocol.
    For a 500×375 VOC image d = 12 px.

    Work is on the CPU (scipy's chessboard distance transform, one per class
    present per mask, cropped to the class's bounding box).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        dilation_ratio: float = 0.02,
        trimap_widths: Sequence[int] = (1, 2, 4, 8, 16),
        class_names: Sequence[str] | None = None,
    ) -> None:
        if not dilation_ratio > 0:
            raise ValueError(f"dilation_ratio must be > 0, got {dilation_ratio}")
        widths = tuple(int(w) for w in trimap_widths)
        if any(w < 1 for w in widths) or list(widths) != sorted(set(widths)):
            raise ValueError(f"trimap_widths must be increasing integers >= 1, got {tuple(trimap_widths)}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id in [0, {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.dilation_ratio = float(dilation_ratio)
        self.trimap_widths = widths
        self.class_names = _default_names(num_classes, class_names)
        self.reset()

    def reset(self) -> None:
        C, K = self.num_classes, len(self.trimap_widths)
        self._inter = np.zeros(C, dtype=np.int64)
        self._union = np.zeros(C, dtype=np.int64)
        self._trimap = np.zeros((K, C, C), dtype=np.int64)

    def dilation(self, height: int, width: int) -> int:
        """Band width d in pixels for an image of this size (at least 1)."""
        return max(1, int(round(self.dilation_ratio * math.hypot(height, width))))

    def update(self, pred, target) -> None:
        """Add one image: `pred`, `target` (H, W) label maps (numpy or tensors)."""
        p = _to_label_map(pred, "pred")
        t = _to_label_map(target, "target")
        if p.shape != t.shape:
            raise ValueError(f"pred shape {p.shape} != target shape {t.shape}")
        C = self.num_classes
        if p.size and (p.min() < 0 or p.max() >= C):
            raise ValueError(f"predictions outside [0, {C})")
        valid = t != self.ignore_index
        if ((t[valid] < 0) | (t[valid] >= C)).any():
            raise ValueError(f"target pixels outside [0, {C}) that are not ignore_index {self.ignore_index}")

        d = self.dilation(*t.shape)
        present = np.union1d(np.unique(t[valid]), np.unique(p))
        for c in present:
            g = boundary_band(t == c, d)
            q = boundary_band(p == c, d)
            self._inter[c] += np.count_nonzero(g & q & valid)
            self._union[c] += np.count_nonzero((g | q) & valid)

        dist = trimap_distance(t)
        cells = C * t + p
        for k, w in enumerate(self.trimap_widths):
            sel = valid & (dist < w)
            self._trimap[k] += np.bincount(cells[sel], minlength=C * C).reshape(C, C)

    def merge(self, other: "BoundaryMetrics") -> "BoundaryMetrics":
        """Add `other`'s sums into this one; returns self."""
        same = (
            other.num_classes == self.num_classes
            and other.ignore_index == self.ignore_index
            and other.dilation_ratio == self.dilation_ratio
            and other.trimap_widths == self.trimap_widths
        )
        if not same:
            raise ValueError("cannot merge BoundaryMetrics with different classes, ignore index, ratio or widths")
        self._inter += other._inter
        self._union += other._union
        self._trimap += other._trimap
        return self

    def __add__(self, other: "BoundaryMetrics") -> "BoundaryMetrics":
        out = BoundaryMetrics(
            self.num_classes, self.ignore_index, self.dilation_ratio, self.trimap_widths, self.class_names
        )
        return out.merge(self).merge(other)

    def compute(self) -> BoundaryResult:
        iou = _ratio(self._inter, self._union)
        tp = np.diagonal(self._trimap, axis1=1, axis2=2)  # (K, C)
        total = self._trimap.sum(axis=(1, 2))  # (K,)
        acc = _ratio(tp.sum(axis=1), total)
        union = self._trimap.sum(axis=2) + self._trimap.sum(axis=1) - tp  # (K, C)
        band_iou = _ratio(tp, union)
        trimap_miou = np.array([_nanmean(row) for row in band_iou])
        return BoundaryResult(
            intersection=_frozen(self._inter),
            union=_frozen(self._union),
            iou=_frozen(iou),
            miou=_nanmean(iou),
            trimap_widths=self.trimap_widths,
            trimap_acc=_frozen(acc),
            trimap_miou=_frozen(trimap_miou),
            trimap_matrix=_frozen(self._trimap),
            class_names=self.class_names,
        )
