"""The objective of eq. 18 as a loss: L = L_class + λ L_neighb, with its parts for logging."""

import pytest
import torch

from weakseg.config import load_config
from weakseg.losses import neighborhood_loss, pixel_label_targets
from weakseg.losses.objective import valid_on_grid, weak_loss


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 21, 6, 7, generator=g, dtype=torch.float64) * 2
    labels = torch.zeros(2, 21)
    labels[0, [3, 8]] = 1
    labels[1, 15] = 1
    image = torch.rand(2, 3, 24, 28, generator=g, dtype=torch.float64) * 255
    return logits, labels, image


def test_total_is_class_plus_lambda_times_kl():
    logits, labels, image = inputs()
    cfg = load_config("demo", ["loss.lam=0.7", "loss.variant=mean"]).loss
    parts = weak_loss(logits, labels, image, cfg, lam=0.7)
    p = logits.float().softmax(1)
    q = pixel_label_targets(p, labels, c_bg=cfg.c_bg, c_fg=cfg.c_fg)
    cls = -(q * p.log()).sum(1).mean()
    kl = neighborhood_loss(p, image.float(), variant="mean", w1=cfg.w1, theta_alpha=cfg.theta_alpha,
                           theta_beta=cfg.theta_beta, w2=cfg.w2, theta_gamma=cfg.theta_gamma, stride=4,
                           backend=cfg.backend)
    torch.testing.assert_close(parts.cls, cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.neighb, kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.total, cls + 0.7 * kl, rtol=1e-5, atol=1e-6)


def test_class_loss_gradient_is_p_minus_q():
    """With q a constant target summing to 1, d/dlogits of −mean Σ q log softmax(f) = (p − q) / #pixels."""
    logits, labels, image = inputs(1)
    logits = logits.float().requires_grad_()
    cfg = load_config("demo").loss
    parts = weak_loss(logits, labels, image.float(), cfg, lam=0.0)
    parts.total.backward()
    p = logits.detach().softmax(1)
    q = pixel_label_targets(p, labels, c_bg=cfg.c_bg, c_fg=cfg.c_fg)
    n = logits.shape[0] * logits.shape[2] * logits.shape[3]
    torch.testing.assert_close(logits.grad, (p - q) / n, rtol=1e-4, atol=1e-7)
    assert float(parts.neighb) == 0.0  # λ = 0: the neighbourhood term is not even computed


def test_padding_is_excluded_from_the_class_loss():
    logits, labels, image = inputs(2)
    cfg = load_config("demo").loss
    valid = torch.ones(2, 24, 28, dtype=torch.bool)
    valid[:, 12:] = False  # bottom half of every input is padding
    parts = weak_loss(logits.float(), labels, image.float(), cfg, lam=0.0, valid=valid)
    grid = valid_on_grid(valid, (6, 7))
    assert grid[:, :3].all() and not grid[:, 3:].any()
    p = logits.float().softmax(1)
    q = pixel_label_targets(p, labels, c_bg=cfg.c_bg, c_fg=cfg.c_fg, valid=grid)
    ce = -(q * p.log()).sum(1)  # (B, h, w)
    assert float(parts.cls) == pytest.approx(float(ce[:, :3].mean()), rel=1e-5)


def test_validity_on_the_grid_counts_each_cells_own_pixels():
    """Cell (r, c) is real when more than half of pixels [4r, 4r+4) x [4c, 4c+4) are (beyond the input: not)."""
    g = torch.Generator().manual_seed(5)
    H, W = 18, 27  # grid 5 x 7; the last row and column of cells hang over the edge
    valid = torch.rand(2, H, W, generator=g) > 0.4
    expected = torch.zeros(2, 5, 7, dtype=torch.bool)
    for b in range(2):
        for r in range(5):
            for c in range(7):
                real = valid[b, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].sum().item()
                expected[b, r, c] = real > 8
    assert torch.equal(valid_on_grid(valid, (5, 7)), expected)
