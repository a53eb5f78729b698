"""A small synthetic data set in the exact PASCAL VOC 2012 devkit layout.

It is the embedded default for the demo and the tests: everything downstream
(datasets, training, evaluation, export) runs on it unchanged, and a model can
learn it in minutes on a CPU. To make that learning mean something, images are
not colour-thresholdable: every class has its own shape family and texture,
but its two colours come from a palette shared with other classes, with the
background gradient and with the clutter shapes (which are not objects).
Objects (1-3 an image, classes may repeat) can be truncated by the border and
occlude each other. Masks have VOC's void (255) band along object boundaries.

Difficulty knobs (`Difficulty`, named presets in `PRESETS`): object size,
objects and distinct classes per image, amount of clutter, clutter painted
with object textures, and texture/colour similarity between classes. The
default `Difficulty()` draws exactly the random numbers of the original
generator, so existing sets are reproduced byte for byte.

Determinism: one numpy generator per image, seeded by (seed, split, index);
fixed JPEG settings; no timestamps. Same seed, same bytes (on one platform).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from weakseg.data.classes import IGNORE_INDEX, VOC_CLASSES, voc_palette
from weakseg.errors import UserError

# Chosen for clearly different shapes and textures: a tiny model separates them quickly.
DEFAULT_CLASSES: tuple[str, ...] = ("aeroplane", "bottle", "car", "cat", "person", "tvmonitor")
SPLITS: tuple[str, ...] = ("train", "val", "test")
JPEG_QUALITY = 90
MANIFEST = "synthetic.json"  # written at `out/`; marks a directory as safe to overwrite

# Shared colour palette (RGB): objects, background and clutter all draw from it.
PALETTE = np.array([
    (140, 100, 65),   # 0 brown
    (120, 120, 125),  # 1 grey
    (205, 190, 160),  # 2 beige
    (85, 100, 60),    # 3 olive
    (165, 70, 55),    # 4 brick
    (70, 95, 150),    # 5 blue
    (225, 225, 230),  # 6 white
    (45, 45, 50),     # 7 dark
    (185, 150, 65),   # 8 mustard
    (120, 150, 125),  # 9 sage
], dtype=np.float32)

# ---------------------------------------------------------------------------
# Shapes: boolean functions of normalised object coordinates (u, v) in
# [-1, 1]^2 (v points down); k = b / a converts a radius in v units to u units
# so that circles stay round whatever the object's aspect ratio.
# ---------------------------------------------------------------------------
Arr = np.ndarray


def _ell(u: Arr, v: Arr, cu: float, cv: float, ru: float, rv: float) -> Arr:
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _circ(u: Arr, v: Arr, cu: float, cv: float, r: float, k: float) -> Arr:
    return _ell(u, v, cu, cv, r * k, r)


def _box(u: Arr, v: Arr, u0: float, u1: float, v0: float, v1: float) -> Arr:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _rbox(u: Arr, v: Arr, u0: float, u1: float, v0: float, v1: float, p: int = 6) -> Arr:
    """Rounded box (superellipse of power p)."""
    cu, cv, hu, hv = (u0 + u1) / 2, (v0 + v1) / 2, (u1 - u0) / 2, (v1 - v0) / 2
    return np.abs((u - cu) / hu) ** p + np.abs((v - cv) / hv) ** p <= 1.0


def _aeroplane(u, v, k, rng):
    fuselage = _ell(u, v, 0.0, 0.0, 0.2, 1.0)
    wings = _box(u, v, -1, 1, -0.2, 0.25) & (v >= -0.2 + 0.3 * np.abs(u))
    tail = _box(u, v, -0.4, 0.4, 0.72, 0.9)
    return fuselage | wings | tail


def _bicycle(u, v, k, rng):
    out = np.zeros(u.shape, bool)
    for cu in (-0.58, 0.58):
        r = np.sqrt(((u - cu) / k) ** 2 + (v - 0.35) ** 2)
        out |= (r <= 0.62) & (r >= 0.42)
    out |= _box(u, v, -0.58, 0.58, -0.3, -0.12)      # top tube
    out |= _box(u, v, -0.12, 0.04, -0.5, 0.35)       # seat tube
    out |= _box(u, v, 0.48, 0.62, -0.75, 0.35)       # fork
    return out


def _bird(u, v, k, rng):
    body = _ell(u, v, -0.05, 0.15, 0.7, 0.5)
    head = _circ(u, v, 0.62, -0.4, 0.32, k)
    beak = (u >= 0.8) & (u <= 1.0) & (np.abs(v + 0.4) <= 0.12 * (1.0 - u) / 0.2)
    tail = (u <= -0.6) & (u >= -1.0) & (np.abs(v - 0.1) <= 0.1 + 0.4 * (-0.6 - u))
    return body | head | beak | tail


def _boat(u, v, k, rng):
    hull = (v >= 0.25) & (v <= 0.8) & (np.abs(u) <= 1.0 - 0.7 * (v - 0.25))
    sail = (v >= -1.0) & (v <= 0.2) & (u >= 0.0) & (u <= 0.8 * (v + 1.0) / 1.2)
    mast = _box(u, v, -0.08, 0.0, -1.0, 0.25)
    return hull | sail | mast


def _bottle(u, v, k, rng):
    body = _box(u, v, -0.45, 0.45, -0.2, 0.95) | _ell(u, v, 0.0, -0.2, 0.45, 0.25)
    base = _rbox(u, v, -0.45, 0.45, 0.7, 1.0, 4)
    neck = _box(u, v, -0.17, 0.17, -1.0, -0.3)
    return body | base | neck


def _bus(u, v, k, rng):
    body = _rbox(u, v, -1.0, 1.0, -0.9, 0.75, 8)
    wheels = _circ(u, v, -0.62, 0.75, 0.22, k) | _circ(u, v, 0.62, 0.75, 0.22, k)
    return body | wheels


def _car(u, v, k, rng):
    body = _rbox(u, v, -1.0, 1.0, -0.15, 0.6, 6)
    cabin = (v >= -0.8) & (v <= -0.1) & (np.abs(u) <= 0.35 + 0.3 * (v + 0.8) / 0.7)
    wheels = _circ(u, v, -0.6, 0.62, 0.36, k) | _circ(u, v, 0.6, 0.62, 0.36, k)
    return body | cabin | wheels


def _cat(u, v, k, rng):
    head = _ell(u, v, 0.0, 0.15, 0.85, 0.8)
    ears = np.zeros(u.shape, bool)
    for cu in (-0.5, 0.5):
        ears |= (v >= -1.0) & (v <= -0.4) & (np.abs(u - cu) <= 0.32 * (v + 1.0) / 0.6)
    return head | ears


def _chair(u, v, k, rng):
    seat = _box(u, v, -0.75, 0.75, -0.05, 0.18)
    back = _box(u, v, 0.45, 0.75, -1.0, 0.0)
    legs = _box(u, v, -0.75, -0.55, 0.18, 1.0) | _box(u, v, 0.55, 0.75, 0.18, 1.0)
    return seat | back | legs


def _legs(u, v, positions, width, top):
    out = np.zeros(u.shape, bool)
    for cu in positions:
        out |= _box(u, v, cu - width, cu + width, top, 1.0)
    return out


def _cow(u, v, k, rng):
    body = _ell(u, v, -0.05, -0.15, 0.78, 0.45)
    head = _ell(u, v, 0.8, -0.4, 0.2, 0.28)
    return body | head | _legs(u, v, (-0.6, -0.38, 0.3, 0.52), 0.08, 0.1)


def _diningtable(u, v, k, rng):
    top = _box(u, v, -1.0, 1.0, -0.65, -0.35)
    return top | _box(u, v, -0.92, -0.76, -0.35, 1.0) | _box(u, v, 0.76, 0.92, -0.35, 1.0)


def _dog(u, v, k, rng):
    body = _ell(u, v, -0.1, 0.0, 0.65, 0.36)
    head = _circ(u, v, 0.68, -0.45, 0.3, k)
    tail = (u <= -0.6) & (u >= -1.0) & (np.abs(v + 0.2 + 0.6 * (u + 0.6)) <= 0.09)
    return body | head | tail | _legs(u, v, (-0.55, -0.35, 0.2, 0.4), 0.08, 0.15)


def _horse(u, v, k, rng):
    body = _ell(u, v, -0.1, -0.1, 0.62, 0.32)
    neck = (u >= 0.35) & (u <= 0.72) & (v >= -0.85) & (v <= -0.05) & (np.abs(u - 0.5 - 0.2 * (-v - 0.1)) <= 0.16)
    head = _ell(u, v, 0.78, -0.82, 0.22, 0.13)
    return body | neck | head | _legs(u, v, (-0.6, -0.42, 0.22, 0.4), 0.06, 0.1)


def _motorbike(u, v, k, rng):
    wheels = _circ(u, v, -0.6, 0.55, 0.42, k) | _circ(u, v, 0.6, 0.55, 0.42, k)
    body = _ell(u, v, -0.05, 0.05, 0.55, 0.3)
    bars = _box(u, v, 0.42, 0.55, -0.75, 0.3)
    return wheels | body | bars


def _person(u, v, k, rng):
    head = _circ(u, v, 0.0, -0.8, 0.2, k)
    torso = _rbox(u, v, -0.48, 0.48, -0.58, 0.3, 4)
    legs = _box(u, v, -0.42, -0.06, 0.2, 1.0) | _box(u, v, 0.06, 0.42, 0.2, 1.0)
    return head | torso | legs


def _pottedplant(u, v, k, rng):
    pot = (v >= 0.3) & (v <= 1.0) & (np.abs(u) <= 0.5 - 0.2 * (v - 0.3) / 0.7)
    r = np.sqrt((u / k) ** 2 + (v + 0.3) ** 2)
    theta = np.arctan2(v + 0.3, u / k)
    phase = rng.uniform(0, 2 * np.pi)
    leaves = r <= 0.55 + 0.15 * np.cos(7 * theta + phase)
    return pot | leaves


def _sheep(u, v, k, rng):
    out = np.zeros(u.shape, bool)
    for cu, cv in ((-0.5, -0.2), (0.0, -0.35), (0.5, -0.2), (-0.25, 0.1), (0.3, 0.1)):
        out |= _circ(u, v, cu, cv, 0.42, k)
    out |= _ell(u, v, 0.85, -0.35, 0.17, 0.22)
    return out | _legs(u, v, (-0.5, -0.3, 0.3, 0.5), 0.06, 0.3)


def _sofa(u, v, k, rng):
    base = _rbox(u, v, -1.0, 1.0, -0.05, 0.65, 6)
    back = _rbox(u, v, -0.9, 0.9, -0.8, 0.1, 6)
    arms = _rbox(u, v, -1.0, -0.78, -0.35, 0.65, 4) | _rbox(u, v, 0.78, 1.0, -0.35, 0.65, 4)
    feet = _box(u, v, -0.9, -0.8, 0.65, 0.85) | _box(u, v, 0.8, 0.9, 0.65, 0.85)
    return base | back | arms | feet


def _train(u, v, k, rng):
    body = _box(u, v, -1.0, 0.65, -0.85, 0.6) | (_ell(u, v, 0.65, -0.12, 0.35, 0.73) & (u >= 0.65))
    wheels = np.zeros(u.shape, bool)
    for cu in (-0.8, -0.5, -0.2, 0.1, 0.4):
        wheels |= _circ(u, v, cu, 0.72, 0.25, k)
    return body | wheels


def _tvmonitor(u, v, k, rng):
    screen = _rbox(u, v, -1.0, 1.0, -1.0, 0.55, 10)
    stand = _box(u, v, -0.12, 0.12, 0.55, 0.85) | _box(u, v, -0.45, 0.45, 0.85, 1.0)
    return screen | stand


# ---------------------------------------------------------------------------
# Textures: t in [0, 1] from rotated pixel coordinates (x, y), object
# coordinates (u, v) and a period in pixels; the object's colour is
# c1 * (1 - t) + c2 * t.
# ---------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 1) -> Arr:
    """Bilinearly upsampled uniform noise in [0, 1]: (h, w, channels) float32."""
    gh, gw = cells + 1, max(2, round(cells * w / max(h, 1)) + 1)
    grid = rng.random((gh, gw, channels), dtype=np.float32)
    ys = np.linspace(0, gh - 1, h, dtype=np.float32)
    xs = np.linspace(0, gw - 1, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(np.int64), gh - 2)
    x0 = np.minimum(xs.astype(np.int64), gw - 2)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx) + g11 * fy * fx).astype(np.float32)


def _rot(x: Arr, y: Arr, angle: float) -> tuple[Arr, Arr]:
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _tex(kind: str, x: Arr, y: Arr, u: Arr, v: Arr, period: float, angle: float,
         rng: np.random.Generator) -> Arr:
    xa, ya = _rot(x, y, angle)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        return 0.5 + 0.5 * np.tanh(3.0 * np.sin(2 * np.pi * xa / period + phase))
    if kind == "checker":
        s = np.sin(np.pi * xa / period + phase) * np.sin(np.pi * ya / period)
        return 0.5 + 0.5 * np.tanh(4.0 * s)
    if kind == "dots":
        fx = np.mod(xa / period + phase, 1.0) - 0.5
        fy = np.mod(ya / period, 1.0) - 0.5
        return (fx * fx + fy * fy <= 0.09).astype(np.float32)
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(2 * np.pi * np.sqrt(xa ** 2 + ya ** 2) / period + phase)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (ya + 0.4 * period * np.sin(2 * np.pi * xa / (2.5 * period))) / period + phase)
    if kind == "gradient":
        return np.clip(0.5 + 0.5 * v + 0.1 * np.sin(2 * np.pi * xa / (3 * period) + phase), 0, 1)
    if kind == "sheen":  # metallic: a bright band across a dark body
        return np.clip(np.exp(-((u * 1.6 - 0.4 * math.sin(phase)) ** 2) * 4.0), 0, 1)
    if kind == "split":  # two-tone: shirt above, trousers below
        return (v > 0.2 + 0.05 * np.sin(2 * np.pi * xa / period + phase)).astype(np.float32)
    if kind == "frame":  # dark screen inside a frame
        return ((np.abs(u) <= 0.82) & (v >= -0.84) & (v <= 0.4)).astype(np.float32)
    if kind == "windows":  # a row of windows on a body
        fx = np.mod(u * 4.5 + 0.5, 1.0)
        return ((v >= -0.6) & (v <= -0.1) & (fx >= 0.15) & (fx <= 0.85) & (np.abs(u) <= 0.9)).astype(np.float32)
    if kind == "spots":
        h, w = x.shape
        return (_smooth_noise(rng, h, w, max(2, round(h / period / 1.5)))[..., 0] > 0.55).astype(np.float32)
    if kind == "fur":
        h, w = x.shape
        n = _smooth_noise(rng, h, w, max(4, round(h / period * 2)))[..., 0]
        return np.clip((n - 0.5) * 2.5 + 0.5, 0, 1)
    raise AssertionError(f"unknown texture {kind}")


@dataclass(frozen=True)
class ClassStyle:
    """How one class looks: shape family, aspect (width/height) range, texture, colours."""

    shape: Callable[[Arr, Arr, float, np.random.Generator], Arr]
    aspect: tuple[float, float]
    texture: str
    period: float  # texture period, as a fraction of the image's long side
    colours: tuple[int, int]  # indices into PALETTE


STYLES: dict[str, ClassStyle] = {
    "aeroplane": ClassStyle(_aeroplane, (1.0, 1.3), "gradient", 0.08, (6, 1)),
    "bicycle": ClassStyle(_bicycle, (1.5, 1.9), "stripes", 0.035, (7, 4)),
    "bird": ClassStyle(_bird, (1.2, 1.5), "waves", 0.05, (0, 8)),
    "boat": ClassStyle(_boat, (1.3, 1.7), "stripes", 0.07, (6, 5)),
    "bottle": ClassStyle(_bottle, (0.35, 0.5), "sheen", 0.06, (3, 9)),
    "bus": ClassStyle(_bus, (1.7, 2.3), "windows", 0.06, (8, 7)),
    "car": ClassStyle(_car, (1.5, 1.9), "checker", 0.06, (4, 1)),
    "cat": ClassStyle(_cat, (0.9, 1.1), "stripes", 0.05, (0, 2)),
    "chair": ClassStyle(_chair, (0.7, 0.9), "waves", 0.035, (0, 7)),
    "cow": ClassStyle(_cow, (1.4, 1.7), "spots", 0.12, (6, 7)),
    "diningtable": ClassStyle(_diningtable, (1.4, 2.0), "waves", 0.03, (0, 8)),
    "dog": ClassStyle(_dog, (1.2, 1.5), "fur", 0.06, (2, 0)),
    "horse": ClassStyle(_horse, (1.1, 1.3), "gradient", 0.1, (0, 7)),
    "motorbike": ClassStyle(_motorbike, (1.5, 1.9), "sheen", 0.06, (7, 5)),
    "person": ClassStyle(_person, (0.38, 0.5), "split", 0.08, (5, 2)),
    "pottedplant": ClassStyle(_pottedplant, (0.8, 1.0), "dots", 0.05, (3, 4)),
    "sheep": ClassStyle(_sheep, (1.2, 1.5), "rings", 0.03, (6, 2)),
    "sofa": ClassStyle(_sofa, (1.6, 2.1), "checker", 0.1, (4, 5)),
    "train": ClassStyle(_train, (2.3, 3.0), "windows", 0.06, (1, 4)),
    "tvmonitor": ClassStyle(_tvmonitor, (1.2, 1.45), "frame", 0.06, (1, 7)),
}
assert set(STYLES) == set(VOC_CLASSES[1:])


@dataclass(frozen=True)
class Difficulty:
    """How hard the set is. Every default reproduces the original generator byte for byte."""

    object_area: tuple[float, float] = (0.12, 0.35)  # target area of one object, fraction of the image (before
    # truncation by the border, at most 40 %, and occlusion)
    objects: tuple[int, int] = (0, 0)  # objects per image, uniform in [min, max]; (0, 0): 1/2/3 w.p. .5/.35/.15
    distinct: bool = False  # the objects of one image have distinct classes (then classes per image = objects)
    clutter: float = 1.0  # multiplies the number of clutter shapes (3-8 an image)
    clutter_textured: float = 0.0  # probability that a clutter shape wears an object class's texture and colours
    texture_similarity: float = 0.0  # 0: each class its own texture and colours; 1: a random class's (shape only)

    def check(self, n_classes: int) -> None:
        lo, hi = self.object_area
        if not 0 < lo <= hi <= 0.6:
            raise UserError(f"make_synthetic: object_area must satisfy 0 < min <= max <= 0.6, got {self.object_area}")
        a, b = self.objects
        if (a, b) != (0, 0) and not 1 <= a <= b <= 8:
            raise UserError(f"make_synthetic: objects must satisfy 1 <= min <= max <= 8 (or 0, 0), got {self.objects}")
        if self.distinct and max(b, 3) > n_classes:
            raise UserError(f"make_synthetic: distinct classes need at least {max(b, 3)} classes, got {n_classes}")
        if not 0 <= self.clutter <= 10:
            raise UserError(f"make_synthetic: clutter must lie in [0, 10], got {self.clutter}")
        for name in ("clutter_textured", "texture_similarity"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"make_synthetic: {name} must lie in [0, 1], got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {"object_area": list(self.object_area), "objects": list(self.objects), "distinct": self.distinct,
                "clutter": self.clutter, "clutter_textured": self.clutter_textured,
                "texture_similarity": self.texture_similarity}


# The settings of the difficulty sweep: today's set; small objects (about 5-8 % of the image per
# class, 2 classes per image); heavy clutter, a third of it wearing object textures.
PRESETS: dict[str, Difficulty] = {
    "default": Difficulty(),
    "small": Difficulty(object_area=(0.08, 0.12), objects=(2, 2), distinct=True),
    "clutter": Difficulty(clutter=3.0, clutter_textured=0.35),
}


@dataclass
class SynthObject:
    """One object as written to the XML annotation (bndbox 1-based, inclusive)."""

    name: str
    bbox: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax
    truncated: bool
    occluded: bool
    pose: str


def _jitter(rng: np.random.Generator, colour: Arr, std: float) -> Arr:
    return np.clip(colour + rng.normal(0.0, std, 3).astype(np.float32), 0, 255)


def _background(rng: np.random.Generator, h: int, w: int, size: int, classes: Sequence[str] = DEFAULT_CLASSES,
                diff: Difficulty = Difficulty()) -> Arr:
    """Gradient + low-frequency colour noise + mid-frequency grain + clutter shapes: (h, w, 3)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c1 = _jitter(rng, PALETTE[rng.integers(len(PALETTE))], 25)
    c2 = _jitter(rng, PALETTE[rng.integers(len(PALETTE))], 25)
    ang = rng.uniform(0, 2 * np.pi)
    proj = math.cos(ang) * xx + math.sin(ang) * yy
    t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1.0))[..., None]
    img = c1 * (1 - t) + c2 * t
    img += (_smooth_noise(rng, h, w, int(rng.integers(3, 7)), 3) - 0.5) * 45.0
    img += (_smooth_noise(rng, h, w, max(8, size // 6), 1) - 0.5) * 20.0
    # Clutter: flat or grainy shapes and lines that are not objects (label 0).
    for _ in range(int(rng.integers(round(3 * diff.clutter), round(8 * diff.clutter) + 1))):
        col = _jitter(rng, PALETTE[rng.integers(len(PALETTE))], 25)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        kind = rng.integers(4)
        if kind == 3:  # a line
            ang = rng.uniform(0, np.pi)
            d = np.abs(-math.sin(ang) * (xx - cx) + math.cos(ang) * (yy - cy))
            along = np.abs(math.cos(ang) * (xx - cx) + math.sin(ang) * (yy - cy))
            m = (d <= rng.uniform(0.6, 2.0) * size / 128) & (along <= rng.uniform(0.2, 0.6) * size)
        else:
            rx, ry = rng.uniform(0.03, 0.14, 2) * size
            x, y = _rot(xx - cx, yy - cy, rng.uniform(0, np.pi))
            if kind == 0:
                m = (x / rx) ** 2 + (y / ry) ** 2 <= 1
            elif kind == 1:
                m = (np.abs(x) <= rx) & (np.abs(y) <= ry)
            else:
                r = np.sqrt((x / rx) ** 2 + (y / ry) ** 2)
                th = np.arctan2(y, x)
                m = r <= 1 + 0.3 * np.sin(3 * th + rng.uniform(0, 6.3))
        alpha = rng.uniform(0.6, 1.0)
        if diff.clutter_textured > 0 and rng.random() < diff.clutter_textured:  # a distractor: object texture, no label
            col = _class_paint(rng, STYLES[classes[int(rng.integers(len(classes)))]], xx - cx, yy - cy, size)
            col, alpha = col[m], 1.0
        img[m] = img[m] * (1 - alpha) + col * alpha
    return img


def _void_band(inst: Arr, k: int) -> Arr:
    """Pixels within Chebyshev distance k of a pixel of another instance (or background)."""
    h, w = inst.shape
    pad = np.pad(inst, k, mode="edge")
    band = np.zeros((h, w), bool)
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            if dy or dx:
                band |= pad[k + dy:k + dy + h, k + dx:k + dx + w] != inst
    return band


def _class_paint(rng: np.random.Generator, style: ClassStyle, x: Arr, y: Arr, size: int) -> Arr:
    """A class's texture in its colours over the whole grid, centred at x = y = 0: (h, w, 3)."""
    u, v = x / (0.15 * size), y / (0.15 * size)
    c1 = _jitter(rng, PALETTE[style.colours[0]], 18)
    c2 = _jitter(rng, PALETTE[style.colours[1]], 18)
    t = _tex(style.texture, x, y, u, v, style.period * size, rng.uniform(-0.5, 0.5), rng)[..., None]
    return c1 * (1 - t) + c2 * t


def render_image(
    rng: np.random.Generator, size: int, classes: Sequence[str], difficulty: Difficulty = Difficulty()
) -> tuple[Arr, Arr, list[SynthObject]]:
    """One image: (uint8 (H, W, 3) RGB, uint8 (H, W) class mask with 255 void, objects).

    `size` is the longer side; the shorter is 0.66-0.95 of it (landscape 70%).
    Every object listed keeps at least `min_px` non-void pixels in the mask, so
    the image-level labels are exactly the classes present in the mask.
    """
    short = int(round(size * rng.uniform(0.66, 0.95)))
    h, w = (short, size) if rng.random() < 0.7 else (size, short)
    while True:  # a layout whose objects all stay visible (almost always the first)
        result = _try_render(rng, size, h, w, classes, difficulty)
        if result is not None:
            return result


def _try_render(rng: np.random.Generator, size: int, h: int, w: int, classes: Sequence[str],
                d: Difficulty = Difficulty()):
    img = _background(rng, h, w, size, classes, d)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    band_k = max(1, round(size / 200))
    min_px = max(12, (h * w) // 150)

    if d.objects == (0, 0):
        n_obj = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    else:
        n_obj = int(rng.integers(d.objects[0], d.objects[1] + 1))
    objs = []  # (name, shape mask, pixels, truncated, pose)
    for _ in range(n_obj):
        pool = [c for c in classes if c not in {o[0] for o in objs}] if d.distinct else classes
        name = pool[int(rng.integers(len(pool)))]
        style = STYLES[name]
        for _attempt in range(20):  # mostly inside the image, not too small
            # Size by target area (12-35% of the image), so thin classes are not
            # tiny: the weak-label prior asks each present class for ~20% of pixels.
            aspect = rng.uniform(*style.aspect)
            area = rng.uniform(*d.object_area) * h * w
            b = math.sqrt(area / (4 * aspect * _fill_ratio(style)))  # half-height in pixels
            b = min(b, 0.55 * h)
            a = min(b * aspect, 0.55 * w)
            cx, cy = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(-0.1 * h, 1.1 * h)
            angle = rng.uniform(-0.3, 0.3)
            flip = 1.0 if rng.random() < 0.5 else -1.0
            x, y = _rot(xx - cx, yy - cy, angle)
            u, v = flip * x / a, y / b
            shape = style.shape(u, v, b / a, rng)
            full = _shape_area(style, a, b)
            if shape.sum() >= 0.6 * full and shape.sum() >= 2 * min_px:
                break
        c1 = _jitter(rng, PALETTE[style.colours[0]], 18) * rng.uniform(0.8, 1.15)
        c2 = _jitter(rng, PALETTE[style.colours[1]], 18) * rng.uniform(0.8, 1.15)
        t = _tex(style.texture, flip * x, y, u, v, style.period * size, rng.uniform(-0.5, 0.5), rng)
        if d.texture_similarity > 0:  # blend in a random class's texture and colours
            s, other = d.texture_similarity, STYLES[classes[int(rng.integers(len(classes)))]]
            t2 = _tex(other.texture, flip * x, y, u, v, other.period * size, rng.uniform(-0.5, 0.5), rng)
            t = (1 - s) * t + s * t2
            c1 = (1 - s) * c1 + s * _jitter(rng, PALETTE[other.colours[0]], 18)
            c2 = (1 - s) * c2 + s * _jitter(rng, PALETTE[other.colours[1]], 18)
        pix = c1 * (1 - t[..., None]) + c2 * t[..., None]  # (h, w, 3)
        pix *= (1.0 + rng.uniform(-0.15, 0.15) * v)[..., None]  # shading
        pix += (_smooth_noise(rng, h, w, 4, 3) - 0.5) * 24.0
        truncated = bool(shape.sum() < 0.95 * full)
        pose = "Unspecified" if rng.random() < 0.5 else ("Right" if flip > 0 else "Left")
        objs.append((name, shape, pix, truncated, pose))

    # Paint in order (later objects occlude earlier ones); drop objects left
    # with too few clean (non-void) pixels and repaint until all survive.
    keep = list(range(len(objs)))
    while True:
        inst = np.zeros((h, w), np.int16)
        for j in keep:
            inst[objs[j][1]] = j + 1
        band = _void_band(inst, band_k)
        bad = [j for j in keep if int(((inst == j + 1) & ~band).sum()) < min_px]
        if not bad:
            break
        if len(keep) == 1:
            return None
        keep.remove(bad[0])

    for j in keep:
        m = inst == j + 1
        img[m] = objs[j][2][m]
    img += rng.normal(0.0, 4.0, img.shape).astype(np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    cls_of = np.zeros(len(objs) + 1, np.uint8)
    for j in keep:
        cls_of[j + 1] = VOC_CLASSES.index(objs[j][0])
    mask = cls_of[inst]
    mask[band] = IGNORE_INDEX

    out = []
    for j in keep:
        name, shape, _, truncated, pose = objs[j]
        ys, xs = np.nonzero(inst == j + 1)
        occluded = bool(len(ys) < 0.95 * shape.sum())
        bbox = (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)
        out.append(SynthObject(name, bbox, truncated, occluded, pose))
    return image, mask, out


_FILL_CACHE: dict[str, float] = {}


def _fill_ratio(style: ClassStyle) -> float:
    """Fraction of its [-1, 1]^2 box that a class's shape covers (computed once)."""
    key = style.shape.__name__
    if key not in _FILL_CACHE:
        n = 128
        g = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
        v, u = np.meshgrid(g, g, indexing="ij")
        # A fixed generator: the ratio must not consume the image's stream.
        _FILL_CACHE[key] = float(style.shape(u, v, 1.0, np.random.default_rng(0)).mean())
    return _FILL_CACHE[key]


def _shape_area(style: ClassStyle, a: float, b: float) -> float:
    """Pixel area of a whole (untruncated) shape with half-extents a, b."""
    return _fill_ratio(style) * 4 * a * b


def _annotation_xml(image_id: str, h: int, w: int, objects: Sequence[SynthObject]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    src = ET.SubElement(root, "source")
    ET.SubElement(src, "database").text = "weakseg synthetic"
    ET.SubElement(src, "annotation").text = "weakseg synthetic"
    sz = ET.SubElement(root, "size")
    ET.SubElement(sz, "width").text = str(w)
    ET.SubElement(sz, "height").text = str(h)
    ET.SubElement(sz, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "1"
    for o in objects:
        el = ET.SubElement(root, "object")
        ET.SubElement(el, "name").text = o.name
        ET.SubElement(el, "pose").text = o.pose
        ET.SubElement(el, "truncated").text = str(int(o.truncated))
        ET.SubElement(el, "occluded").text = str(int(o.occluded))
        ET.SubElement(el, "difficult").text = "0"
        bb = ET.SubElement(el, "bndbox")
        for tag, val in zip(("xmin", "ymin", "xmax", "ymax"), o.bbox):
            ET.SubElement(bb, tag).text = str(val)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _make_ids(seed: int, n: int) -> list[str]:
    """n distinct VOC-style ids (`2008_000123`), in random order."""
    rng = np.random.default_rng([seed, 7919])
    nums = rng.choice(999_999, size=n, replace=False) + 1
    years = rng.integers(2007, 2013, size=n)
    return [f"{y}_{x:06d}" for y, x in zip(years.tolist(), nums.tolist())]


def _check_args(n: dict[str, int], size: int, classes: Sequence[str] | None) -> tuple[str, ...]:
    for split, k in n.items():
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise UserError(f"make_synthetic: n_{split} must be a non-negative integer, got {k!r}")
    if sum(n.values()) == 0:
        raise UserError("make_synthetic: n_train + n_val + n_test is 0; nothing to write")
    if sum(n.values()) > 100_000:
        raise UserError(f"make_synthetic: at most 100000 images, got {sum(n.values())}")
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise UserError(f"make_synthetic: size (longer side) must be an integer >= 32, got {size!r}")
    if classes is None:
        return DEFAULT_CLASSES
    classes = tuple(classes)
    if not classes:
        raise UserError("make_synthetic: classes is empty")
    for c in classes:
        if c not in STYLES:
            raise UserError(
                f"make_synthetic: unknown class {c!r}; expected VOC class names from {VOC_CLASSES[1:]}"
            )
    return tuple(dict.fromkeys(classes))


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"make_synthetic: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():  # never offer to overwrite someone's own data (e.g. a VOC tree)
            raise UserError(
                f"make_synthetic: refusing to write into {out}: it is not empty and has no {MANIFEST}, "
                "so it was not written by make_synthetic (choose an empty or new folder)"
            )
        if not overwrite:
            raise UserError(f"make_synthetic: {out} exists and is not empty; pass overwrite=True (CLI: --force) to replace it")


def make_synthetic(
    out: Path,
    n_train: int = 200,
    n_val: int = 50,
    n_test: int = 50,
    size: int = 128,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    test_masks: bool = False,
    overwrite: bool = False,
    difficulty: Difficulty = Difficulty(),
) -> Path:
    """Write a synthetic VOC 2012 devkit under `out`; return `out/VOCdevkit/VOC2012`.

    Layout: JPEGImages/<id>.jpg, Annotations/<id>.xml, SegmentationClass/<id>.png
    (palette PNG, train and val always, test only with `test_masks`, as the real
    test set has none), ImageSets/Segmentation/{train,val,trainval,test}.txt,
    plus `out/synthetic.json` recording the arguments. `size` is the longer
    side. The whole set is written to a temp dir beside `out` and renamed into
    place; an existing non-empty `out` is replaced only with `overwrite=True`
    and only if it holds a previous synthetic set.
    """
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    classes = _check_args(counts, size, classes)
    difficulty.check(len(classes))
    _prepare_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        voc = tmp / "VOCdevkit" / "VOC2012"
        dirs = {d: voc / d for d in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation")}
        for d in dirs.values():
            d.mkdir(parents=True)
        all_ids = _make_ids(seed, sum(counts.values()))
        split_ids: dict[str, list[str]] = {}
        start = 0
        for s_idx, split in enumerate(SPLITS):
            ids = sorted(all_ids[start:start + counts[split]])
            start += counts[split]
            split_ids[split] = ids
            for i, image_id in enumerate(ids):
                rng = np.random.default_rng([seed, s_idx, i])
                image, mask, objects = render_image(rng, int(size), classes, difficulty)
                h, w = mask.shape
                Image.fromarray(image).save(
                    dirs["JPEGImages"] / f"{image_id}.jpg", format="JPEG", quality=JPEG_QUALITY
                )
                (dirs["Annotations"] / f"{image_id}.xml").write_bytes(_annotation_xml(image_id, h, w, objects))
                if split != "test" or test_masks:
                    png = Image.fromarray(mask)  # mode "L", made "P" by putpalette
                    png.putpalette(voc_palette())
                    png.save(dirs["SegmentationClass"] / f"{image_id}.png", format="PNG")
        split_ids["trainval"] = sorted(split_ids["train"] + split_ids["val"])
        for split, ids in split_ids.items():
            (dirs["ImageSets/Segmentation"] / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        manifest = {
            "generator": "weakseg.data.synthetic.make_synthetic",
            "n_train": n_train, "n_val": n_val, "n_test": n_test, "size": int(size),
            "seed": int(seed), "classes": list(classes), "test_masks": bool(test_masks),
            "difficulty": difficulty.to_dict(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "VOCdevkit" / "VOC2012"


def _swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename tmp to out; an old set is moved aside first and deleted after."""
    _prepare_out(out, overwrite)  # again: something may have appeared meanwhile
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old.rmdir()
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
