"""Paired transforms: image and mask stay in pixel correspondence; oracles are numpy/PIL."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from weakseg.data.transforms import (
    IMAGENET_MEAN_255,
    Compose,
    PadIfNeeded,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
    eval_transform,
    train_transform,
)
from weakseg.errors import UserError

# Four well-separated colours; the mask is the index of the pixel's colour, so
# "mask == f(image)" can be checked after any geometric transform.
COLOURS = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [240, 240, 20]], dtype=np.uint8)


def colour_index(image: torch.Tensor) -> np.ndarray:
    """Nearest palette colour of every pixel: (H, W) int."""
    px = image.permute(1, 2, 0).numpy().astype(np.int64)  # (H, W, 3)
    d = ((px[:, :, None, :] - COLOURS[None, None].astype(np.int64)) ** 2).sum(-1)
    return d.argmin(-1)


def block_item(h_blocks: int, w_blocks: int, block: int, seed: int = 0, mask: bool = True) -> dict:
    """Piecewise-constant image of block x block squares; mask = colour index."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 4, (h_blocks, w_blocks))
    idx_full = np.kron(idx, np.ones((block, block), dtype=np.int64))  # (H, W)
    image = torch.from_numpy(COLOURS[idx_full]).permute(2, 0, 1).contiguous()
    item = {"image": image, "labels": torch.tensor([1.0] + [0.0] * 20), "id": "x"}
    if mask:
        item["mask"] = torch.from_numpy(idx_full.astype(np.int64))
    return item


