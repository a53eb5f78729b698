"""An image-level classification loss on pooled softmax probabilities (beyond the paper).

From random init, the paper's objective can settle on "background everywhere":
its pixel targets q come from the network's own p, and a p that does not know
which classes an image holds gives q that only reinforce position biases. A
binary cross-entropy of the image labels against a per-class score pooled over
the pixels teaches classification directly. The score pools the SOFTMAX
PROBABILITIES p(c), not the logits: then an object class can only score high
by taking pixels from the background, the competition the pixel loss needs.
(On pooled logits the background channel gets no gradient and the pixel loss
pulls everything back to it.)

    s_c = (1/r) log mean_j exp(r p_j(c))   (lse; r → ∞: max, r → 0: average)
    s_c = mean of the top ⌈k·N⌉ values of p_j(c)   (topk, k = loss.object_fraction)
    L_img = mean_{b, c ≥ 1} BCE(s_c, y_c)

On probabilities, lse with a moderate r scores a class by its share of the image
(an object on 7 % of the pixels, p = 1 there, scores 0.47 at r = 5), so the loss
asks every present class to cover the whole image. Top-k pooling (the rank
pooling of Kolesnikov & Lampert's SEC, ECCV 2016, with a hard cut-off) scores
1 once the object's expected area is covered and asks for nothing beyond it.

`weak_loss_with_image_level` adds `cls_weight · L_img` to eq. 18, or trains it
alone during the classification-first phase.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from weakseg.config import LossConfig
from weakseg.losses.objective import LossParts, valid_on_grid, weak_loss

EPS = 1e-6  # pooled scores are clamped to [EPS, 1 - EPS] before the log


def pooled_scores(probs: Tensor, pool: str, r: float = 5.0, valid: Tensor | None = None, k: float = 0.1) -> Tensor:
    """probs (B, C, h, w) -> object-class scores (B, C-1) in [0, 1]; valid (B, h, w) bool restricts the pool.

    `k` is the share of (valid) pixels top-k pooling averages."""
    x = probs[:, 1:].flatten(2)  # (B, C-1, N)
    if pool == "topk":
        if valid is None:
            n = torch.full((x.shape[0],), x.shape[-1], device=x.device)
        else:
            n = valid.flatten(1).sum(-1)  # (B,)
            x = torch.where(valid.flatten(1)[:, None], x, torch.full_like(x, -1.0))  # invalid pixels rank last
        top = torch.sort(x, dim=-1, descending=True).values  # (B, C-1, N)
        kk = torch.ceil(k * n.to(x.dtype)).clamp(min=1)  # (B,) pixels averaged per image
        take = torch.arange(x.shape[-1], device=x.device)[None, None] < kk[:, None, None]  # (B, 1, N)
        return (top * take).sum(-1) / kk[:, None]
    if valid is None:
        w = torch.full_like(x[:, :1], 1.0 / x.shape[-1])  # (B, 1, N)
    else:
        v = valid.flatten(1)[:, None].to(x.dtype)
        w = v / v.sum(-1, keepdim=True).clamp(min=1.0)
    if pool == "avg":
        return (x * w).sum(-1)
    if pool == "max":
        return torch.where(w > 0, x, torch.zeros_like(x)).amax(-1)
    if pool == "lse":
        return torch.logsumexp(r * x + torch.log(w.clamp(min=1e-38)), dim=-1) / r
    raise ValueError(f"unknown pooling {pool!r}")


def image_level_loss(probs: Tensor, labels: Tensor, pool: str, r: float = 5.0, valid: Tensor | None = None,
                     k: float = 0.1) -> Tensor:
    """Mean binary cross-entropy of the object-class labels (B, C) against the pooled scores."""
    s = pooled_scores(probs, pool, r, valid, k).clamp(EPS, 1 - EPS)
    y = labels[:, 1:].to(s.dtype)
    return F.binary_cross_entropy(s, y)


def weak_loss_with_image_level(
    logits: Tensor, labels: Tensor, image: Tensor, cfg: LossConfig, lam: float, image_only: bool,
    valid: Tensor | None = None,
) -> LossParts:
    """Eq. 18 plus `cfg.cls_weight` × the image-level loss; only the latter while `image_only`."""
    if image_only:
        zero = torch.zeros((), device=logits.device)
        parts = LossParts(total=zero, cls=zero, neighb=zero, lam=0.0)
    else:
        parts = weak_loss(logits, labels, image, cfg, lam, valid)
    if cfg.cls_weight > 0:
        p = F.softmax(logits.float(), dim=1)
        grid_valid = valid_on_grid(valid, tuple(logits.shape[-2:]))
        img = image_level_loss(p, labels, cfg.cls_pool, cfg.cls_lse_r, grid_valid, cfg.object_fraction)
        parts.total = parts.total + cfg.cls_weight * img
        parts.image = img.detach()
    return parts

