"""Paired transforms on the item dict (torchvision references/segmentation style).

Every transform takes the dataset's item dict and returns it, acting on the
image and, when present, the mask and the `valid` map together, so that pixel
(i, j) of the image keeps describing pixel (i, j) of the mask:

    {"image": uint8 (3, H, W), "labels": float32 (21,), "id": str,
     "mask": int64 (H, W)   # only with `with_masks=True`
     "valid": bool (H, W)}  # only after `PadIfNeeded`: False on padding

No mean/std normalisation happens here. Images stay uint8 RGB in 0-255 all the
way to the device, and the model normalises with the ImageNet statistics below
as its first op, because (1) the neighbourhood loss compares raw 0-255 colours
and needs the un-normalised image anyway, and (2) a uint8 batch is 4x cheaper
to move to the GPU than float32.

Randomness comes from torch's global RNG only, so DataLoader worker seeding
(and `torch.manual_seed` in tests) controls it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from weakseg.data.classes import IGNORE_INDEX
from weakseg.errors import UserError

Item = dict[str, Any]

# ImageNet statistics of torchvision's pretrained VGG16, for the model's first op.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Padding colour: the mean, so padding normalises to ~0 (what the network saw least of).
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)


def _size2(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """(h, w) from an int (square) or a pair; rejects non-positive sizes."""
    if isinstance(size, int):
        h = w = size
    else:
        if len(size) != 2:
            raise ValueError(f"{name}: size must be an int or (h, w), got {size!r}")
        h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: size must be positive, got {size!r}")
    return h, w


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of a (3, H, W) image; uint8 in, uint8 out (rounded)."""
    x = image.unsqueeze(0)
    out_dtype = x.dtype
    if not x.is_floating_point():
        x = x.float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if not out_dtype.is_floating_point:
        x = x.round_().clamp_(0, 255)
    return x.to(out_dtype).squeeze(0)  # (3, h, w)


def resize_nearest(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (H, W) label map (any dtype), sampling pixel centres.

    `nearest-exact` rather than `nearest`: the latter's half-pixel shift moves
    label boundaries relative to the bilinear image.
    """
    x = label[None, None].float()  # exact for ints < 2**24: labels are 0..255
    x = F.interpolate(x, size=size, mode="nearest-exact")
    return x[0, 0].to(label.dtype)  # (h, w)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Item], Item]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, item: Item) -> Item:
        for t in self.transforms:
            item = t(item)
        return item

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


def _resize_item(item: Item, size: tuple[int, int]) -> Item:
    item = dict(item)
    item["image"] = resize_image(item["image"], size)
    for key in ("mask", "valid"):
        if key in item:
            item[key] = resize_nearest(item[key], size)
    return item


class Resize:
    """Resize to exactly `size` (an int means size x size, unlike torchvision's short side).

    Image: bilinear with antialias; mask and `valid`: nearest.
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size2(size, "Resize")

    def __call__(self, item: Item) -> Item:
        if tuple(item["image"].shape[-2:]) == self.size:
            return item
        return _resize_item(item, self.size)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class RandomScale:
    """Scale both sides by one factor drawn uniformly from [min_scale, max_scale]."""

    def __init__(self, min_scale: float, max_scale: float) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"RandomScale: need 0 < min <= max, got ({min_scale}, {max_scale})")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)

    def __call__(self, item: Item) -> Item:
        s = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(()).item()
        h, w = item["image"].shape[-2:]
        size = (max(1, round(h * s)), max(1, round(w * s)))
        if size == (h, w):
            return item
        return _resize_item(item, size)

    def __repr__(self) -> str:
        return f"RandomScale({self.min_scale}, {self.max_scale})"


