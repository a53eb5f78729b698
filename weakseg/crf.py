"""Dense-CRF post-processing of predicted probabilities (Krähenbühl & Koltun, NIPS 2011).

Uses `pydensecrf`, installed from the PyPI package `pydensecrf2` (the original
`pydensecrf` no longer builds under Cython 3). It is imported lazily, so the
rest of weakseg works without it; asking for CRF refinement without it is a
`UserError` that says how to install it.

The CRF's energy is the one the neighbourhood loss imitates during training
(paper §3.5): a unary from the network's probabilities plus a bilateral
(position + colour) and a Gaussian (position) Potts term.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, fields

import numpy as np

from weakseg.errors import UserError

__all__ = ["CRFParams", "refine", "refine_many"]


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF settings; defaults are Krähenbühl & Koltun's released example.

    They are the values in pydensecrf's README (`addPairwiseGaussian(sxy=3,
    compat=3)`, `addPairwiseBilateral(sxy=80, srgb=13, rgbim=im, compat=10)`,
    `inference(5)`; checked against the README shipped in pydensecrf2 1.1's
    package metadata) and the neighbourhood loss's kernel defaults (w1 = 10, θα = 13,
    θβ = 80, w2 = 3, θγ = 3; docs/method.md, section 3). DeepLab tuned others for VOC (e.g. bilateral
    w=4, sxy=121, srgb=5; Gaussian w=3, sxy=3; 10 iterations); set them here
    to reproduce such a protocol. Lengths are in pixels of the image the CRF
    runs at, colours in 0–255.
    """

    bilateral_weight: float = 10.0  # w1, Potts compatibility of the appearance kernel
    bilateral_sxy: float = 80.0  # positional std of the appearance kernel
    bilateral_srgb: float = 13.0  # colour std of the appearance kernel
    gaussian_weight: float = 3.0  # w2, Potts compatibility of the smoothness kernel
    gaussian_sxy: float = 3.0  # positional std of the smoothness kernel
    iterations: int = 5  # mean-field iterations; 0 returns the (clipped) input
    prob_clip: float = 1e-5  # probabilities are clipped to [prob_clip, 1] before -log (pydensecrf's default)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise UserError(f"CRF parameter {f.name} must be a finite number, got {v!r}")
        for name in ("bilateral_sxy", "bilateral_srgb", "gaussian_sxy"):
            if getattr(self, name) <= 0:
                raise UserError(f"CRF parameter {name} must be > 0, got {getattr(self, name)}")
        for name in ("bilateral_weight", "gaussian_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"CRF parameter {name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise UserError(f"CRF parameter iterations must be an integer >= 0, got {self.iterations!r}")
        if not 0 < self.prob_clip < 1:
            raise UserError(f"CRF parameter prob_clip must be in (0, 1), got {self.prob_clip}")


def _densecrf():
    """Import pydensecrf's DenseCRF module, or say how to install it."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise UserError(
            "dense-CRF post-processing (--crf) needs weakseg's `crf` extra: pip install 'weakseg[crf]' "
            "(or pip install pydensecrf2; the package named pydensecrf on PyPI no longer builds)"
        ) from e
    return dcrf


def refine(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field marginals of the dense CRF whose unary is −log(probs).

    image: (H, W, 3) uint8 RGB; probs: (C, H, W) class probabilities at the
    image's size. Returns (C, H, W) float32 marginals summing to 1 per pixel.
    """
    dcrf = _densecrf()
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinite values")
    C, H, W = probs.shape
    unary = -np.log(np.clip(probs.astype(np.float32), params.prob_clip, 1.0))  # (C, H, W)
    unary = np.ascontiguousarray(unary.reshape(C, H * W), dtype=np.float32)  # pydensecrf wants C-contiguous
    crf = dcrf.DenseCRF2D(W, H, C)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_weight)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.ascontiguousarray(image),
        compat=params.bilateral_weight,
    )
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(C, H, W)
    q /= q.sum(axis=0, keepdims=True)  # already normalised; guard float32 drift
    return q


def _refine_job(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """Top-level (picklable under "spawn") worker entry point."""
    return refine(image, probs, params)


def refine_many(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    params: CRFParams = CRFParams(),
    workers: int = 0,
    max_in_flight: int | None = None,
) -> Iterator[np.ndarray]:
    """Refine (image, probs) pairs, yielding marginals in input order.

    workers=0 runs inline; otherwise a "spawn" process pool (safe with CUDA
    and threads in the parent) runs `refine`. At most `max_in_flight` pairs
    (default 2 × workers) are submitted but not yet yielded, so memory stays
    bounded on a large val set however fast `pairs` produces them.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserError(f"CRF workers must be an integer >= 0, got {workers!r}")
    if max_in_flight is not None and max_in_flight < 1:
        raise UserError(f"CRF max_in_flight must be >= 1, got {max_in_flight!r}")
    _densecrf()  # fail here, in the caller, not in a worker
    if workers == 0:
        return (refine(image, probs, params) for image, probs in pairs)
    return _refine_pool(pairs, params, workers, max_in_flight or 2 * workers)


def _refine_pool(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], params: CRFParams, workers: int, max_in_flight: int
) -> Iterator[np.ndarray]:
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    pending: deque[Future] = deque()
    try:
        for image, probs in pairs:
            if len(pending) >= max_in_flight:
                yield pending.popleft().result()
            pending.append(pool.submit(_refine_job, image, probs, params))
        while pending:
            yield pending.popleft().result()
    finally:
        # Also runs when the consumer stops early or a job fails.
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def refine_stream(items: Iterable[tuple], params: CRFParams, workers: int = 0) -> Iterator[tuple]:
    """Refine (key, image (3, H, W) uint8 tensor, probs (C, H, W) tensor) triples, in order.

    `key` rides along untouched (a mask, an image id); the refined probabilities
    come back as a float32 CPU tensor. Used by evaluation and by the VOC export.
    """
    import torch

    held: deque = deque()

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for key, image, probs in items:
            held.append((key, image))
            yield image.permute(1, 2, 0).contiguous().cpu().numpy(), probs.float().cpu().numpy()

    for refined in refine_many(pairs(), params, workers=workers):
        key, image = held.popleft()
        yield key, image, torch.from_numpy(refined)

