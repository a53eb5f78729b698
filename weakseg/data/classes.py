"""PASCAL VOC 2012 class names (paper Table 1 order) and colour map."""

from __future__ import annotations

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus",
    "car", "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike",
    "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)  # 21: background + 20 objects
IGNORE_INDEX = 255  # "void" in VOC masks: ignored by every loss and metric


def voc_colormap(n: int = 256) -> np.ndarray:
    """The VOC devkit's colour map (`VOClabelcolormap.m`): (n, 3) uint8.

    Class c's colour is built from the bits of c, three at a time, written from
    the most significant bit of each channel down.
    """
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for c in range(n):
        r = g = b = 0
        cid = c
        for shift in range(7, -1, -1):
            r |= ((cid >> 0) & 1) << shift
            g |= ((cid >> 1) & 1) << shift
            b |= ((cid >> 2) & 1) << shift
            cid >>= 3
        cmap[c] = (r, g, b)
    return cmap


def voc_palette() -> list[int]:
    """The colour map flattened for `PIL.Image.putpalette` (768 ints)."""
    return voc_colormap(256).reshape(-1).tolist()
