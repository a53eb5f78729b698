"""Gaussian filtering: the one costly operation of the neighbourhood loss.

Everything the method needs from a kernel is the self-excluded Gaussian filter

    out_i = Σ_{j≠i} exp(-½‖f_i − f_j‖²) v_j

with features `f` already divided by their bandwidths θ. This module is the
seam between the method (`neighborhood.py`) and the backends that compute it:

- `dense`: exact, chunked over output rows so memory stays O(N·chunk) on any
  device, with a backward that recomputes the kernel instead of storing it;
- `permutohedral`: Adams et al.'s lattice (`permutohedral.py`), O(N),
  approximate, for large grids;
- `auto`: dense up to `AUTO_DENSE_MAX_PIXELS` pixels per image, else
  permutohedral.

The purely spatial kernel on a regular grid is separable and gets its own
exact fast path, `spatial_filter`, used for k2 whatever the backend.

Filtering always runs in float32 or float64 with autocast disabled: half
precision would underflow the kernel tails and lose the small differences the
loss is made of. No gradient flows to the features (they come from the image);
gradients flow to the values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BACKENDS = ("auto", "dense", "permutohedral")

# Largest per-image pixel count for which `backend="auto"` picks the exact
# dense filter: the measured crossover on a 2-core CPU (benchmarks/bench_filtering.py)
# is 576 pixels for forward + backward and 784 for forward alone. A 224×224 input
# at stride 4 gives 56×56 = 3136 pixels, where the lattice is ~10× faster.
AUTO_DENSE_MAX_PIXELS = 640


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype filtering runs in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grid_positions(h: int, w: int, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """(row, col) index of every cell of an h×w grid in row-major order: (h*w, 2)."""
    rows = torch.arange(h, device=device, dtype=dtype)
    cols = torch.arange(w, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2)


def _dense_filter(features: Tensor, values: Tensor, chunk: int) -> Tensor:
    """Self-excluded exact Gaussian filter, one (chunk × N) kernel block at a time.

    Loops over images and row blocks so that the largest temporary is one
    (chunk, N) block whatever the batch size. No autograd graph is built here.
    """
    B, N, _ = features.shape
    out = torch.empty_like(values)  # (B, N, C)
    # Centring makes |f_i|² + |f_j|² − 2 f_i·f_j cancel less in float32;
    # distances are translation invariant.
    f = features - features.mean(dim=1, keepdim=True)  # (B, N, d)
    sq = (f * f).sum(dim=-1)  # (B, N)
    for b in range(B):
        fb, vb = f[b], values[b]  # (N, d), (N, C)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            # (e-s, N) squared distances, then the kernel block
            d2 = torch.addmm(sq[b, s:e, None] + sq[b, None, :], fb[s:e], fb.T, alpha=-2.0)
            k = torch.exp(d2.clamp_min_(0.0).mul_(-0.5))
            k.diagonal(offset=s).zero_()  # exclude j == i exactly
            out[b, s:e] = k @ vb
    return out


class _DenseGaussianFilter(torch.autograd.Function):
    """Exact filter whose backward recomputes kernel blocks instead of saving them.

    The operator is linear in `values` with a symmetric matrix K, so
    grad_values = K grad_out: the same filter applied to the incoming gradient.
    Letting autograd record the blocks would keep all of K alive, i.e. O(N²).
    Only `features` is saved. The backward calls this Function again, so
    double backward works too.
    """

    @staticmethod
    def forward(ctx, features: Tensor, values: Tensor, chunk: int) -> Tensor:
        ctx.save_for_backward(features)
        ctx.chunk = chunk
        return _dense_filter(features, values, chunk)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (features,) = ctx.saved_tensors
        grad_values = None
        if ctx.needs_input_grad[1]:
            grad_values = _DenseGaussianFilter.apply(features, grad_out.contiguous(), ctx.chunk)
        return None, grad_values, None


def gaussian_filter(features: Tensor, values: Tensor, backend: str = "dense",
                    chunk: int = 1024) -> Tensor:
    """out_i = Σ_{j≠i} exp(-½‖f_i − f_j‖²) v_j   (self term excluded)

    features (B, N, d) already divided by their θ's; values (B, N, C) -> (B, N, C)
    in float32 (float64 if `values` is float64). `chunk` bounds the dense
    backend's rows per kernel block. Differentiable in `values` only.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown filtering backend {backend!r}; expected one of {BACKENDS}")
    if features.dim() != 3 or values.dim() != 3 or features.shape[:2] != values.shape[:2]:
        raise ValueError(f"features must be (B, N, d) and values (B, N, C) with the same B, N; "
                         f"got {tuple(features.shape)} and {tuple(values.shape)}")
    if features.device != values.device:
        raise ValueError(f"features on {features.device} but values on {values.device}")
    if not (features.is_floating_point() and values.is_floating_point()):
        raise ValueError(f"features and values must be floating point; "
                         f"got {features.dtype} and {values.dtype}")
    if features.requires_grad:
        raise ValueError("gaussian_filter has no gradient w.r.t. features (they come from the "
                         "image); pass features.detach()")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")

    dtype = compute_dtype(values.dtype)
    N = features.shape[1]
    if backend == "auto":
        backend = "dense" if N <= AUTO_DENSE_MAX_PIXELS else "permutohedral"
    with torch.autocast(device_type=values.device.type, enabled=False):
        f = features.to(dtype).contiguous()
        v = values.to(dtype).contiguous()
        if backend == "dense":
            return _DenseGaussianFilter.apply(f, v, chunk)
        # Imported lazily: the lattice is an optional, separately developed backend.
        from weakseg.losses.permutohedral import permutohedral_filter
        return permutohedral_filter(f, v)


