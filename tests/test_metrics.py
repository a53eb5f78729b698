"""Confusion matrix, mIoU, Boundary IoU and trimap accuracy against hand-computed and brute-force oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weakseg.data.classes import VOC_CLASSES
from weakseg.metrics import (
    BoundaryMetrics,
    ConfusionMatrix,
    SegMetrics,
    _scatter_count,
    boundary_band,
    boundary_band_euclidean,
)

IGN = 255


# ---------------------------------------------------------------------------
# Confusion matrix and mIoU
# ---------------------------------------------------------------------------


def test_hand_computed_three_classes():
    target = np.array([[0, 0, 1, 1], [2, 2, IGN, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(torch.as_tensor(pred), torch.as_tensor(target))
    m = cm.compute()
    # (gt, pred) pairs without the void pixel: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,0)
    expected = np.array([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    np.testing.assert_array_equal(m.matrix, expected)
    assert m.matrix.dtype == np.int64
    # class 0: tp 1, gt 2, pred 3 -> 1/4; class 1: 2/(3+3-2); class 2: 1/(2+1-1)
    np.testing.assert_allclose(m.iou, [0.25, 0.5, 0.5])
    assert m.miou == pytest.approx(1.25 / 3)
    assert m.pixel_acc == pytest.approx(4 / 7)
    np.testing.assert_allclose(m.class_acc, [1 / 2, 2 / 3, 1 / 2])
    assert m.mean_acc == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_absent_class_is_nan_and_excluded_but_false_positive_class_counts():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 3, 1, 1])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    m = cm.compute()
    # class 0: 1/(2+1-1) = .5; class 1: 2/2 = 1; class 2: absent -> NaN; class 3: 0/(0+1) = 0
    assert m.iou[0] == pytest.approx(0.5)
    assert m.iou[1] == pytest.approx(1.0)
    assert math.isnan(m.iou[2])
    assert m.iou[3] == 0.0
    assert m.miou == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert math.isnan(m.class_acc[2]) and math.isnan(m.class_acc[3])
    assert m.mean_acc == pytest.approx((0.5 + 1.0) / 2)


def _random_pair(rng, shape, C, void_frac=0.15):
    target = rng.integers(0, C, size=shape)
    target[rng.random(shape) < void_frac] = IGN
    pred = rng.integers(0, C, size=shape)
    return pred, target


def test_matches_brute_force_double_loop():
    rng = np.random.default_rng(0)
    C = 5
    pred, target = _random_pair(rng, (13, 17), C)
    expected = np.zeros((C, C), dtype=np.int64)
    for i in range(target.shape[0]):
        for j in range(target.shape[1]):
            if target[i, j] != IGN:
                expected[target[i, j], pred[i, j]] += 1
    cm = ConfusionMatrix(C)
    cm.update(torch.as_tensor(pred), torch.as_tensor(target))
    np.testing.assert_array_equal(cm.compute().matrix, expected)
    assert expected.sum() == np.count_nonzero(target != IGN)


def test_matches_np_add_at_on_voc_sized_batches():
    rng = np.random.default_rng(1)
    C = len(VOC_CLASSES)
    cm = ConfusionMatrix()
    expected = np.zeros((C, C), dtype=np.int64)
    for _ in range(3):
        pred, target = _random_pair(rng, (2, 37, 41), C)
        keep = target != IGN
        np.add.at(expected, (target[keep], pred[keep]), 1)
        cm.update(torch.as_tensor(pred), torch.as_tensor(target.astype(np.uint8)))
    m = cm.compute()
    np.testing.assert_array_equal(m.matrix, expected)
    assert m.class_names == VOC_CLASSES
    tp = np.diag(expected).astype(float)
    np.testing.assert_allclose(m.iou, tp / (expected.sum(0) + expected.sum(1) - tp))


def test_merge_of_halves_equals_whole():
    rng = np.random.default_rng(2)
    pred, target = _random_pair(rng, (20, 24), 6)
    whole = ConfusionMatrix(6)
    whole.update(pred, target)
    a, b = ConfusionMatrix(6), ConfusionMatrix(6)
    a.update(pred[:11], target[:11])
    b.update(pred[11:], target[11:])
    np.testing.assert_array_equal((a + b).compute().matrix, whole.compute().matrix)
    np.testing.assert_array_equal(a.compute().matrix + b.compute().matrix, whole.compute().matrix)
    a.merge(b)
    np.testing.assert_array_equal(a.compute().matrix, whole.compute().matrix)
    # An empty matrix is neutral; rebuilding from saved counts round-trips.
    assert (ConfusionMatrix(6) + whole).compute().miou == whole.compute().miou
    again = ConfusionMatrix.from_matrix(whole.compute().matrix)
    again.update(pred, target)
    np.testing.assert_array_equal(again.compute().matrix, 2 * whole.compute().matrix)
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(7))


@pytest.mark.parametrize(
    "pdtype,tdtype",
    [(torch.float64, torch.float64), (torch.int32, torch.uint8), (torch.int64, torch.int16), (torch.uint8, torch.int64)],
)
def test_dtypes_agree(pdtype, tdtype):
    rng = np.random.default_rng(3)
    pred, target = _random_pair(rng, (9, 10), 4)
    expected = np.zeros((4, 4), dtype=np.int64)
    keep = target != IGN
    np.add.at(expected, (target[keep], pred[keep]), 1)
    cm = ConfusionMatrix(4)
    cm.update(torch.as_tensor(pred).to(pdtype), torch.as_tensor(target).to(tdtype))
    np.testing.assert_array_equal(cm.compute().matrix, expected)


def test_bad_values_raise_and_leave_counts_untouched():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="predictions outside"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="predictions outside"):
        cm.update(torch.tensor([0, -1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="predictions outside"):
        cm.update(torch.tensor([0.0, 1.5], dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    # Void pixels are skipped entirely, and the failed updates above added nothing.
    cm.update(torch.tensor([2]), torch.tensor([IGN]))
    np.testing.assert_array_equal(cm.compute().matrix, [[1, 0, 0], [0, 1, 0], [0, 0, 0]])


def test_reset_and_as_dict():
    cm = ConfusionMatrix(2, class_names=("bg", "fg"))
    cm.update(torch.tensor([1, 1]), torch.tensor([0, 1]))
    d = cm.compute().as_dict("val/")
    assert d["val/iou/fg"] == pytest.approx(0.5)  # tp 1, union 2
    assert d["val/iou/bg"] == 0.0
    assert d["val/miou"] == pytest.approx(0.25)
    cm.reset()
    assert cm.compute().matrix.sum() == 0
    assert math.isnan(cm.compute().miou)


def test_scatter_count_path_matches_numpy_bincount():
    # The sync-free path used on accelerators, exercised on the CPU.
    idx = torch.as_tensor(np.random.default_rng(4).integers(0, 30, size=1000))
    np.testing.assert_array_equal(_scatter_count(idx, 33).numpy(), np.bincount(idx.numpy(), minlength=33))


def test_segmetrics_from_matrix_is_frozen():
    m = SegMetrics.from_matrix(np.array([[3, 1], [0, 2]]))
    with pytest.raises(ValueError):
        m.iou[0] = 1.0
    with pytest.raises(AttributeError):
        m.miou = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Boundary IoU: brute-force oracle
# ---------------------------------------------------------------------------


def _oracle_band(mask: np.ndarray, d: float) -> np.ndarray:
    """The official Boundary IoU band by its own recipe, in loops: pad with a ring of
    zeros, erode d times with a 3×3 square, keep mask − eroded."""
    H, W = mask.shape
    cur = np.zeros((H + 2, W + 2), dtype=bool)
    cur[1:-1, 1:-1] = mask
    for _ in range(int(d)):
        nxt = np.zeros_like(cur)
        for r in range(H + 2):
            for c in range(W + 2):
                # cv2.erode's default border counts beyond the padded frame as set
                nxt[r, c] = all(cur[rr, cc] if 0 <= rr < H + 2 and 0 <= cc < W + 2 else True
                                for rr in (r - 1, r, r + 1) for cc in (c - 1, c, c + 1))
        cur = nxt
    return mask & ~cur[1:-1, 1:-1]


def _oracle_band_euclidean(mask: np.ndarray, d: float) -> np.ndarray:
    """Mask pixels within Euclidean distance d of a pixel outside the mask (the padded frame included)."""
    H, W = mask.shape
    outside = [(r, c) for r in range(-1, H + 1) for c in range(-1, W + 1)
               if not (0 <= r < H and 0 <= c < W and mask[r, c])]
    band = np.zeros_like(mask, dtype=bool)
    for r in range(H):
        for c in range(W):
            if mask[r, c]:
                band[r, c] = min(math.hypot(r - cr, c - cc) for cr, cc in outside) <= d
    return band


def _blobby(rng, shape, C, void=True):
    coarse = rng.integers(0, C, size=(3, 4))
    lab = np.kron(coarse, np.ones((shape[0] // 3 + 1, shape[1] // 4 + 1), dtype=np.int64))[: shape[0], : shape[1]]
    noise = rng.random(shape) < 0.08
    lab[noise] = rng.integers(0, C, size=noise.sum())
    if void:
        lab[rng.random(shape) < 0.1] = IGN
    return lab


@pytest.mark.parametrize("d", [1, 2, 3])
def test_boundary_band_matches_oracle(d):
    rng = np.random.default_rng(10 + d)
    for _ in range(3):
        mask = _blobby(rng, (11, 13), 3, void=False) == 1
        np.testing.assert_array_equal(boundary_band(mask, d), _oracle_band(mask, d))
        np.testing.assert_array_equal(boundary_band_euclidean(mask, d), _oracle_band_euclidean(mask, d))
    yy, xx = np.mgrid[:15, :15]
    disc = (yy - 7) ** 2 + (xx - 7) ** 2 <= 36
    np.testing.assert_array_equal(boundary_band(disc, d), _oracle_band(disc, d))
    np.testing.assert_array_equal(boundary_band_euclidean(disc, 2.5), _oracle_band_euclidean(disc, 2.5))


@pytest.mark.parametrize(("d", "chessboard", "euclidean"), [(1, 48, 44), (2, 96, 84)])
def test_boundary_band_by_hand(d, chessboard, euclidean):
    # An 11×11 mask with a one-pixel hole at its centre. The image border is a contour:
    # d rings of it are in the band (40 pixels at d = 1, 121 − 49 = 72 at d = 2). Around the
    # hole the official 3×3 erosion takes the (2d+1)² square (8, 24 pixels), the Euclidean
    # band only offsets with dr² + dc² ≤ d² (4, 12 pixels).
    mask = np.ones((11, 11), dtype=bool)
    mask[5, 5] = False
    assert boundary_band(mask, d).sum() == chessboard
    assert boundary_band_euclidean(mask, d).sum() == euclidean


def test_dilation_width():
    bm = BoundaryMetrics()
    assert bm.dilation(300, 400) == 10  # 0.02 × 500
    assert bm.dilation(10, 10) == 1  # 0.28 px, at least one
    assert bm.dilation(375, 500) == 12  # a typical VOC image: 0.02 × 625 = 12.5


def test_boundary_iou_matches_brute_force_with_void():
    rng = np.random.default_rng(20)
    C, H, W = 3, 12, 14
    # ratio chosen so d = round(0.15 * hypot(12, 14)) = round(2.77) = 3
    bm = BoundaryMetrics(num_classes=C, dilation_ratio=0.15, trimap_widths=(1,))
    inter = np.zeros(C)
    union = np.zeros(C)
    for _ in range(3):
        target = _blobby(rng, (H, W), C)
        pred = _blobby(rng, (H, W), C, void=False)
        bm.update(pred, target)
        valid = target != IGN
        for c in range(C):
            g = _oracle_band(target == c, 3)
            p = _oracle_band(pred == c, 3)
            inter[c] += np.sum(g & p & valid)
            union[c] += np.sum((g | p) & valid)
    r = bm.compute()
    np.testing.assert_array_equal(r.intersection, inter)
    np.testing.assert_array_equal(r.union, union)
    np.testing.assert_allclose(r.iou, inter / union)
    assert r.miou == pytest.approx(np.mean(inter / union))


def test_boundary_iou_identical_masks_is_one_and_absent_is_nan():
    rng = np.random.default_rng(21)
    target = _blobby(rng, (20, 20), 3, void=False)
    pred = target.copy()
    bm = BoundaryMetrics(num_classes=5)
    bm.update(pred, target)
    r = bm.compute()
    np.testing.assert_allclose(r.iou[:3], 1.0)
    assert math.isnan(r.iou[3]) and math.isnan(r.iou[4])
    assert r.miou == pytest.approx(1.0) and r.mean_boundary_iou == r.miou


def test_boundary_iou_shifted_square_by_hand():
    # 40x40, square rows 10..19 x cols 10..19; prediction shifted right by 2; d = 1.
    target = np.zeros((40, 40), dtype=np.int64)
    target[10:20, 10:20] = 1
    pred = np.zeros_like(target)
    pred[10:20, 12:22] = 1
    bm = BoundaryMetrics(num_classes=2, dilation_ratio=1e-3)
    assert bm.dilation(40, 40) == 1
    bm.update(pred, target)
    r = bm.compute()
    # Class 1: each band is the square's 36-pixel perimeter; they share the top
    # and bottom rows over cols 12..19 (8 + 8): 16 / (36 + 36 - 16).
    assert r.intersection[1] == 16 and r.union[1] == 56
    assert r.iou[1] == pytest.approx(2 / 7)
    # Class 0: the 156-pixel image border is in both bands; the 44 pixels
    # 8-adjacent to each square (the 3×3 erosion) overlap in rows 9 and 20 over cols 11..20.
    assert r.intersection[0] == 156 + 20 and r.union[0] == 156 + 44 + 44 - 20
    assert r.iou[0] == pytest.approx(176 / 224)
    # A shift never seen by mIoU-sized numbers: mask IoU of class 1 is 80/120.
    assert r.iou[1] < 80 / 120


# ---------------------------------------------------------------------------
# Trimap accuracy
# ---------------------------------------------------------------------------


def _oracle_trimap(pred, target, widths):
    H, W = target.shape
    bnd = [
        (r, c)
        for r in range(H)
        for c in range(W)
        if any(
            0 <= r + dr < H and 0 <= c + dc < W and target[r + dr, c + dc] != target[r, c]
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
        )
    ]
    correct = np.zeros(len(widths))
    total = np.zeros(len(widths))
    for r in range(H):
        for c in range(W):
            if target[r, c] == IGN or not bnd:
                continue
            dist = min(math.hypot(r - br, c - bc) for br, bc in bnd)
            for k, w in enumerate(widths):
                if dist < w:
                    total[k] += 1
                    correct[k] += pred[r, c] == target[r, c]
    return correct, total


def test_trimap_matches_brute_force():
    rng = np.random.default_rng(30)
    widths = (1, 2, 3, 5)
    bm = BoundaryMetrics(num_classes=4, trimap_widths=widths)
    correct = np.zeros(len(widths))
    total = np.zeros(len(widths))
    for _ in range(3):
        target = _blobby(rng, (12, 15), 4)
        pred = _blobby(rng, (12, 15), 4, void=False)
        agree = (rng.random(pred.shape) < 0.6) & (target != IGN)
        pred[agree] = target[agree]  # mostly right, so accuracies are not all near chance
        bm.update(torch.as_tensor(pred), torch.as_tensor(target))
        c, t = _oracle_trimap(pred, target, widths)
        correct += c
        total += t
    r = bm.compute()
    assert r.trimap_widths == widths
    np.testing.assert_allclose(r.trimap_acc, correct / total)
    np.testing.assert_array_equal(r.trimap_matrix.sum(axis=(1, 2)), total)


def test_trimap_vertical_edge_by_hand():
    target = np.zeros((10, 10), dtype=np.int64)
    target[:, 5:] = 1
    pred = np.zeros_like(target)
    pred[:, 6:] = 1  # edge one column too far right: column 5 is wrong
    bm = BoundaryMetrics(num_classes=2, trimap_widths=(1, 2, 4, 8))
    bm.update(pred, target)
    r = bm.compute()
    # boundary pixels: cols 4, 5. width 1: cols 4-5; 2: cols 3-6; 4: cols 1-8; 8: all.
    np.testing.assert_allclose(r.trimap_acc, [10 / 20, 30 / 40, 70 / 80, 90 / 100])
    assert r.trimap == pytest.approx({1: 0.5, 2: 0.75, 4: 0.875, 8: 0.9})
    # mIoU in the 2-px band: class 0 tp 20 (cols 3,4), union 30; class 1 tp 10, union 20.
    assert r.trimap_miou[1] == pytest.approx((20 / 30 + 10 / 20) / 2)


def test_single_label_image_has_no_trimap_band():
    bm = BoundaryMetrics(num_classes=2, trimap_widths=(1, 4))
    bm.update(np.zeros((5, 5), dtype=np.int64), np.zeros((5, 5), dtype=np.int64))
    r = bm.compute()
    assert np.isnan(r.trimap_acc).all()
    # Boundary IoU still defined: the image border is the background's contour.
    assert r.iou[0] == 1.0 and math.isnan(r.iou[1])


def test_boundary_merge_and_errors():
    rng = np.random.default_rng(40)
    items = [(_blobby(rng, (10, 12), 3, void=False), _blobby(rng, (10, 12), 3)) for _ in range(4)]
    whole = BoundaryMetrics(num_classes=3)
    a, b = BoundaryMetrics(num_classes=3), BoundaryMetrics(num_classes=3)
    for k, (p, t) in enumerate(items):
        whole.update(p, t)
        (a if k % 2 else b).update(p, t)
    merged = (a + b).compute()
    ref = whole.compute()
    np.testing.assert_array_equal(merged.intersection, ref.intersection)
    np.testing.assert_array_equal(merged.union, ref.union)
    np.testing.assert_array_equal(merged.trimap_matrix, ref.trimap_matrix)
    with pytest.raises(ValueError):
        a.merge(BoundaryMetrics(num_classes=3, dilation_ratio=0.05))
    with pytest.raises(ValueError, match="predictions outside"):
        whole.update(np.full((4, 4), 3), np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="shape"):
        whole.update(np.zeros((4, 4), dtype=np.int64), np.zeros((4, 5), dtype=np.int64))
    with pytest.raises(ValueError):
        BoundaryMetrics(trimap_widths=(4, 2))
