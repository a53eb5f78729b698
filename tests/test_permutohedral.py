"""Permutohedral-lattice filter against the exact Gaussian sum and exact identities.

The oracle is a plain O(N²) float64 sum written here (cdist without the
matrix-product shortcut), on ≤ ~3000 points. The lattice is an approximation,
so accuracy tests bound the error at levels measured on these fixed seeds
(run with `-s` to see them); structural properties (self exclusion, symmetry,
linearity, batching, the exact diagonal) are checked to float precision.
"""

from __future__ import annotations

import math

import pytest
import torch

from weakseg.errors import UserError
import weakseg.losses.permutohedral as perm
from weakseg.losses.permutohedral import PermutohedralLattice, permutohedral_filter

F64 = torch.float64


def exact_filter(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_{j≠i} exp(-½‖f_i − f_j‖²) v_j by brute force, float64."""
    f, v = features.to(F64), values.to(F64)
    dist = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")  # (B, N, N)
    k = torch.exp(-0.5 * dist.square())
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k @ v


def image_features(h: int, w: int, theta_alpha: float, theta_beta: float, noise: float,
                   seed: int) -> torch.Tensor:
    """(1, h*w, 5) [row/θβ, col/θβ, rgb/θα] of a piecewise-constant noisy image."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(4, 3, generator=g, dtype=F64) * 255
    rows, cols = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64),
                                indexing="ij")
    img = colours[0][:, None, None].repeat(1, h, w)  # (3, h, w)
    img[:, : h // 2, : w // 3] = colours[1][:, None, None]
    img[:, h // 3:, w // 2:] = colours[2][:, None, None]
    disk = (rows - 0.6 * h) ** 2 + (cols - 0.3 * w) ** 2 < (0.2 * min(h, w)) ** 2
    img[:, disk] = colours[3][:, None]
    img = img + noise * torch.randn(img.shape, generator=g, dtype=F64)
    pos = torch.stack([rows, cols]) / theta_beta
    return torch.cat([pos, img / theta_alpha]).reshape(5, -1).T[None].contiguous()


def smooth_probabilities(features: torch.Tensor, classes: int, seed: int) -> torch.Tensor:
    """(B, N, classes) softmax of random linear logits in feature space: spatially smooth."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(features.shape[-1], classes, generator=g, dtype=F64)
    return torch.softmax(features.to(F64) @ weights, dim=-1)


def errors(features: torch.Tensor, label: str) -> tuple[float, float, float]:
    """(raw relative error, row-normalised relative error, coverage); prints them.

    Raw: iid uniform values, all points. Row-normalised: (K p)/(K 1) for
    smooth class probabilities p, over the points whose exact K 1 exceeds 0.5
    (at least about one close neighbour; elsewhere the neighbourhood loss's ε
    fallback takes over); coverage is their fraction.
    """
    g = torch.Generator().manual_seed(1)
    B, N, _ = features.shape
    u = torch.rand(B, N, 3, generator=g, dtype=F64)
    p = smooth_probabilities(features, 3, seed=2)
    values = torch.cat([u, p, torch.ones(B, N, 1, dtype=F64)], -1)
    approx, exact = permutohedral_filter(features, values), exact_filter(features, values)
    raw = ((approx[..., :3] - exact[..., :3]).norm() / exact[..., :3].norm()).item()
    mask = exact[..., 6] > 0.5
    eps = 1e-12
    norm_a = (approx[..., 3:6] + eps * p)[mask] / (approx[..., 6:] + eps)[mask]
    norm_e = exact[..., 3:6][mask] / exact[..., 6:][mask]
    normalised = ((norm_a - norm_e).norm() / norm_e.norm()).item()
    worst = (norm_a - norm_e).abs().max().item()
    coverage = mask.double().mean().item()
    print(f"\n{label:44s} raw {raw:6.1%}  row-normalised {normalised:6.2%} (max abs {worst:.3f}, "
          f"coverage {coverage:4.0%}, median exact K1 {exact[..., 6].median():6.1f})")
    return raw, normalised, coverage


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8])
def test_elevation_and_enclosing_simplex(d: int) -> None:
    g = torch.Generator().manual_seed(d)
    f = torch.randn(500, d, generator=g, dtype=F64) * 3
    y = perm._elevate(f)
    # E is √(2/3)(d+1) times an isometry onto the plane Σ y = 0 (Adams et al. §3.1)
    assert y.sum(1).abs().max() < 1e-10
    scale = math.sqrt(2 / 3) * (d + 1)
    exact = "donot_use_mm_for_euclid_dist"
    torch.testing.assert_close(torch.cdist(y, y, compute_mode=exact),
                               scale * torch.cdist(f, f, compute_mode=exact))
    rem0, rank, bary = perm._enclosing_simplex(y)
    d1 = d + 1
    assert torch.equal(rank.sort(1).values, torch.arange(d1).expand(500, d1))  # a permutation
    r = torch.arange(d1)
    vertices = rem0[:, None, :] + r[:, None] - d1 * (rank[:, None, :] > (d - r)[:, None]).long()
    assert torch.equal(vertices.sum(-1), torch.zeros(500, d1, dtype=torch.long))
    assert torch.equal(vertices % d1, r[:, None].expand(500, d1, d1))  # vertex r has remainder r
    assert bary.min() > -1e-12 and (bary.sum(1) - 1).abs().max() < 1e-12
    torch.testing.assert_close((bary[..., None] * vertices.to(F64)).sum(1), y)  # encloses y


def test_gaussian_scale_matches_dense_impulse_responses() -> None:
    """c makes the kernel integrate like exp(-½r²) where points are dense, with unit variance."""
    for d, density, side in [(1, 30, 8.0), (2, 30, 7.0), (3, 20, 6.0), (5, 10, 4.5)]:
        g = torch.Generator().manual_seed(d)
        n = int(density * side ** d)
        f = torch.rand(1, n, d, generator=g, dtype=F64) * side
        centre = (f[0] - side / 2).norm(dim=1)
        probes = torch.nonzero(centre < 0.75).flatten()[:24]
        values = torch.zeros(1, n, len(probes), dtype=F64)
        values[0, probes, torch.arange(len(probes))] = 1
        k_lat = permutohedral_filter(f, values)[0]  # (n, probes): k(i, probe)
        r = torch.cdist(f[0], f[0, probes])
        k_true = torch.exp(-0.5 * r.square())
        k_true[probes, torch.arange(len(probes))] = 0
        integral = (k_lat.sum(0) / k_true.sum(0)).mean().item()
        variance = ((k_lat * r.square()).sum(0) / (k_true * r.square()).sum(0)).mean().item()
        print(f"\nd={d} n={n}: integral ratio {integral:.3f}, second-moment ratio {variance:.3f}")
        assert abs(integral - 1) < 0.05
        assert abs(variance - 1) < 0.1


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("d, spread, raw_bound, norm_bound", [
    # Gaussian clouds of 2000 points, from dense (median K1 in the hundreds)
    # to sparse (median K1 ≈ 5): the lattice drops the mass it blurs towards
    # empty lattice points, which costs most in d = 5 when points are sparse.
    (2, 0.7, 0.07, 0.03), (2, 5.0, 0.03, 0.015),
    (3, 0.7, 0.10, 0.035), (3, 2.0, 0.03, 0.03), (3, 5.0, 0.20, 0.06),
    (5, 0.7, 0.16, 0.05), (5, 2.0, 0.50, 0.16),
])
def test_accuracy_random_features(d: int, spread: float, raw_bound: float,
                                  norm_bound: float) -> None:
    g = torch.Generator().manual_seed(10 * d + int(10 * spread))
    f = torch.randn(1, 2000, d, generator=g, dtype=F64) * spread
    raw, normalised, coverage = errors(f, f"gaussian cloud d={d} std={spread}")
    assert raw < raw_bound
    assert normalised < norm_bound
    assert coverage > 0.85


@pytest.mark.parametrize("theta_alpha, theta_beta, noise", [
    (13.0, 20.0, 8.0),   # the paper's θα, θβ = 80 / stride 4
    (13.0, 20.0, 2.0),   # nearly noiseless regions
    (13.0, 5.0, 8.0),    # small spatial bandwidth
    (5.0, 10.0, 8.0),    # small colour bandwidth: noise spreads points out
    (30.0, 40.0, 8.0),   # wide kernels
])
def test_accuracy_image_like_features(theta_alpha: float, theta_beta: float, noise: float) -> None:
    f = image_features(50, 60, theta_alpha, theta_beta, noise, seed=3)
    raw, normalised, _ = errors(f, f"image 50x60 θα={theta_alpha} θβ={theta_beta} noise={noise}")
    assert raw < 0.3
    assert normalised < (0.08 if theta_alpha < 10 else 0.02)


def test_spatial_grid_features() -> None:
    """d = 2 regular grid (the θγ kernel): the easy case, a few percent."""
    rows, cols = torch.meshgrid(torch.arange(50, dtype=F64), torch.arange(50, dtype=F64),
                                indexing="ij")
    for theta in (1.0, 3.0, 8.0):
        f = (torch.stack([rows, cols], -1).reshape(1, -1, 2) / theta)
        raw, normalised, _ = errors(f, f"grid 50x50 θ={theta}")
        assert raw < 0.05
        assert normalised < 0.015


# ----------------------------------------------------------------------------- self term


def test_isolated_point_gets_nothing_and_changes_nothing() -> None:
    g = torch.Generator().manual_seed(4)
    for d in (1, 2, 5):
        cluster = torch.randn(1, 200, d, generator=g, dtype=F64)
        cluster -= cluster.mean(1, keepdim=True)
        # two far points placed symmetrically keep the features' mean (the lattice origin)
        far = torch.stack([torch.full((d,), 50.0, dtype=F64), torch.full((d,), -50.0, dtype=F64)])
        v = torch.rand(1, 202, 2, generator=g, dtype=F64) + 1
        out = permutohedral_filter(torch.cat([cluster, far[None]], 1), v)
        assert out[0, -2:].abs().max() < 1e-12  # exp(-½·50²·d) is 0 too
        # the far points' vertices are disjoint from the cluster's: no effect on it
        torch.testing.assert_close(out[:, :-2], permutohedral_filter(cluster, v[:, :-2]),
                                   rtol=1e-12, atol=1e-12)
        assert permutohedral_filter(far[None, :1], v[:, :1]).abs().max() < 1e-12


def test_filter_of_ones_is_non_negative_and_exactly_zero_when_isolated_in_float32() -> None:
    """The normaliser K·1: float32 rounding of the self-term subtraction must not
    leave ±1e-7 noise (of either sign) at points with no neighbour."""
    g = torch.Generator().manual_seed(16)
    for d in (2, 5):
        f = torch.cat([torch.randn(1, 500, d, generator=g) * 3,  # sparse tails
                       torch.full((1, 1, d), 80.0)], 1)
        k1 = permutohedral_filter(f, torch.ones(1, 501, 1))[0, :, 0]
        assert k1.min() >= 0
        assert k1[-1] == 0
        exact = exact_filter(f, torch.ones(1, 501, 1))[0, :, 0]
        assert (k1 == 0).sum() >= (exact < 1e-12).sum()  # every truly lonely point is cut out
        # and only points the lattice sees as lonely in float64 too (its kernel
        # has a finite reach, about 2 std for sparse points in 5-D)
        k1_64 = permutohedral_filter(f.double(), torch.ones(1, 501, 1, dtype=F64))[0, :, 0]
        assert k1_64[k1 == 0].abs().max() < 1e-12
        assert k1_64[k1 > 0].min() > 1e-6


@pytest.mark.parametrize("d", [1, 2, 5])
def test_two_points_exchange_gaussian_weight(d: int) -> None:
    """Each of two points receives k·v_other and nothing of itself, k ≈ exp(-r²/2).

    Many independent pairs (one per batch image) at random positions and
    directions: per pair k varies with the lattice alignment (an isolated pair
    also loses the mass the blur sends to empty lattice points), on average it
    tracks the Gaussian.
    """
    g = torch.Generator().manual_seed(5)
    pairs = 400
    for r in (0.25, 0.5, 1.0, 1.5):
        base = torch.rand(pairs, 1, d, generator=g, dtype=F64) * 20
        direction = torch.randn(pairs, 1, d, generator=g, dtype=F64)
        f = torch.cat([base, base + r * direction / direction.norm(dim=-1, keepdim=True)], 1)
        v = torch.eye(2, dtype=F64).expand(pairs, 2, 2)  # point i carries channel i
        out = permutohedral_filter(f, v)  # (pairs, 2, 2)
        assert out[:, 0, 0].abs().max() < 1e-12 and out[:, 1, 1].abs().max() < 1e-12
        torch.testing.assert_close(out[:, 0, 1], out[:, 1, 0])  # symmetric
        k = out[:, 0, 1]
        target = math.exp(-r * r / 2)
        print(f"\nd={d} r={r}: mean k {k.mean():.3f} (min {k.min():.3f}, max {k.max():.3f}), "
              f"exp(-r²/2) = {target:.3f}")
        assert k.min() >= -1e-12
        assert abs(k.mean().item() / target - 1) < 0.3
        assert k.max() < 1.6 * target


@pytest.mark.parametrize("d, table", [(1, True), (2, True), (3, True), (5, True), (5, False),
                                      (7, False)])
def test_self_weight_is_the_operators_exact_diagonal(d: int, table: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Filtering unit vectors gives the whole operator: its diagonal must be 0.

    The diagonal is computed from blur paths (`_self_weights`); the operator
    from splat/blur/slice, which do not use it. `table` False forces the
    path-walking variant used above d = 5.
    """
    if not table:
        monkeypatch.setattr(perm, "_WORD_MAX_D1", 0)
    g = torch.Generator().manual_seed(6)
    for spread in (0.5, 2.0, 6.0):
        n = 150
        f = torch.randn(1, n, d, generator=g, dtype=F64) * spread
        k = permutohedral_filter(f, torch.eye(n, dtype=F64)[None])[0]  # (n, n)
        assert k.diagonal().abs().max() < 1e-13
        assert k.min() > -1e-13  # non-negative weights
        torch.testing.assert_close(k, k.T, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- linear algebra


def test_symmetry_and_linearity() -> None:
    g = torch.Generator().manual_seed(7)
    f = image_features(20, 25, 13.0, 5.0, 8.0, seed=7)
    u = torch.randn(1, 500, 3, generator=g, dtype=F64)
    v = torch.randn(1, 500, 3, generator=g, dtype=F64)
    lattice = PermutohedralLattice(f, F64)
    fu, fv = lattice.filter(u), lattice.filter(v)
    left, right = (fu * v).sum(), (u * fv).sum()
    assert abs(left - right) < 1e-12 * left.abs()
    torch.testing.assert_close(lattice.filter(2.5 * u - v), 2.5 * fu - fv, rtol=1e-12, atol=1e-12)
    # channels are independent
    torch.testing.assert_close(lattice.filter(u[..., :1]), fu[..., :1], rtol=1e-13, atol=1e-13)


def test_gradcheck_values() -> None:
    g = torch.Generator().manual_seed(8)
    f = torch.randn(2, 25, 3, generator=g, dtype=F64)
    v = torch.randn(2, 25, 2, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: permutohedral_filter(f, x), (v,))
    assert torch.autograd.gradgradcheck(lambda x: permutohedral_filter(f, x), (v,))


def test_no_gradient_to_features() -> None:
    f = torch.randn(1, 30, 2, dtype=F64, requires_grad=True)
    v = torch.rand(1, 30, 2, dtype=F64, requires_grad=True)
    permutohedral_filter(f, v).square().sum().backward()
    assert f.grad is None and v.grad is not None


def test_batch_images_are_independent() -> None:
    g = torch.Generator().manual_seed(9)
    f = torch.randn(2, 300, 5, generator=g, dtype=F64) * 2
    f[1] += 0.3  # overlapping feature ranges: only the batch id keeps them apart
    v = torch.rand(2, 300, 4, generator=g, dtype=F64)
    batched = permutohedral_filter(f, v)
    for b in range(2):
        torch.testing.assert_close(batched[b:b + 1], permutohedral_filter(f[b:b + 1], v[b:b + 1]),
                                   rtol=1e-13, atol=1e-13)


def test_float32_matches_float64() -> None:
    f = image_features(30, 30, 13.0, 10.0, 8.0, seed=11)
    v = smooth_probabilities(f, 4, seed=12)
    out64 = permutohedral_filter(f, v)
    out32 = permutohedral_filter(f.float(), v.float())
    assert out32.dtype == torch.float32 and out64.dtype == F64
    assert ((out32.double() - out64).norm() / out64.norm()) < 1e-5


def test_lattice_reuse_matches_one_shot_calls() -> None:
    g = torch.Generator().manual_seed(13)
    f = torch.randn(1, 400, 3, generator=g) * 2
    lattice = PermutohedralLattice(f)
    assert 0 < lattice.num_vertices <= 400 * 4
    for c in (1, 5):
        v = torch.rand(1, 400, c, generator=g)
        torch.testing.assert_close(lattice.filter(v), permutohedral_filter(f, v))
    strided = torch.rand(1, 5, 400, generator=g).transpose(1, 2)  # as (B, C, h·w) maps give
    torch.testing.assert_close(lattice.filter(strided), lattice.filter(strided.contiguous()))


# ----------------------------------------------------------------------------- hashing


def test_key_packing_fits_a_voc_image_with_theta_one() -> None:
    """The extreme case the packing must hold: 500×500 positions and 0–255 colours, θ = 1, B = 20.

    The key radices depend only on each lattice coordinate's range, a linear
    function of the features, so the 32 corners of the feature box bound it.
    """
    corners = torch.cartesian_prod(*[torch.tensor([0.0, hi]) for hi in (500, 500, 255, 255, 255)])
    rem0, rank, _ = perm._enclosing_simplex(perm._elevate(corners - corners.mean(0)))
    coord_of_rank = torch.argsort(rank, dim=1)
    packed = perm._packed_keys(rem0, coord_of_rank, torch.zeros(32, dtype=torch.long), 20)
    assert packed is not None


def test_unpackable_ranges_fall_back_to_row_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(14)
    f = torch.randn(2, 200, 5, generator=g, dtype=F64) * 2
    v = torch.rand(2, 200, 3, generator=g, dtype=F64)
    packed = permutohedral_filter(f, v)
    monkeypatch.setattr(perm, "_KEY_LIMIT", 1)
    torch.testing.assert_close(permutohedral_filter(f, v), packed, rtol=1e-13, atol=1e-13)
    monkeypatch.undo()
    # a genuinely huge range (two clusters 10⁹ apart): exact within each cluster's accuracy
    f2 = torch.cat([torch.randn(1, 150, 3, generator=g, dtype=F64),
                    torch.randn(1, 150, 3, generator=g, dtype=F64) + 1e9], 1)
    assert perm._packed_keys(*_lattice_inputs(f2[0]), torch.zeros(300, dtype=torch.long), 1) is None
    v2 = torch.rand(1, 300, 2, generator=g, dtype=F64)
    out, exact = permutohedral_filter(f2, v2), exact_filter(f2 - f2.mean(1, keepdim=True), v2)
    assert ((out - exact).norm() / exact.norm()) < 0.2


def _lattice_inputs(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rem0, rank, _ = perm._enclosing_simplex(perm._elevate(f - f.mean(0)))
    return rem0, torch.argsort(rank, dim=1)


# ----------------------------------------------------------------------------- edges and errors


def test_degenerate_sizes() -> None:
    assert permutohedral_filter(torch.zeros(2, 0, 5), torch.zeros(2, 0, 3)).shape == (2, 0, 3)
    assert torch.equal(permutohedral_filter(torch.zeros(1, 1, 5), torch.ones(1, 1, 3)),
                       torch.zeros(1, 1, 3))
    assert permutohedral_filter(torch.rand(1, 10, 2), torch.zeros(1, 10, 0)).shape == (1, 10, 0)


def test_coincident_points_share_one_weight() -> None:
    """All points at one place: out_i = κ Σ_{j≠i} v_j with one κ (exactly 1 for the true kernel)."""
    f = torch.full((1, 50, 5), 0.3, dtype=F64)
    v = torch.rand(1, 50, 1, dtype=F64)
    out = permutohedral_filter(f, v)
    kappa = out / (v.sum(1, keepdim=True) - v)
    torch.testing.assert_close(kappa, kappa[:, :1].expand_as(kappa))
    assert 0.5 < kappa[0, 0, 0] < 1.6


def test_bad_inputs() -> None:
    with pytest.raises(UserError, match="features"):
        permutohedral_filter(torch.tensor([[[0.0, float("nan")]]]), torch.ones(1, 1, 1))
    with pytest.raises(ValueError, match="same B, N"):
        permutohedral_filter(torch.zeros(1, 4, 2), torch.zeros(1, 3, 1))
    with pytest.raises(ValueError, match="like the features"):
        PermutohedralLattice(torch.zeros(1, 4, 2)).filter(torch.zeros(2, 4, 1))


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    f = image_features(30, 40, 13.0, 10.0, 8.0, seed=15)
    v = smooth_probabilities(f, 5, seed=16).requires_grad_()
    cpu = permutohedral_filter(f, v)
    gpu = permutohedral_filter(f.to("cuda"), v.detach().to("cuda").requires_grad_())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-10)
