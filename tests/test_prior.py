"""Adaptive max-entropy prior (eq. 5–7, 19–22) against independent oracles.

Oracles: scipy's SLSQP from many starting points on the same program in float64
(both in β and in log β), on i.i.d. and on network-like (spatially smooth)
probabilities, brute-force grid scans (|y| = 2 in one dimension, |y| = 3 over a
2-D grid), scipy's brentq for the |y| = 2 root at full resolution, closed forms
(flat probabilities: q = β, so the program is water-filling; a two-pixel case
solved by the quadratic formula), random sampling for the minimum of eq. 22's
violation, and plain re-runs on cropped / per-image / permuted / float32 inputs.
"""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import zoom
from scipy.optimize import brentq, minimize
from scipy.special import entr, expit, softmax

from weakseg.errors import UserError
from weakseg.losses.prior import adaptive_prior, pixel_label_targets

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FLOOR = 1e-30  # the module's probability floor; the oracles apply the same restriction to y


# ---------------------------------------------------------------- oracle helpers

def restrict(probs: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(C, h, w) probabilities -> (N, K) over the present classes, renormalised per pixel."""
    P = np.maximum(probs.reshape(probs.shape[0], -1)[present].T, FLOOR)
    return P / P.sum(1, keepdims=True)


def masses(P: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """m_l = mean_j q_j(l), q_j ∝ p_j β, written directly from eq. 5."""
    w = P * beta
    return (w / w.sum(1, keepdims=True)).mean(0)


def entropy(beta: np.ndarray) -> float:
    b = beta[beta > 0]
    return float(-(b * np.log(b)).sum())


def violation(P: np.ndarray, beta: np.ndarray, c: np.ndarray) -> float:
    """Eq. 22: total shortfall Σ_l (c_l − m_l)_+."""
    return float(np.clip(c - masses(P, beta), 0, None).sum())


def shortfall(P: np.ndarray, beta: np.ndarray, c: np.ndarray) -> float:
    """Worst constraint violation of the program being solved (m ≥ c, or m ≤ c when Σc > 1)."""
    s = 1.0 if c.sum() <= 1 else -1.0
    return float(np.clip(-s * (masses(P, beta) - c), 0, None).max())


def slsqp_oracle(P: np.ndarray, c: np.ndarray, rng: np.random.Generator,
                 starts: int = 8) -> tuple[float, np.ndarray | None]:
    """Best feasible point of max H s.t. m ≥ c (m ≤ c when Σc > 1) over multi-start SLSQP runs."""
    K = len(c)
    s = 1.0 if c.sum() <= 1 else -1.0

    def run_beta(b0):
        cons = [{"type": "eq", "fun": lambda b: b.sum() - 1},
                {"type": "ineq", "fun": lambda b: s * (masses(P, np.clip(b, 0, None) + 1e-300) - c)}]
        r = minimize(lambda b: -entropy(np.clip(b, 0, None)), b0, method="SLSQP", bounds=[(0, 1)] * K,
                     constraints=cons, options={"ftol": 1e-14, "maxiter": 1000})
        b = np.clip(r.x, 0, None)
        return b / b.sum()

    def run_log(b0):
        cons = [{"type": "ineq", "fun": lambda v: s * (masses(P, softmax(v)) - c)}]
        r = minimize(lambda v: -entropy(softmax(v)), np.log(b0), method="SLSQP", constraints=cons,
                     options={"ftol": 1e-14, "maxiter": 1000})
        return softmax(r.x)

    def search(b0s):
        best = (-1.0, None)
        for b0 in b0s:
            b0 = np.clip(b0, 1e-9, None)
            b0 /= b0.sum()
            for run in (run_beta, run_log):
                b = run(b0)
                if shortfall(P, b, c) < 1e-8 and entropy(b) > best[0]:
                    best = (entropy(b), b)
        return best

    best = search([np.full(K, 1.0 / K)]
                  + [rng.dirichlet(np.full(K, a)) for a in (0.3, 1.0, 3.0) for _ in range(starts // 3 + 1)])
    if best[1] is None:  # hard instance: also start near every vertex of the simplex
        best = search([(1 - e) * np.eye(K)[k] + e / K for k in range(K) for e in (0.3, 1e-2, 1e-4)])
    return best


def make_probs(rng: np.random.Generator, C: int, h: int, w: int, kind: str,
               present: np.ndarray) -> np.ndarray:
    N = h * w
    if kind == "flat":
        L = rng.normal(size=(C, N)) * 0.5
    elif kind == "mid":
        L = rng.normal(size=(C, N)) * 2.0
    elif kind == "peaked":  # softmax of large logits: p down to ~1e-12
        L = rng.normal(size=(C, N)) * 6.0
    else:  # "regions": every pixel dominated by one present class, as a trained network would be
        L = rng.normal(size=(C, N)) * 2.0
        ids = np.flatnonzero(present)
        cls = ids[rng.choice(len(ids), size=N, p=rng.dirichlet(np.ones(len(ids))))]
        L[cls, np.arange(N)] += rng.uniform(6, 12, size=N)
    return softmax(L, 0).reshape(C, h, w)


def random_instances(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        C = (21, 6)[i % 2]
        k = 2 + i % 4  # |y| from 2 to 5
        h, w = [(4, 4), (7, 9), (16, 16)][(i // 4) % 3]
        kind = ["flat", "mid", "peaked", "regions"][(i // 12) % 4]
        present = np.zeros(C, bool)
        present[0] = True
        present[rng.choice(np.arange(1, C), k - 1, replace=False)] = True
        cb, cf = (0.4, 0.2) if i % 3 == 0 else (float(rng.uniform(0.0, 0.6)), float(rng.uniform(0.0, 0.35)))
        out.append(dict(C=C, h=h, w=w, probs=make_probs(rng, C, h, w, kind, present), present=present,
                        cb=cb, cf=cf, kind=kind))
    return out


def run_batched(instances: list[dict]) -> list[np.ndarray]:
    """β for every instance, with one adaptive_prior call per (C, h, w, c_bg, c_fg) group."""
    groups: dict = {}
    for i, inst in enumerate(instances):
        groups.setdefault((inst["C"], inst["h"], inst["w"], inst["cb"], inst["cf"]), []).append(i)
    betas = [None] * len(instances)
    for (C, h, w, cb, cf), idx in groups.items():
        probs = torch.tensor(np.stack([instances[i]["probs"] for i in idx]))
        labels = torch.tensor(np.stack([instances[i]["present"] for i in idx])).double()
        out = adaptive_prior(probs, labels, c_bg=cb, c_fg=cf).numpy()
        for j, i in enumerate(idx):
            betas[i] = out[j]
    return betas


# ---------------------------------------------------------------- against scipy

@pytest.mark.parametrize("seed", range(4))  # 4 × 54 = 216 instances
def test_matches_multistart_slsqp_on_random_instances(seed):
    instances = random_instances(seed=seed, n=54)
    betas = run_batched(instances)
    rng = np.random.default_rng(1000 + seed)
    feasible_seen = infeasible_seen = 0
    for inst, beta in zip(instances, betas):
        present = inst["present"]
        assert np.all(beta[~present] == 0.0), "absent classes must get exactly 0"
        b = beta[present]
        assert b.sum() == pytest.approx(1.0, abs=1e-12)
        P = restrict(inst["probs"], present)
        c = np.array([inst["cb"]] + [inst["cf"]] * (len(b) - 1))
        h_ref, b_ref = slsqp_oracle(P, c, rng)
        assert b_ref is not None, "oracle found no feasible point"
        tag = (inst["kind"], len(b), inst["h"], inst["w"], inst["cb"], inst["cf"])
        if c.sum() <= 1:
            feasible_seen += 1
            assert masses(P, b).min() >= 0 and np.all(masses(P, b) >= c - 1e-3), tag
        else:
            infeasible_seen += 1
            assert violation(P, b, c) <= violation(P, b_ref, c) + 1e-3, tag
            assert np.all(masses(P, b) <= c + 1e-3), tag
        assert entropy(b) >= h_ref - 1e-3, (tag, entropy(b), h_ref)
    assert feasible_seen > 25 and infeasible_seen > 4


def smooth_probs(rng: np.random.Generator, C: int, h: int, w: int, sharpness: float) -> np.ndarray:
    """Softmax of spatially smooth logits: a coarse random field upsampled (bilinear), as a network's
    output looks (blobs of classes); sharpness 1 is an untrained network, 10 a confident one."""
    coarse = rng.normal(size=(C, max(2, h // 4), max(2, w // 4)))
    L = zoom(coarse, (1, h / coarse.shape[1], w / coarse.shape[2]), order=1)[:, :h, :w]
    return softmax(L / L.std() * sharpness, 0)


def test_matches_multistart_slsqp_on_network_like_instances():
    rng = np.random.default_rng(2000)
    instances = []
    for i in range(24):
        h, w = [(8, 8), (12, 10), (16, 16)][i % 3]
        k = 3 + i % 3  # |y| = 3, 4 (Σc = 1 at the defaults), 5 (infeasible at the defaults)
        present = np.zeros(21, bool)
        present[0] = True
        present[rng.choice(np.arange(1, 21), k - 1, replace=False)] = True
        cb, cf = (0.4, 0.2) if i % 2 == 0 else (float(rng.uniform(0.1, 0.5)), float(rng.uniform(0.05, 0.3)))
        instances.append(dict(C=21, h=h, w=w, probs=smooth_probs(rng, 21, h, w, (1.0, 3.0, 6.0, 10.0)[i % 4]),
                              present=present, cb=cb, cf=cf))
    betas = run_batched(instances)
    for inst, beta in zip(instances, betas):
        present = inst["present"]
        b = beta[present]
        assert np.all(beta[~present] == 0.0) and b.sum() == pytest.approx(1.0, abs=1e-12)
        P = restrict(inst["probs"], present)
        c = np.array([inst["cb"]] + [inst["cf"]] * (len(b) - 1))
        h_ref, b_ref = slsqp_oracle(P, c, rng)
        assert b_ref is not None
        assert shortfall(P, b, c) <= 1e-9, (len(b), inst["cb"], inst["cf"])
        if c.sum() > 1:
            assert violation(P, b, c) <= violation(P, b_ref, c) + 1e-9
        assert entropy(b) >= h_ref - 1e-3, (len(b), inst["cb"], inst["cf"], entropy(b), h_ref)


def test_global_maximum_at_an_isolated_vertex_by_grid():
    # peaked "regions" probabilities, |y| = 3: every interior path ends at a local maximum
    # with H ≈ 0.716 (only the third class's constraint active), the global one is the vertex
    # where background and third class are both at their bound (H ≈ 0.815)
    inst = random_instances(seed=8, n=54)[41]
    present = inst["present"]
    assert present.sum() == 3 and inst["kind"] == "regions"
    P = restrict(inst["probs"], present)
    c = np.array([inst["cb"], inst["cf"], inst["cf"]])
    x = np.linspace(-10, 10, 401)
    X1, X2 = np.meshgrid(x, x, indexing="ij")
    B = softmax(np.stack([np.zeros_like(X1), X1, X2], -1), -1).reshape(-1, 3)  # (G, 3)
    W = P[None] * B[:, None]
    ok = ((W / W.sum(2, keepdims=True)).mean(1) >= c).all(1)
    h_grid = (-(B * np.log(B)).sum(1))[ok].max()
    assert h_grid > 0.8  # the grid resolves the corner
    beta = one_image(inst["probs"], np.flatnonzero(present), c_bg=inst["cb"], c_fg=inst["cf"])[present]
    assert shortfall(P, beta, c) <= 1e-9
    assert entropy(beta) >= h_grid - 1e-9
    np.testing.assert_allclose(masses(P, beta)[[0, 2]], c[[0, 2]], rtol=0, atol=1e-9)  # exactly the vertex


# ---------------------------------------------------------------- |y| = 2: brute force

def grid_scan_two(P: np.ndarray, c: np.ndarray) -> float:
    """β_1 of the max-entropy point among the grid points with least eq. 22 violation."""
    x = np.linspace(-75.0, 75.0, 300001)  # logit of β_1, step 5e-4
    b1 = 1.0 / (1.0 + np.exp(-x))
    w1 = P[None, :, 1] * b1[:, None]
    m1 = (w1 / (w1 + P[None, :, 0] * (1.0 - b1[:, None]))).mean(1)
    viol = np.clip(c[1] - m1, 0, None) + np.clip(c[0] - (1.0 - m1), 0, None)
    ok = viol <= viol.min() + 1e-12
    ent = entr(b1) + entr(1.0 - b1)
    return float(b1[np.flatnonzero(ok)[np.argmax(ent[ok])]])


@pytest.mark.parametrize("seed", range(6))
def test_two_classes_equal_the_refined_grid_search(seed):
    rng = np.random.default_rng(100 + seed)
    C, h, w = 21, 7, 9
    cases = [(0.4, 0.2), (0.3, 0.5), (0.45, 0.1), (0.7, 0.5), (0.2, 0.75), (0.05, 0.05)]
    probs, labels, cs = [], [], []
    for kind in ("flat", "mid", "peaked", "regions"):
        for cb, cf in cases:
            present = np.zeros(C, bool)
            present[[0, int(rng.integers(1, C))]] = True
            probs.append(make_probs(rng, C, h, w, kind, present))
            labels.append(present)
            cs.append((cb, cf))
    for (cb, cf) in cases:
        idx = [i for i, cc in enumerate(cs) if cc == (cb, cf)]
        beta = adaptive_prior(torch.tensor(np.stack([probs[i] for i in idx])),
                              torch.tensor(np.stack([labels[i] for i in idx])), c_bg=cb, c_fg=cf).numpy()
        for j, i in enumerate(idx):
            P = restrict(probs[i], labels[i])
            c = np.array([cb, cf])
            b1 = beta[j][labels[i]][1]
            ref = grid_scan_two(P, c)
            # the grid's point is within one step (in logit) of the exact answer
            assert abs(math.log(b1 / (1 - b1)) - math.log(ref / (1 - ref))) <= 1e-3, (cb, cf, b1, ref)
            b = np.array([1 - b1, b1])
            assert violation(P, b, c) <= max(c.sum() - 1, 0) + 1e-9  # exact, not up to a grid
            assert entropy(b) >= entropy(np.array([1 - ref, ref])) - 1e-9


@pytest.mark.parametrize("kind", ["peaked", "regions", "smooth"])
def test_two_classes_at_full_resolution_match_brentq(kind):
    # 56×56 grids, the paper's resolution: the root m_1(x) = t of the clamped target, x = log(β_1/β_0)
    rng = np.random.default_rng(300)
    C, h, w = 21, 56, 56
    probs, labels, shares = [], [], []
    for cb, cf in [(0.4, 0.2), (0.3, 0.5), (0.45, 0.1), (0.7, 0.5), (0.05, 0.9), (0.9, 0.05)]:
        present = np.zeros(C, bool)
        present[[0, int(rng.integers(1, C))]] = True
        p = smooth_probs(rng, C, h, w, 8.0) if kind == "smooth" else make_probs(rng, C, h, w, kind, present)
        probs.append(p)
        labels.append(present)
        shares.append((cb, cf))
    for p, present, (cb, cf) in zip(probs, labels, shares):
        beta = one_image(p, np.flatnonzero(present), c_bg=cb, c_fg=cf)[present]
        P = restrict(p, present)
        a = np.log(P[:, 1] / P[:, 0])
        m0 = expit(a).mean()  # m_1 at uniform β
        lo, hi = (cf, 1 - cb) if cb + cf <= 1 else (1 - cb, cf)
        t = min(max(m0, lo), hi)
        x_ref = brentq(lambda x: expit(a + x).mean() - t, -200, 200, xtol=1e-14, rtol=1e-15)
        assert math.log(beta[1] / beta[0]) == pytest.approx(x_ref, abs=1e-9), (kind, cb, cf)


# ---------------------------------------------------------------- hand-computed cases

def one_image(probs: np.ndarray, present, **kw) -> np.ndarray:
    C = probs.shape[0]
    lab = torch.zeros(1, C, dtype=torch.float64)
    lab[0, list(present)] = 1
    return adaptive_prior(torch.tensor(probs)[None], lab, **kw)[0].numpy()


def test_uniform_prior_returned_exactly_when_feasible():
    rng = np.random.default_rng(3)
    probs = softmax(rng.normal(size=(6, 5, 5)) * 0.1, 0)  # nearly flat: uniform β gives m ≈ 1/3
    beta = one_image(probs, [0, 2, 4], c_bg=0.3, c_fg=0.3)
    assert np.array_equal(beta, np.array([1, 0, 1, 0, 1, 0]) / 3.0)


def test_background_only():
    rng = np.random.default_rng(4)
    probs = softmax(rng.normal(size=(5, 4, 6)) * 3, 0)
    labels = torch.zeros(2, 5)
    labels[1, 0] = 1  # explicit background label, same result
    q = pixel_label_targets(torch.tensor(probs)[None].repeat(2, 1, 1, 1), labels)
    expected = torch.zeros(5, 4, 6, dtype=torch.float64)
    expected[0] = 1
    assert torch.equal(q[0], expected) and torch.equal(q[1], expected)
    beta = adaptive_prior(torch.tensor(probs)[None], labels[:1])
    assert torch.equal(beta[0], torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))


def flat_probs(C=6, h=3, w=4) -> np.ndarray:
    return np.full((C, h, w), 1.0 / C)


def test_flat_probabilities_feasible_is_water_filling():
    # q_j = β, so m = β and the program is max H s.t. β ≥ c: β = max(c, λ), Σ = 1
    beta = one_image(flat_probs(), [0, 1, 3], c_bg=0.6, c_fg=0.1)
    np.testing.assert_allclose(beta, [0.6, 0.2, 0, 0.2, 0, 0], atol=1e-6)


def test_flat_probabilities_infeasible_is_capped_water_filling():
    # Σc = 1.3 > 1: least violation iff β ≤ c, max entropy there is β = min(c, λ)
    beta = one_image(flat_probs(), [0, 1, 2, 3, 4], c_bg=0.1, c_fg=0.3)
    # an interior-point answer: within μ of the boundary
    np.testing.assert_allclose(beta, [0.1, 0.225, 0.225, 0.225, 0.225, 0], atol=1e-6)


def test_two_pixels_by_the_quadratic_formula():
    # pixels (0.9, 0.1) and (0.5, 0.5); c_fg = 0.45 > m_1(uniform) = 0.3, so m_1(β) = 0.45:
    # 0.1b / (0.9 − 0.8b) + b = 0.9  <=>  0.8b² − 1.72b + 0.81 = 0
    probs = np.array([[[0.9, 0.5]], [[0.1, 0.5]]])
    b = (1.72 - math.sqrt(1.72**2 - 4 * 0.8 * 0.81)) / 1.6
    beta = one_image(probs, [0, 1], c_bg=0.4, c_fg=0.45)
    np.testing.assert_allclose(beta, [1 - b, b], rtol=0, atol=1e-12)


def test_sum_of_c_equal_one_hits_c_exactly():
    rng = np.random.default_rng(5)
    for scale in (0.5, 3.0, 10.0):
        probs = softmax(rng.normal(size=(21, 8, 8)) * scale, 0)
        present = [0, 3, 8, 15]  # |y| = 4 at the defaults: Σc = 1, a single feasible point
        beta = one_image(probs, present)
        P = restrict(probs, np.isin(np.arange(21), present))
        np.testing.assert_allclose(masses(P, beta[present]), [0.4, 0.2, 0.2, 0.2], rtol=0, atol=1e-12)


def test_continuous_across_sum_of_c_equal_one():
    rng = np.random.default_rng(6)
    probs = softmax(rng.normal(size=(21, 8, 8)) * 3, 0)
    present = [0, 3, 8, 15]
    at = one_image(probs, present, c_bg=0.4, c_fg=0.2)
    for eps in (1e-5, -1e-5):
        near = one_image(probs, present, c_bg=0.4, c_fg=0.2 + eps)
        assert np.abs(near - at).max() < 1e-3


def test_zero_background_share_forced_to_zero_when_infeasible():
    rng = np.random.default_rng(7)
    probs = softmax(rng.normal(size=(6, 5, 5)) * 2, 0)
    beta = one_image(probs, [0, 1, 2, 3], c_bg=0.0, c_fg=0.4)  # Σc = 1.2: m_0 ≤ 0 forces β_0 = 0
    assert beta[0] == 0.0 and beta.sum() == pytest.approx(1.0)
    P = restrict(probs, np.isin(np.arange(6), [0, 1, 2, 3]))
    assert violation(P, beta[[0, 1, 2, 3]], np.array([0.0, 0.4, 0.4, 0.4])) == pytest.approx(0.2, abs=1e-9)


# ---------------------------------------------------------------- the infeasible tie-break

def test_infeasible_minimises_violation_against_random_priors():
    rng = np.random.default_rng(8)
    for kind in ("mid", "peaked", "regions"):
        present = np.zeros(21, bool)
        present[[0, 2, 5, 9, 14, 17]] = True  # |y| = 6: Σc = 1.4 at the defaults
        probs = make_probs(rng, 21, 6, 6, kind, present)
        beta = one_image(probs, np.flatnonzero(present))[present]
        P = restrict(probs, present)
        c = np.array([0.4] + [0.2] * 5)
        v = violation(P, beta, c)
        samples = rng.dirichlet(np.full(6, 0.5), size=4000)
        best_random = min(violation(P, b, c) for b in samples)
        assert v <= best_random + 1e-12
        assert v == pytest.approx(c.sum() - 1, abs=1e-9)


def test_infeasible_max_entropy_among_least_violation_by_grid():
    # |y| = 3 with Σc > 1: brute-force 2-D grid over log-ratios of β
    rng = np.random.default_rng(9)
    probs = make_probs(rng, 6, 5, 5, "mid", np.array([1, 1, 0, 1, 0, 0], bool))
    present = np.array([1, 1, 0, 1, 0, 0], bool)
    c_bg, c_fg = 0.5, 0.35
    beta = one_image(probs, [0, 1, 3], c_bg=c_bg, c_fg=c_fg)[present]
    P = restrict(probs, present)
    c = np.array([c_bg, c_fg, c_fg])
    x = np.linspace(-8, 8, 801)
    X1, X2 = np.meshgrid(x, x, indexing="ij")
    B = softmax(np.stack([np.zeros_like(X1), X1, X2], -1), -1).reshape(-1, 3)  # (G, 3)
    W = P[None] * B[:, None]
    M = (W / W.sum(2, keepdims=True)).mean(1)  # (G, 3)
    V = np.clip(c - M, 0, None).sum(1)
    ok = V <= V.min() + 1e-9
    H = -(B * np.log(B)).sum(1)
    assert V.min() == pytest.approx(c.sum() - 1, abs=1e-9)
    assert violation(P, beta, c) == pytest.approx(c.sum() - 1, abs=1e-9)
    assert entropy(beta) >= H[ok].max() - 1e-9
    assert entropy(beta) <= H[ok].max() + 1e-3  # the grid is fine enough to be close


# ---------------------------------------------------------------- tensor contract

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_targets_are_detached_normalised_and_zero_off_y(device, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 21, 9, 7, generator=g) * 4).to(device=device, dtype=dtype).requires_grad_(True)
    probs = logits.softmax(1)
    labels = torch.zeros(4, 21, device=device)
    labels[0, 3] = 1
    labels[1, [3, 7]] = 1
    labels[2, [1, 2, 3, 4, 5]] = 1
    q = pixel_label_targets(probs, labels)
    beta = adaptive_prior(probs, labels)
    assert q.grad_fn is None and not q.requires_grad and beta.grad_fn is None
    assert q.dtype == dtype and beta.dtype == dtype and q.device == probs.device
    present = labels.bool()
    present[:, 0] = True
    assert torch.all(q.masked_fill(present[:, :, None, None], 0) == 0)
    assert torch.all(beta.masked_fill(present, 0) == 0)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(q.sum(1), torch.ones_like(q[:, 0]), atol=tol, rtol=0)
    torch.testing.assert_close(beta.sum(1), torch.ones_like(beta[:, 0]), atol=tol, rtol=0)
    # q is eq. 5 with this β
    w = probs.detach().double() * beta.double()[:, :, None, None]
    torch.testing.assert_close(q.double(), w / w.sum(1, keepdim=True), atol=tol, rtol=0)


def test_float32_input_gives_the_float64_answer():
    # the solver works in float64 (its multi-start phase in float32, then polished): a float32
    # input only changes the output's rounding
    g = torch.Generator().manual_seed(6)
    probs = (torch.randn(6, 21, 14, 14, generator=g) * 6).softmax(1)  # float32, peaked
    labels = torch.zeros(6, 21)
    for b, ids in enumerate([[4], [2, 9], [1, 4, 6], [3, 11, 12], [7, 13, 14, 15], [5, 6, 8, 16]]):
        labels[b, ids] = 1
    beta32 = adaptive_prior(probs, labels, c_bg=0.35, c_fg=0.15)
    beta64 = adaptive_prior(probs.double(), labels, c_bg=0.35, c_fg=0.15)
    assert beta32.dtype == torch.float32
    torch.testing.assert_close(beta32.double(), beta64, atol=1e-6, rtol=0)
    q = pixel_label_targets(probs, labels, c_bg=0.35, c_fg=0.15).double()
    m = q.mean((2, 3))  # (B, C)
    present = labels.bool()
    present[:, 0] = True
    c = torch.where(present, 0.15, 0.0).double()
    c[:, 0] = 0.35
    for b in range(6):
        sign = 1.0 if c[b].sum() <= 1 else -1.0
        assert (sign * (m[b] - c[b]))[present[b]].min() >= -1e-6


def test_inputs_are_not_modified():
    probs = torch.full((2, 4, 3, 3), 0.25)
    labels = torch.tensor([[False, True, False, False], [False, False, True, True]])
    before_p, before_l = probs.clone(), labels.clone()
    pixel_label_targets(probs, labels)
    assert torch.equal(probs, before_p) and torch.equal(labels, before_l)


def test_batch_equals_one_image_at_a_time():
    g = torch.Generator().manual_seed(1)
    probs = (torch.randn(6, 21, 8, 8, generator=g, dtype=torch.float64) * 3).softmax(1)
    labels = torch.zeros(6, 21, dtype=torch.float64)
    for b, ids in enumerate([[5], [], [2, 9], [1, 4, 6, 8], [3, 11, 12], [7, 13, 14, 15, 16]]):
        labels[b, ids] = 1
    beta = adaptive_prior(probs, labels, c_bg=0.35, c_fg=0.15)
    for b in range(6):
        alone = adaptive_prior(probs[b:b + 1], labels[b:b + 1], c_bg=0.35, c_fg=0.15)[0]
        torch.testing.assert_close(beta[b], alone, atol=1e-9, rtol=0)


def test_valid_mask_equals_cropping():
    g = torch.Generator().manual_seed(2)
    probs = (torch.randn(2, 6, 10, 12, generator=g, dtype=torch.float64) * 3).softmax(1)
    labels = torch.tensor([[0, 1, 0, 1, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.float64)
    valid = torch.zeros(2, 10, 12, dtype=torch.bool)
    valid[0, :7, :9] = True
    valid[1, :10, :5] = True
    beta = adaptive_prior(probs, labels, valid=valid)
    ref0 = adaptive_prior(probs[:1, :, :7, :9], labels[:1])[0]
    ref1 = adaptive_prior(probs[1:, :, :10, :5], labels[1:])[0]
    torch.testing.assert_close(beta[0], ref0, atol=1e-12, rtol=0)
    torch.testing.assert_close(beta[1], ref1, atol=1e-12, rtol=0)


def test_object_class_order_does_not_matter():
    g = torch.Generator().manual_seed(3)
    probs = (torch.randn(1, 8, 6, 6, generator=g, dtype=torch.float64) * 4).softmax(1)
    labels = torch.tensor([[0, 1, 0, 1, 1, 0, 0, 0]], dtype=torch.float64)
    perm = torch.tensor([0, 5, 7, 4, 3, 6, 1, 2])  # keeps background first
    beta = adaptive_prior(probs, labels, c_bg=0.5, c_fg=0.12)
    beta_p = adaptive_prior(probs[:, perm], labels[:, perm], c_bg=0.5, c_fg=0.12)
    torch.testing.assert_close(beta_p, beta[:, perm], atol=1e-7, rtol=0)


def test_underflowed_probabilities_still_get_their_share():
    probs = torch.zeros(1, 4, 5, 5)
    probs[0, 0] = 1.0  # float32 softmax underflow: the object classes are exactly 0 everywhere
    labels = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    q = pixel_label_targets(probs, labels)
    m = q.double().mean((2, 3))[0]
    assert torch.isfinite(q).all()
    assert m[1] >= 0.2 - 1e-6 and m[2] >= 0.2 - 1e-6 and m[0] >= 0.4 - 1e-6 and m[3] == 0


def test_non_finite_image_gives_nan_and_leaves_others_alone():
    g = torch.Generator().manual_seed(4)
    probs = (torch.randn(2, 5, 4, 4, generator=g) * 2).softmax(1)
    labels = torch.tensor([[0, 1, 0, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.float32)
    ref = pixel_label_targets(probs[1:], labels[1:])
    probs[0, 2, 1, 1] = float("nan")
    q = pixel_label_targets(probs, labels)
    assert torch.isnan(q[0]).all()
    torch.testing.assert_close(q[1:], ref)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    probs = (torch.randn(5, 21, 12, 12, generator=g) * 4).softmax(1)
    labels = torch.zeros(5, 21)
    for b, ids in enumerate([[5], [2, 9], [1, 4, 6], [3, 11, 12, 13], [7, 13, 14, 15, 16]]):
        labels[b, ids] = 1
    cpu = adaptive_prior(probs, labels)
    gpu = adaptive_prior(probs.cuda(), labels.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, word", [
    (dict(c_bg=-0.1), "c_bg"), (dict(c_bg=1.5), "c_bg"), (dict(c_fg="0.2"), "c_fg"),
    (dict(c_fg=float("nan")), "c_fg"), (dict(c_fg=True), "c_fg"),
])
def test_bad_shares_name_the_argument(kw, word):
    probs = torch.full((1, 3, 2, 2), 1 / 3)
    with pytest.raises(UserError, match=word):
        adaptive_prior(probs, torch.tensor([[0.0, 1.0, 0.0]]), **kw)


def test_bad_tensors_name_the_culprit():
    probs = torch.full((2, 3, 2, 2), 1 / 3)
    labels = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    with pytest.raises(UserError, match="labels"):
        adaptive_prior(probs, labels[:1])
    with pytest.raises(UserError, match=r"labels must be 0/1, image 1"):
        adaptive_prior(probs, torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 1.0]]))
    with pytest.raises(UserError, match="probs"):
        adaptive_prior(probs[0], labels)
    with pytest.raises(UserError, match="valid"):
        adaptive_prior(probs, labels, valid=torch.ones(2, 3, 3, dtype=torch.bool))
    valid = torch.ones(2, 2, 2, dtype=torch.bool)
    valid[1] = False
    with pytest.raises(UserError, match=r"valid marks no pixel of image 1"):
        pixel_label_targets(probs, labels, valid=valid)