class PadIfNeeded:
    """Pad bottom/right up to at least `size`, and record the real pixels in `valid`.

    Image padding is the ImageNet mean colour (normalises to ~0), mask padding
    is 255 (void: no loss, no metric). `valid` (bool (H, W)) is always set, so
    every item of a batch has it; losses that see the image (the neighbourhood
    term) must exclude `valid == False` pixels, which carry no label.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        image_fill: Sequence[float] = IMAGENET_MEAN_255,
        mask_fill: int = IGNORE_INDEX,
    ) -> None:
        self.size = _size2(size, "PadIfNeeded")
        if len(image_fill) != 3:
            raise ValueError(f"PadIfNeeded: image_fill must have 3 values, got {image_fill!r}")
        self.image_fill = tuple(float(v) for v in image_fill)
        self.mask_fill = int(mask_fill)

    def __call__(self, item: Item) -> Item:
        item = dict(item)
        image = item["image"]
        h, w = image.shape[-2:]
        valid = item.get("valid")
        if valid is None:
            valid = torch.ones((h, w), dtype=torch.bool, device=image.device)
        ph, pw = max(0, self.size[0] - h), max(0, self.size[1] - w)
        if ph or pw:
            fill = torch.tensor(self.image_fill, dtype=torch.float64)
            if not image.is_floating_point():
                fill = fill.round()
            fill = fill.to(image.dtype).to(image.device)
            out = fill.view(3, 1, 1).expand(3, h + ph, w + pw).clone()  # (3, H', W')
            out[:, :h, :w] = image
            image = out
            if "mask" in item:
                mask = item["mask"]
                m = torch.full((h + ph, w + pw), self.mask_fill, dtype=mask.dtype, device=mask.device)
                m[:h, :w] = mask
                item["mask"] = m
            v = torch.zeros((h + ph, w + pw), dtype=torch.bool, device=valid.device)
            v[:h, :w] = valid
            valid = v
        item["image"] = image
        item["valid"] = valid
        return item

    def __repr__(self) -> str:
        return f"PadIfNeeded({self.size})"


class RandomCrop:
    """Crop a random `size` window (pad first: a smaller input is a bug, not data)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size2(size, "RandomCrop")

    def __call__(self, item: Item) -> Item:
        h, w = item["image"].shape[-2:]
        ch, cw = self.size
        if h < ch or w < cw:
            raise ValueError(
                f"RandomCrop{self.size}: item {item.get('id')!r} is only {h}x{w}; "
                "put PadIfNeeded before RandomCrop"
            )
        top = int(torch.randint(0, h - ch + 1, ()).item())
        left = int(torch.randint(0, w - cw + 1, ()).item())
        item = dict(item)
        item["image"] = item["image"][:, top:top + ch, left:left + cw]
        for key in ("mask", "valid"):
            if key in item:
                item[key] = item[key][top:top + ch, left:left + cw]
        return item

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class RandomHorizontalFlip:
    """Mirror left-right with probability p."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, item: Item) -> Item:
        if torch.rand(()).item() >= self.p:
            return item
        item = dict(item)
        item["image"] = item["image"].flip(-1)
        for key in ("mask", "valid"):
            if key in item:
                item[key] = item[key].flip(-1)
        return item

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip({self.p})"


TRAIN_MODES = ("resize", "scale_crop")


def train_transform(
    crop_size: int = 224,
    scale: tuple[float, float] = (1.0, 1.0),
    mode: str = "resize",
    flip: bool = True,
) -> Compose:
    """The training augmentation; every output is crop_size x crop_size with `valid`.

    - `resize` (default, for weak supervision): the whole image is resized to
      crop_size x crop_size, then flipped. Nothing is cut out, so every class in
      the image-level labels is still in the input; a crop could remove an
      object and then the label would force the model to find a class that is
      not there (the paper trains on 224 x 224 inputs of whole images).
    - `scale_crop` (the usual full-supervision augmentation): random scale in
      `scale`, pad to crop_size (mask 255, `valid` False), random crop, flip.
      With image-level labels only, a crop can drop a labelled object.
    """
    crop_size = int(crop_size)
    if crop_size <= 0:
        raise UserError(f"train transform: crop_size must be positive, got {crop_size}")
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi:
        raise UserError(f"train transform: scale must be (min, max) with 0 < min <= max, got {scale!r}")
    if mode == "resize":
        if (lo, hi) != (1.0, 1.0):
            raise UserError(
                f"train transform: scale={scale!r} has no effect with mode='resize'; "
                "use mode='scale_crop' or scale=(1.0, 1.0)"
            )
        # PadIfNeeded is a no-op pad here: it only adds an all-True `valid`, so
        # batches have the same keys in both modes.
        ts: list[Callable[[Item], Item]] = [Resize(crop_size), PadIfNeeded(crop_size)]
    elif mode == "scale_crop":
        ts = [RandomScale(lo, hi), PadIfNeeded(crop_size), RandomCrop(crop_size)]
    else:
        raise UserError(f"train transform: unknown mode {mode!r}; expected one of {TRAIN_MODES}")
    if flip:
        ts.append(RandomHorizontalFlip(0.5))
    return Compose(ts)


def eval_transform() -> Compose:
    """Identity: evaluation runs on each image at its own size (batch size 1)."""
    return Compose([])
