"""The training objective of eq. 18, written as a loss to minimise.

    L = L_class + λ · L_neighb,
    L_class  = −mean_j Σ_l q_j(l) log p_j(l)      (eq. 4, q from the adaptive prior, eq. 5–7)
    L_neighb = mean_j KL(p_j ‖ p̄_j)               (eq. 8, p̄ from eq. 10 or 12)

The paper writes eq. 18 as a quantity to maximise (E_q log p − λ KL); this is
its negative. With `supervision=full` the same network is trained with plain
cross-entropy on the pixel masks: the upper bound weak results are compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from weakseg.config import LossConfig
from weakseg.data.classes import IGNORE_INDEX
from weakseg.losses.neighborhood import neighborhood_loss
from weakseg.losses.prior import foreground_demand, pixel_label_targets
from weakseg.model import OUTPUT_STRIDE, output_size, upsample_logits


@dataclass
class LossParts:
    total: Tensor  # scalar, what backward() is called on
    cls: Tensor  # scalar, L_class (or the full-supervision cross-entropy)
    neighb: Tensor  # scalar, KL term before λ (0 when off)
    lam: float  # λ used at this step (after warm-up)
    image: Tensor | None = None  # scalar, the image-level loss before its weight (None when off)


def lam_at(cfg: LossConfig, iteration: int) -> float:
    """λ at a given iteration: linear warm-up over `lam_warmup` iterations, then constant."""
    if cfg.variant == "none":
        return 0.0
    if cfg.lam_warmup <= 0:
        return cfg.lam
    return cfg.lam * min(1.0, iteration / cfg.lam_warmup)


def valid_on_grid(valid: Tensor | None, size: tuple[int, int]) -> Tensor | None:
    """Input-resolution validity (B, H, W) -> output grid (B, h, w): a cell counts if mostly real.

    On the model's grid, cell (r, c) covers pixels [4r, 4r+4) x [4c, 4c+4), the
    part beyond the input counting as not real.
    """
    if valid is None:
        return None
    H, W = valid.shape[-2:]
    h, w = size
    if (H, W) == (h, w):
        return valid > 0.5 if valid.is_floating_point() else valid.bool()
    v = valid[:, None].float()  # (B, 1, H, W)
    if output_size(H, W) == (h, w):
        frac = F.avg_pool2d(F.pad(v, (0, OUTPUT_STRIDE * w - W, 0, OUTPUT_STRIDE * h - H)), OUTPUT_STRIDE)
    else:
        frac = F.adaptive_avg_pool2d(v, size)
    return frac[:, 0] > 0.5


def weak_loss(
    logits: Tensor, labels: Tensor, image: Tensor, cfg: LossConfig, lam: float, valid: Tensor | None = None
) -> LossParts:
    """logits (B, C, h, w), labels (B, C) in {0,1}, image (B, 3, H, W) 0–255, valid (B, H, W) bool or None."""
    logits = logits.float()  # the losses always run in float32, also under AMP
    log_p = F.log_softmax(logits, dim=1)  # (B, C, h, w)
    p = log_p.exp()
    grid_valid = valid_on_grid(valid, tuple(logits.shape[-2:]))
    c_fg = foreground_demand(p.detach(), labels, cfg.c_fg_mode, cfg.c_fg, cfg.object_fraction, grid_valid)
    q = pixel_label_targets(p.detach(), labels, c_bg=cfg.c_bg, c_fg=c_fg, valid=grid_valid)  # (B, C, h, w)
    ce = -(q * log_p).sum(dim=1)  # (B, h, w)
    if grid_valid is not None:
        w = grid_valid.to(ce.dtype)
        cls = (ce * w).sum() / w.sum().clamp(min=1.0)  # no boolean indexing: no host sync
    else:
        cls = ce.mean()
    if lam > 0 and cfg.variant != "none":
        neighb = neighborhood_loss(
            p,
            image,
            variant=cfg.variant,
            w1=cfg.w1,
            theta_alpha=cfg.theta_alpha,
            theta_beta=cfg.theta_beta,
            w2=cfg.w2,
            theta_gamma=cfg.theta_gamma,
            stride=OUTPUT_STRIDE,
            backend=cfg.backend,
            grad=cfg.grad,
            log_probs=log_p,
            valid=grid_valid,
        )
        total = cls + lam * neighb
    else:
        neighb = torch.zeros((), device=logits.device)
        total = cls
    return LossParts(total=total, cls=cls, neighb=neighb, lam=lam)


def full_loss(logits: Tensor, mask: Tensor) -> LossParts:
    """Fully supervised upper bound: cross-entropy of the upsampled logits against the mask (255 ignored)."""
    up = upsample_logits(logits.float(), tuple(mask.shape[-2:]))  # (B, C, H, W)
    # sum / count rather than "mean": a crop that is all void gives 0, not NaN
    ce = F.cross_entropy(up, mask, ignore_index=IGNORE_INDEX, reduction="sum")
    cls = ce / (mask != IGNORE_INDEX).sum().clamp(min=1)
    return LossParts(total=cls, cls=cls, neighb=torch.zeros((), device=logits.device), lam=0.0)
