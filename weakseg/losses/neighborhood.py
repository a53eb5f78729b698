"""Neighbourhood estimator and loss (paper §3.4–3.5, eq. 8–12, 18).

Between output-grid cells i, j (positions in grid cells, colours x in 0–255
from the image resized to the grid), eq. 11's two kernels are

    k1(i, j) = exp(−|x_i − x_j|²/2θα² − |i − j|²/2θβ²)     appearance
    k2(i, j) = exp(−|i − j|²/2θγ²)                          smoothness

with θβ, θγ given in input pixels and divided by the output stride (§5.3).
Each kernel is row-normalised over j ≠ i, k̂_m(i, j) = k_m(i, j) / Σ_{j'≠i} k_m(i, j'),
and the neighbourhood distribution p̄ (the paper's p^neighb) is

    mean (eq. 10):  p̄_i    = (w1 (k̂1 p)_i + w2 (k̂2 p)_i) / (w1 + w2)
    exp  (eq. 12):  p̄_i(l) ∝ exp(w1 (k̂1 p)_i(l) + w2 (k̂2 p)_i(l))

The loss is eq. 8's divergence averaged over pixels,

    L_neighb = mean_i KL(p_i ‖ p̄_i) = mean_i Σ_l p_i(l) (log p_i(l) − log p̄_i(l)).

`neighborhood_loss(grad=...)` picks how that KL is differentiated, or replaces
it by the mean-field free energy that eq. 12 minimises (paper Prop. 3.1,
eq. 24); docs/method.md derives the three modes and why `exp` defaults to
`detach` and `mean` to `both`.

Sign convention: the paper writes L_neighb = −KL (eq. 8) and maximises
eq. 18, E_q[log p] − λ KL. We return the KL itself (≥ 0) and minimise
L = L_class + λ·KL, which is the same objective.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from weakseg.config import default_grad
from weakseg.losses.filtering import (BACKENDS, compute_dtype, gaussian_filter, grid_positions,
                                      spatial_filter)

VARIANTS = ("mean", "exp")
GRAD_MODES = ("detach", "both", "free_energy")


def _as_float(value: object) -> float:
    """float(value), or NaN for anything that is not a real number (fails every check)."""
    if isinstance(value, (str, bytes, bool)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _check_args(probs: Tensor, image: Tensor, variant: str, w1: float, theta_alpha: float,
                theta_beta: float, w2: float, theta_gamma: float, stride: float, backend: str,
                valid: Tensor | None) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown neighbourhood variant {variant!r}; expected one of {VARIANTS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown filtering backend {backend!r}; expected one of {BACKENDS}")
    for name, value in (("theta_alpha", theta_alpha), ("theta_beta", theta_beta),
                        ("theta_gamma", theta_gamma), ("stride", stride)):
        if not (_as_float(value) > 0 and math.isfinite(_as_float(value))):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    for name, value in (("w1", w1), ("w2", w2)):
        if not (_as_float(value) >= 0 and math.isfinite(_as_float(value))):
            raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    if variant == "mean" and w1 + w2 == 0:
        raise ValueError("variant 'mean' needs w1 + w2 > 0 (it divides by the total weight)")
    if probs.dim() != 4 or not probs.is_floating_point():
        raise ValueError(f"probs must be a floating (B, C, h, w) tensor, "
                         f"got {probs.dtype} {tuple(probs.shape)}")
    if image.dim() != 4 or image.shape[1] != 3 or image.shape[0] != probs.shape[0]:
        raise ValueError(f"image must be (B, 3, H, W) with B = {probs.shape[0]} as in probs, "
                         f"got {tuple(image.shape)}")
    if image.device != probs.device:
        raise ValueError(f"image on {image.device} but probs on {probs.device}")
    if valid is not None:
        B, _, h, w = probs.shape
        if valid.dtype != torch.bool or tuple(valid.shape) != (B, h, w):
            raise ValueError(f"valid must be a bool (B, h, w) = {(B, h, w)} mask, "
                             f"got {valid.dtype} {tuple(valid.shape)}")
        if valid.device != probs.device:
            raise ValueError(f"valid on {valid.device} but probs on {probs.device}")


def _normalised_filter(filtered: Tensor, p: Tensor, eps: float) -> Tensor:
    """k̂ p from the filtered [p, mask] stack: (K p)/(K 1) with the self-excluded K.

    A cell whose every kernel value underflows (k1 for a colour found nowhere
    else in the image, |Δx| ≳ 14 θα in float32) would give 0/0; the ε terms make
    it fall back to its own distribution, the limit of a vanishing self weight.
    Elsewhere ε is negligible (it is ~1e-19 in float32, ~1e-154 in float64).
    """
    C = p.shape[1]
    return (filtered[:, :C] + eps * p) / (filtered[:, C:] + eps)  # (B, C, h, w)


def colours_on_grid(image: Tensor, h: int, w: int, stride: float) -> Tensor:
    """(B, 3, H, W) -> (B, 3, h, w): each output cell's colour, an antialiased average of its patch.

    When (h, w) is the model's grid of the image, (ceil(H/s), ceil(W/s)) for an
    integer stride s, cell (r, c) covers pixels [s·r, s·r+s) x [s·c, s·c+s): the
    image is edge-padded to (s·h, s·w) first so that the cells line up with the
    logits. Any other grid gets the whole image resized onto it.
    """
    H, W = image.shape[-2:]
    if (H, W) == (h, w):
        return image
    s = int(stride)
    if s == stride and -(-H // s) == h and -(-W // s) == w and (s * h, s * w) != (H, W):
        image = F.pad(image, (0, s * w - W, 0, s * h - H), mode="replicate")
    return F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False, antialias=True)


def _kernel_field(probs: Tensor, image: Tensor, w1: float, theta_alpha: float, theta_beta: float,
                  w2: float, theta_gamma: float, stride: float, backend: str,
                  valid: Tensor | None) -> Tensor:
    """W p with W = w1 k̂1 + w2 k̂2 over valid cells: (B, C, h, w) in float32/float64.

    Arguments already checked; call with autocast off.
    """
    B, C, h, w = probs.shape
    dtype = compute_dtype(probs.dtype)
    eps = math.sqrt(torch.finfo(dtype).tiny)
    p = probs.to(dtype)  # (B, C, h, w)
    if valid is None:
        mask = p.new_ones(B, 1, h, w)
    else:
        # Padding must not leak in: neither its values (which may be anything)
        # nor its kernel mass in the normalisers.
        p = torch.where(valid[:, None], p, 0.0)
        mask = valid[:, None].to(dtype)  # (B, 1, h, w)
    stack = torch.cat([p, mask], dim=1)  # (B, C+1, h, w): numerator and normaliser in one pass

    # Each kernel is normalised on its own, k̂_m = K_m / (K_m 1), rather than
    # eq. 10's literal normalisation of the summed kernel w1 k1 + w2 k2: this
    # keeps both variants built from the same k̂ terms, as the paper's
    # modified densecrf code would (it normalises each kernel before applying
    # the Potts weights), and makes w1, w2 mean the same thing in both.
    z = torch.zeros_like(p)
    if w1 > 0:
        # The kernel compares the colours of output cells, each of which
        # stands for a stride×stride patch of input pixels: antialiased
        # resizing averages over the patch (a triangle filter as wide as the
        # scale factor, as PIL does); plain bilinear would read just the 2×2
        # input pixels under each sample point and alias texture and noise.
        x = colours_on_grid(image.detach().to(dtype), h, w, stride)  # (B, 3, h, w); no gradient to the image
        colour = x.flatten(2).transpose(1, 2) / theta_alpha  # (B, N, 3)
        pos = grid_positions(h, w, p.device, dtype) / (theta_beta / stride)  # (N, 2)
        features = torch.cat([colour, pos.expand(B, -1, -1)], dim=-1)  # (B, N, 5)
        values = stack.flatten(2).transpose(1, 2)  # (B, N, C+1)
        filtered = gaussian_filter(features, values, backend=backend)  # (B, N, C+1)
        filtered = filtered.transpose(1, 2).reshape(B, C + 1, h, w)
        z = z + w1 * _normalised_filter(filtered, p, eps)
    if w2 > 0:
        filtered = spatial_filter(stack, theta_gamma / stride)  # (B, C+1, h, w)
        z = z + w2 * _normalised_filter(filtered, p, eps)
    return z


def _neighborhood_logits(probs: Tensor, image: Tensor, variant: str, w1: float,
                         theta_alpha: float, theta_beta: float, w2: float, theta_gamma: float,
                         stride: float, backend: str, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """(p̄, log p̄), both (B, C, h, w) in float32/float64; arguments already checked."""
    dtype = compute_dtype(probs.dtype)
    with torch.autocast(device_type=probs.device.type, enabled=False):
        z = _kernel_field(probs, image, w1, theta_alpha, theta_beta, w2, theta_gamma, stride,
                          backend, valid)
        if variant == "mean":
            pbar = z / (w1 + w2)
            return pbar, pbar.clamp_min(torch.finfo(dtype).tiny).log()
        # exp (eq. 12): the weights act as an inverse temperature. Each k̂p lies
        # in [0, 1], so without w1, w2 (total 13 by default) the exponent would
        # span at most 1 and p̄ would be flatter than the mean, not sharper.
        log_pbar = torch.log_softmax(z, dim=1)
        return log_pbar.exp(), log_pbar


def neighborhood_distribution(probs: Tensor, image: Tensor, variant: str = "exp",
                              w1: float = 10.0, theta_alpha: float = 13.0,
                              theta_beta: float = 80.0, w2: float = 3.0,
                              theta_gamma: float = 3.0, stride: float = 4,
                              backend: str = "auto", valid: Tensor | None = None) -> Tensor:
    """The neighbourhood distribution p̄ (eq. 10 or 12): (B, C, h, w).

    probs (B, C, h, w) softmax output; image (B, 3, H, W) in 0–255 at input
    resolution, averaged onto the (h, w) cells inside (`colours_on_grid`); θβ, θγ in input pixels (divided by
    `stride`), θα in colour units. `valid` (B, h, w) bool excludes padding from
    every neighbourhood; p̄ at invalid cells is finite but meaningless.
    Returned in float32 (float64 for float64 probs).
    """
    _check_args(probs, image, variant, w1, theta_alpha, theta_beta, w2, theta_gamma, stride,
                backend, valid)
    pbar, _ = _neighborhood_logits(probs, image, variant, w1, theta_alpha, theta_beta, w2,
                                   theta_gamma, stride, backend, valid)
    return pbar


def neighborhood_loss(probs: Tensor, image: Tensor, variant: str = "exp", w1: float = 10.0,
                      theta_alpha: float = 13.0, theta_beta: float = 80.0, w2: float = 3.0,
                      theta_gamma: float = 3.0, stride: float = 4, backend: str = "auto",
                      grad: str = "auto", log_probs: Tensor | None = None,
                      valid: Tensor | None = None) -> Tensor:
    """The neighbourhood term to minimise, averaged over batch and valid pixels: scalar.

    grad="auto" is the variant's default (`weakseg.config.default_grad`).
    grad="detach" (the `exp` default): mean_i KL(p_i ‖ p̄_i) (eq. 8) with p̄ a
    constant target; grad="both": the same KL back-propagated through p̄ too
    (the `mean` default; for `exp` it makes uniform p a global minimum, see
    docs/method.md); grad="free_energy" (`exp` only): the mean-field free
    energy mean_i[Σ_l p_i log p_i − ½ p_iᵀ (W_s p)_i], W = w1 k̂1 + w2 k̂2,
    W_s = (W + Wᵀ)/2, differentiated through both factors; its gradient is
    log p + 1 − W_s p, detach's gradient when W is symmetric (its value differs
    from the KL). `log_probs` (log-softmax of the same logits) gives an exact
    log p; otherwise log p is taken from clamped `probs`. `valid` (B, h, w) bool
    drops padding from the mean and from every neighbourhood.
    """
    if grad == "auto":
        grad = default_grad(variant)
    if grad not in GRAD_MODES:
        raise ValueError(f"unknown grad mode {grad!r}; expected 'auto' or one of {GRAD_MODES}")
    _check_args(probs, image, variant, w1, theta_alpha, theta_beta, w2, theta_gamma, stride,
                backend, valid)
    if grad == "free_energy" and variant != "exp":
        raise ValueError(f"grad 'free_energy' is the free energy of the exp variant (eq. 12), "
                         f"not of {variant!r}")
    if log_probs is not None and log_probs.shape != probs.shape:
        raise ValueError(f"log_probs must have the shape of probs {tuple(probs.shape)}, "
                         f"got {tuple(log_probs.shape)}")
    dtype = compute_dtype(probs.dtype)
    with torch.autocast(device_type=probs.device.type, enabled=False):
        p = probs.to(dtype)  # (B, C, h, w)
        if log_probs is None:
            log_p = p.clamp_min(torch.finfo(dtype).tiny).log()
        else:
            log_p = log_probs.to(dtype)
        if grad == "free_energy":
            # pᵀ W_s p = pᵀ W p for any W, so the quadratic term needs only the forward
            # filters; autograd's pass through W p supplies the Wᵀ p half of the gradient.
            z = _kernel_field(probs, image, w1, theta_alpha, theta_beta, w2, theta_gamma,
                              stride, backend, valid)  # (B, C, h, w), W p over valid cells only
            second = log_p - 0.5 * z  # per cell: Σ_l p (log p − ½ (W p))
        else:
            source = probs.detach() if grad == "detach" else probs
            _, log_pbar = _neighborhood_logits(source, image, variant, w1, theta_alpha, theta_beta,
                                               w2, theta_gamma, stride, backend, valid)
            second = log_p - log_pbar  # per cell: KL(p ‖ p̄) = Σ_l p (log p − log p̄)
        if valid is None:
            return (p * second).sum(dim=1).mean()
        keep = valid[:, None]  # (B, 1, h, w)
        # Zero padding in both factors before the product so garbage there cannot
        # reach the value or the gradient.
        per_cell = (torch.where(keep, p, 0.0) * torch.where(keep, second, 0.0)).sum(dim=1)  # (B, h, w)
        return per_cell.sum() / valid.sum().clamp_min(1)  # scalar