def _gaussian_matrix(n: int, theta: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n, n) matrix g[a, b] = exp(-(a − b)² / 2θ²), self term included."""
    idx = torch.arange(n, device=device, dtype=dtype)
    return torch.exp(-0.5 * ((idx[:, None] - idx[None, :]) / theta) ** 2)


SPATIAL_BLOCK = 64  # output rows per banded block of the spatial filter


def _gaussian_rows(g: Tensor, v: Tensor, radius: int) -> Tensor:
    """g @ v over the last-but-one axis of v, using only the band |a − b| ≤ radius of g.

    Output rows come in blocks of SPATIAL_BLOCK, each a product with the slice of
    input rows within `radius` of it: O(N·(block + 2 radius)) instead of O(N·n).
    """
    n = g.shape[0]
    if n <= SPATIAL_BLOCK + 2 * radius:
        return g @ v
    blocks = []
    for i0 in range(0, n, SPATIAL_BLOCK):
        i1 = min(n, i0 + SPATIAL_BLOCK)
        j0, j1 = max(0, i0 - radius), min(n, i1 + radius)
        blocks.append(g[i0:i1, j0:j1] @ v[..., j0:j1, :])
    return torch.cat(blocks, dim=-2)


def spatial_filter(values: Tensor, theta: float) -> Tensor:
    """Self-excluded spatial Gaussian filter on a regular grid, separably, exact to the dtype's precision.

    exp(-(Δr² + Δc²)/2θ²) = g(Δr) g(Δc), so the filter is G_h V G_wᵀ: two small
    matrix products, O(N(h + w)) work instead of O(N²). Weights below the
    dtype's epsilon (|Δ| > θ·sqrt(−2 ln ε): 5.6θ in float32, 8.5θ in float64)
    are skipped by banded block products, which makes a full-resolution grid
    (500×375, θ = 3) about 3× cheaper. k(i, i) = 1, so the self term is removed
    by subtracting V. values (B, C, h, w) -> (B, C, h, w); θ in grid cells.
    Differentiable in `values` by plain autograd (O(N) saved).
    """
    if values.dim() != 4:
        raise ValueError(f"values must be (B, C, h, w), got {tuple(values.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta!r}")
    dtype = compute_dtype(values.dtype)
    radius = math.ceil(theta * math.sqrt(-2.0 * math.log(torch.finfo(dtype).eps)))
    with torch.autocast(device_type=values.device.type, enabled=False):
        v = values.to(dtype)  # (B, C, h, w)
        g_rows = _gaussian_matrix(v.shape[-2], theta, v.device, dtype)  # (h, h)
        g_cols = _gaussian_matrix(v.shape[-1], theta, v.device, dtype)  # (w, w), symmetric
        x = _gaussian_rows(g_rows, v, radius)  # (B, C, h, w): G_h V
        x = _gaussian_rows(g_cols, x.transpose(-1, -2), radius).transpose(-1, -2)  # (G_w (G_h V)ᵀ)ᵀ = G_h V G_w
        return x - v
