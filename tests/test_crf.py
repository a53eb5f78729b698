"""Dense-CRF refinement: it must sharpen misaligned boundaries on a toy image; pool == inline."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy import ndimage

from weakseg.crf import CRFParams, refine, refine_many
from weakseg.errors import UserError
from weakseg.metrics import BoundaryMetrics

pytest.importorskip("pydensecrf.densecrf")


def _toy(seed: int = 0, shift=(4, 5)):
    """Two flat-coloured regions with a sharp rectangular edge and mild noise,
    plus blurry probabilities from a shifted copy of the true mask."""
    rng = np.random.default_rng(seed)
    H, W = 60, 72
    gt = np.zeros((H, W), dtype=np.int64)
    gt[15:45, 18:54] = 1
    colours = np.where(gt[..., None] == 1, [190, 70, 40], [50, 90, 190]).astype(np.float64)
    image = np.clip(colours + rng.normal(0, 8, colours.shape), 0, 255).astype(np.uint8)
    fg = ndimage.gaussian_filter(np.roll(gt, shift, axis=(0, 1)).astype(np.float64), 4) * 0.8 + 0.1
    probs = np.stack([1 - fg, fg]).astype(np.float32)  # (2, H, W)
    return image, probs, gt


def _fg_iou(labels: np.ndarray, gt: np.ndarray) -> float:
    a, b = labels == 1, gt == 1
    return np.sum(a & b) / np.sum(a | b)


def test_refine_improves_iou_and_boundary_iou():
    image, probs, gt = _toy()
    before = probs.argmax(0)
    after = refine(image, probs).argmax(0)
    iou_before, iou_after = _fg_iou(before, gt), _fg_iou(after, gt)
    assert iou_after > iou_before + 0.1
    assert iou_after > 0.95

    def biou(labels):
        bm = BoundaryMetrics(num_classes=2)
        bm.update(labels, gt)
        return bm.compute().iou[1]

    assert biou(after) > biou(before) + 0.3


def test_shapes_dtypes_and_normalisation():
    image, probs, _ = _toy(1)
    q = refine(image, probs.astype(np.float64), CRFParams(iterations=3))
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-5)
    assert (q >= 0).all()


def test_zero_iterations_return_clipped_input():
    # With no mean-field step the marginals are softmax(-unary) = clip(p) renormalised,
    # which checks the unary is -log(clip(p)) in the right (C, H*W) layout.
    image, probs, _ = _toy(2)
    probs = probs.copy()
    probs[:, :3, :3] = [[[1.0]], [[0.0]]]  # hard zeros exercise the clip
    params = CRFParams(iterations=0, prob_clip=1e-3)
    q = refine(image, probs, params)
    clipped = np.clip(probs, 1e-3, 1.0)
    np.testing.assert_allclose(q, clipped / clipped.sum(0, keepdims=True), rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    image, probs, _ = _toy(3)
    with pytest.raises(ValueError, match="uint8"):
        refine(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match="probs"):
        refine(image, probs[:, :-1])
    bad = probs.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        refine(image, bad)
    with pytest.raises(UserError, match="bilateral_sxy"):
        CRFParams(bilateral_sxy=0.0)
    with pytest.raises(UserError, match="iterations"):
        CRFParams(iterations=-1)
    with pytest.raises(UserError, match="workers"):
        refine_many([], workers=-1)


def test_refine_many_pool_equals_inline_and_keeps_order():
    pairs = [_toy(seed, shift=(seed, -seed)) for seed in range(5)]
    pairs = [(im, pr) for im, pr, _ in pairs]
    params = CRFParams(iterations=3)
    inline = list(refine_many(pairs, params, workers=0))
    pooled = list(refine_many(iter(pairs), params, workers=2, max_in_flight=3))
    assert len(pooled) == len(pairs)
    for a, b in zip(inline, pooled):
        np.testing.assert_array_equal(a, b)
    # Inputs differ, so order mistakes would show.
    assert not np.array_equal(inline[0], inline[1])
    # Stopping early shuts the pool down without hanging.
    gen = refine_many(pairs, params, workers=2)
    np.testing.assert_array_equal(next(gen), inline[0])
    gen.close()


def test_missing_pydensecrf_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    image, probs, _ = _toy(4)
    with pytest.raises(UserError, match="pip install pydensecrf2"):
        refine(image, probs)
    with pytest.raises(UserError, match="pip install pydensecrf2"):
        refine_many([(image, probs)], workers=2)  # eagerly, before any worker starts


@pytest.mark.parametrize("verb", ["evaluate", "export-voc"])
def test_crf_flag_without_the_extra_names_it_before_loading_anything(monkeypatch, capsys, tmp_path, verb):
    from weakseg.cli import main

    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    # the checkpoint does not exist either: the missing extra is what the user hears about first
    assert main([verb, str(tmp_path / "missing.pt"), "--crf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'weakseg[crf]'" in err and "--crf" in err, err