def random_item(h: int, w: int, seed: int = 0) -> dict:
    """Per-pixel random colours from the palette (every pixel its own 'object')."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 4, (h, w))
    image = torch.from_numpy(COLOURS[idx]).permute(2, 0, 1).contiguous()
    return {"image": image, "labels": torch.ones(21), "id": "r", "mask": torch.from_numpy(idx)}


def test_flip_keeps_correspondence_and_matches_numpy():
    item = random_item(7, 11)
    out = RandomHorizontalFlip(p=1.0)(item)
    np.testing.assert_array_equal(out["image"].numpy(), item["image"].numpy()[:, :, ::-1])
    np.testing.assert_array_equal(out["mask"].numpy(), item["mask"].numpy()[:, ::-1])
    np.testing.assert_array_equal(colour_index(out["image"]), out["mask"].numpy())
    same = RandomHorizontalFlip(p=0.0)(item)
    assert torch.equal(same["image"], item["image"]) and torch.equal(same["mask"], item["mask"])


def test_flip_half_the_time_from_torch_rng():
    item = random_item(3, 5)
    flip = RandomHorizontalFlip(0.5)
    torch.manual_seed(0)
    outcomes = {torch.equal(flip(item)["image"], item["image"]) for _ in range(60)}
    assert outcomes == {True, False}


def test_crop_is_a_window_of_the_input_at_the_same_offset():
    item = random_item(9, 12, seed=1)
    crop = RandomCrop((5, 8))
    img = item["image"].numpy()
    msk = item["mask"].numpy()
    torch.manual_seed(0)
    offsets = set()
    for _ in range(200):
        out = crop(item)
        o_img, o_msk = out["image"].numpy(), out["mask"].numpy()
        # Oracle: brute-force search of the offsets where the image window matches.
        hits = [(t, l) for t in range(9 - 5 + 1) for l in range(12 - 8 + 1)
                if np.array_equal(img[:, t:t + 5, l:l + 8], o_img)]
        assert len(hits) == 1
        t, l = hits[0]
        np.testing.assert_array_equal(o_msk, msk[t:t + 5, l:l + 8])
        offsets.add(hits[0])
    assert offsets == {(t, l) for t in range(5) for l in range(5)}  # every offset reachable


def test_crop_larger_than_image_is_an_error():
    with pytest.raises(ValueError, match="PadIfNeeded"):
        RandomCrop(10)(random_item(5, 12))


def test_pad_marks_valid_and_fills():
    item = random_item(5, 7, seed=2)
    out = PadIfNeeded(8)(item)
    assert out["image"].shape == (3, 8, 8) and out["mask"].shape == (8, 8)
    expected_valid = np.zeros((8, 8), bool)
    expected_valid[:5, :7] = True
    np.testing.assert_array_equal(out["valid"].numpy(), expected_valid)
    np.testing.assert_array_equal(out["image"][:, :5, :7].numpy(), item["image"].numpy())
    np.testing.assert_array_equal(out["mask"][:5, :7].numpy(), item["mask"].numpy())
    fill = np.round(np.array(IMAGENET_MEAN_255)).astype(np.uint8)  # (124, 116, 104)
    assert fill.tolist() == [124, 116, 104]
    pad_px = out["image"].permute(1, 2, 0).numpy()[~expected_valid]
    assert (pad_px == fill).all()
    assert (out["mask"].numpy()[~expected_valid] == 255).all()


def test_pad_not_needed_still_sets_valid_and_keeps_earlier_padding():
    item = random_item(9, 9)
    out = PadIfNeeded(4)(item)
    assert torch.equal(out["image"], item["image"]) and out["valid"].all()
    twice = PadIfNeeded((6, 10))(PadIfNeeded(6)(random_item(4, 4)))
    expected = np.zeros((6, 10), bool)
    expected[:4, :4] = True
    np.testing.assert_array_equal(twice["valid"].numpy(), expected)


def test_resize_downscale_keeps_block_interiors_exact():
    # 8-px blocks halved: output 4-px blocks; pixels one away from a block edge
    # see only their own block through the antialiased bilinear filter.
    item = block_item(4, 6, 8, seed=3)
    out = Resize((16, 24))(item)
    idx = item["mask"].numpy()[::8, ::8]
    expected_mask = np.kron(idx, np.ones((4, 4), dtype=np.int64))
    np.testing.assert_array_equal(out["mask"].numpy(), expected_mask)
    interior = np.zeros((16, 24), bool)
    for y in range(16):
        for x in range(24):
            interior[y, x] = 0 < y % 4 < 3 and 0 < x % 4 < 3
    got = out["image"].permute(1, 2, 0).numpy()[interior]
    np.testing.assert_array_equal(got, COLOURS[expected_mask[interior]])
    np.testing.assert_array_equal(colour_index(out["image"])[interior], out["mask"].numpy()[interior])


def test_resize_arbitrary_size_matches_pil():
    # Independent oracle: PIL's NEAREST samples pixel centres; PIL's BILINEAR
    # downscale is antialiased, which torch's antialias=True reproduces.
    rng = np.random.default_rng(4)
    mask = rng.integers(0, 21, (37, 53)).astype(np.uint8)
    img = rng.integers(0, 256, (37, 53, 3)).astype(np.uint8)
    item = {"image": torch.from_numpy(img).permute(2, 0, 1).contiguous(), "labels": torch.ones(21),
            "id": "p", "mask": torch.from_numpy(mask.astype(np.int64))}
    for size in [(20, 31), (64, 90), (224, 224)]:
        out = Resize(size)(item)
        pil_mask = np.array(Image.fromarray(mask).resize(size[::-1], Image.NEAREST))
        np.testing.assert_array_equal(out["mask"].numpy(), pil_mask)
        pil_img = np.array(Image.fromarray(img).resize(size[::-1], Image.BILINEAR)).astype(int)
        got = out["image"].permute(1, 2, 0).numpy().astype(int)
        assert out["image"].dtype == torch.uint8
        assert np.abs(got - pil_img).max() <= 2
        assert np.abs(got - pil_img).mean() < 0.6


def test_resize_keeps_float_dtype():
    item = block_item(2, 2, 4)
    item["image"] = item["image"].double()
    out = Resize(16)(item)
    assert out["image"].dtype == torch.float64 and out["image"].shape == (3, 16, 16)
    np.testing.assert_allclose(out["image"][:, 1:3, 1:3].numpy(), item["image"][:, :1, :1].expand(3, 2, 2).numpy())


def test_random_scale_range_and_mask_values():
    item = random_item(40, 60, seed=5)
    torch.manual_seed(1)
    scales = set()
    for _ in range(30):
        out = RandomScale(0.5, 1.5)(item)
        h, w = out["image"].shape[-2:]
        assert 20 <= h <= 60 and 30 <= w <= 90
        assert out["mask"].shape == (h, w)
        assert set(np.unique(out["mask"].numpy())) <= {0, 1, 2, 3}
        scales.add(h)
    assert len(scales) > 5


def test_scale_crop_pipeline_correspondence_and_void_padding():
    item = block_item(3, 4, 8, seed=6)  # 24 x 32, smaller than the crop: padding happens
    t = train_transform(crop_size=40, scale=(0.5, 1.0), mode="scale_crop")
    torch.manual_seed(2)
    for _ in range(10):
        out = t(item)
        assert out["image"].shape == (3, 40, 40) and out["mask"].shape == (40, 40)
        valid = out["valid"].numpy()
        mask = out["mask"].numpy()
        assert (mask[~valid] == 255).all()
        assert set(np.unique(mask[valid])) <= {0, 1, 2, 3}
        assert valid.sum() < 40 * 40


def test_resize_mode_keeps_whole_image_and_sets_valid():
    item = block_item(3, 5, 8, seed=7)  # 24 x 40
    t = train_transform(crop_size=16, mode="resize", flip=False)
    out = t(item)
    ref = Resize(16)(item)
    assert torch.equal(out["image"], ref["image"]) and torch.equal(out["mask"], ref["mask"])
    assert out["valid"].shape == (16, 16) and out["valid"].all()
    assert torch.equal(out["labels"], item["labels"]) and out["id"] == "x"


def test_items_without_mask_pass_every_transform():
    item = block_item(3, 5, 8, mask=False)
    for t in [train_transform(32, mode="resize"), train_transform(32, scale=(0.5, 2.0), mode="scale_crop"),
              eval_transform(), Compose([RandomScale(0.5, 1.0), PadIfNeeded(50), RandomCrop(50),
                                         RandomHorizontalFlip(1.0), Resize(10)])]:
        out = t(item)
        assert "mask" not in out
        assert out["image"].dtype == torch.uint8


def test_eval_transform_is_identity():
    item = random_item(13, 17)
    out = eval_transform()(item)
    assert out.keys() == item.keys()
    assert torch.equal(out["image"], item["image"]) and torch.equal(out["mask"], item["mask"])


def test_randomness_comes_from_torch_only():
    item = random_item(30, 30)
    t = train_transform(crop_size=20, scale=(0.5, 1.5), mode="scale_crop")
    results = []
    for py_seed in (1, 2):
        random.seed(py_seed)
        np.random.seed(py_seed)
        torch.manual_seed(123)
        results.append([t(item)["mask"] for _ in range(5)])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    torch.manual_seed(124)
    other = [t(item)["mask"] for _ in range(5)]
    assert not all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_train_transform_rejects_bad_settings():
    with pytest.raises(UserError, match="'crop'"):
        train_transform(mode="crop")
    with pytest.raises(UserError, match="scale"):
        train_transform(mode="resize", scale=(0.5, 1.5))
    with pytest.raises(UserError, match="scale"):
        train_transform(mode="scale_crop", scale=(1.5, 0.5))
    with pytest.raises(UserError, match="crop_size"):
        train_transform(crop_size=0)
