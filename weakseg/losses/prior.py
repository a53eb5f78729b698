"""Pixel-label estimator with the adaptive max-entropy prior (paper eq. 5–7, appendix eq. 19–22).

For one image with present classes y (background always included), softmax
output p_j over the pixels j, and a prior β on the simplex over y,

    q_j(l) = p_j(l) β_l / Σ_{k∈y} p_j(k) β_k   for l ∈ y,   0 otherwise      (eq. 5, 6)
    m_l(β) = mean_j q_j(l)                                                    (class mass)

and β is the most non-informative prior that still gives every present class
its share of the pixels (eq. 7):

    maximise H(β) = −Σ_l β_l log β_l   s.t.   m_l(β) ≥ c_l  (l ∈ y),  β ∈ simplex,

with c_0 = c_bg for the background and c_l = c_fg for objects.

Structure
---------
* m is a bijection between open simplices: for a target t > 0, Σt = 1, exactly
  one β has m(β) = t, the minimiser of the convex
  G_t(u) = mean_j logsumexp_k(log p_j(k) + u_k) − t·u over u = log β
  (gradient m − t, Hessian M = mean_j diag(q_j) − q_j q_jᵀ, null space 1).
  So the feasible set is the polytope {m ≥ c, Σm = 1} seen through a
  diffeomorphism; it is non-empty iff Σc ≤ 1.
* Infeasible case (Σc > 1, e.g. ≥ 4 objects at the defaults). Eq. 22's
  violation V = Σ_l (c_l − m_l)_+ ≥ Σ_l (c_l − m_l) = Σc − 1, with equality iff
  m ≤ c. So the minimum-violation set is {m ≤ c}, and our tie-break is its
  maximum-entropy point: the same program with the inequalities reversed.
  At Σc = 1 both sets are the single point m = c, so β is continuous in
  (c_bg, c_fg). If Σc ≥ 1, a class with c_l = 0 is forced to m_l = 0, i.e.
  β_l = 0 (only possible with c_bg = 0, or with c_fg = 0 and c_bg = 1).
* If uniform β meets the constraints it is the answer (H's global maximum),
  returned exactly. Otherwise H's only unconstrained maximum is infeasible, so
  every local maximum has at least one active constraint.
* |y| = 2: m_1 increases with β_1 and H is unimodal, so the feasible set is
  an interval and the answer is ½ clamped to it. The appendix's grid search
  converges to this point as its grid is refined; we compute the limit exactly:
  m*_1 = clamp(m_1(½)) to [c_1, 1 − c_0] (feasible) or [1 − c_0, c_1]
  (infeasible), then x = log(β_1/β_0) from m_1(x) = m*_1 by a bracketed Newton
  iteration on the logit scale (logit m_1 has slope in (0, 1], which gives the
  bracket; exact in one step when all pixels agree). Σc = 1 with |y| ≥ 3 (|y| = 4
  at the defaults) is solved with m* = c by Newton on G_c, to float64 precision.
* |y| ≥ 3 is a genuinely non-convex program: {β : m_l(β) ≥ c_l} is not convex
  (m_l is convex along the lines that trade two other classes). With peaked
  probabilities it has several local maxima, which lie on faces of the polytope
  and differ in which classes are squeezed to a tiny β; the global one can be an
  isolated vertex that no interior path reaches. So we run a batched multi-start
  solver and keep the best feasible end point, in two phases:
    1. explore (float32, 5|y| iterations, at least 15, at most 40): 3|y| + 1 rows
       per image — the |y| vertices c + (1 − Σc) e_k, solved by Newton on G, and
       interior starts towards the centre of the polytope, of every facet and
       near every vertex, each running a primal-dual interior-point method in
       u = log β: Newton steps on H + μ Σ log σ(m_l − c_l) with the multipliers
       as variables, on the exact Hessian (the third cumulant of q enters
       through one extra matrix product) where it is negative definite and on
       its Gauss–Newton part (−cov(β) − M diag(y/g) M) where it is not, μ halved
       after every accepted full step down to 1e-5. A row that starts infeasible
       first steps on G towards its start. Two step lengths are tried at once;
       after a step that found nothing better the system is damped
       (Levenberg–Marquardt), so no row stalls.
    2. polish (float64): the two best rows per image take four Newton steps on
       the KKT system of their active set (constraints whose multiplier exceeds
       their slack, as equalities), which converges quadratically and lands
       exactly on the boundary; then, since a constraint with a slack below √μ
       is guessed active, the one with the most negative multiplier is dropped
       (and any violated one added) for four more. The best feasible point
       among the polished and unpolished rows wins.
  Which starts are needed was measured: dropping the vertices, the facet starts
  or the near-vertex starts each loses the global maximum on some instances of
  the oracle tests; the float32 phase ranks rows as well as float64 did; the
  Gauss–Newton fallback finds global maxima as often as |eigenvalue|-modified
  Newton (which needs an eigendecomposition, a host synchronisation on CUDA)
  and more often than a trust region on the exact Hessian.
  Validation: against multi-start SLSQP on random and network-like instances
  (tests/test_prior.py) it matches or beats the oracle, and it matches or beats
  the previous 63-start solver on 318 such instances (|y| 3–5) to 1e-4 nats.

Numerics: probabilities are restricted to y, floored at 1e-30 (float32 softmax
underflows to exact 0, and the floor keeps every present class reachable) and
renormalised per pixel. They are then kept in linear space: with β itself, a
pass over the pixels is two batched matrix products (Z_j = Σ_k p_j(k) β_k ≥
1e-30 / |y| cannot underflow), and the Hessians come from one product with the
pixels' pairwise products p_j(a) p_j(b). Every Hessian here annihilates 1, so
its diagonal is formed from the off-diagonals; this avoids the cancellation in
m_l − Σ_j q_j(l)²/N when q is one-hot. Newton systems are solved by batched
Cholesky / LU without error checks (no eigendecomposition), so nothing inside
the solvers synchronises with the host.

Cost: two host synchronisations per call, outside every loop. The first sizes
the class axis and validates the inputs; the second routes each image to
uniform (no work), the |y| = 2 root finder (10 iterations), the Σc = 1 Newton
solve (12 iterations) or the multi-start solver, grouped by |y| so that every
solver runs on exact-size tensors. The iteration counts are fixed and the
result is deterministic. The loops write their per-pixel values into buffers
allocated once: on the CPU, a fresh multi-megabyte tensor per step costs more
in page faults than the arithmetic (glibc returns large blocks to the system).
Measured on a 2-core CPU (2 torch threads, median of 7 calls, float32 input,
21 classes, softmax of random logits; previous solver in brackets): batch 20
at 56×56 with a VOC-like mix of |y| ~38 ms [5.3 s]; every image |y| = 2
~2 ms [10–26 ms], |y| = 3 ~32 ms [0.56 s], |y| = 4 (Σc = 1) ~8 ms [26 ms],
|y| = 5 ~90 ms [3.6–9 s]; batch 8 at 32×32 with |y| = 2 ~1 ms [13–100 ms],
with |y| 2–4 ~13 ms [0.4 s]. Small batches are bound by kernel launches
(about 200 small kernels per multi-start iteration, 15 iterations at |y| = 3).
On a GPU everything is sync-free within a group, but group sizes change from
batch to batch, so CUDA graphs would need one graph per group shape.
Gradients never flow through β or q (they are targets, eq. 4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from weakseg.errors import UserError

P_FLOOR = 1e-30  # probabilities below this are raised to it (see module docstring)
TWO_ITERS = 10  # |y| = 2: bracketed Newton steps of the root finder (converged in ≤ 8 on peaked inputs)
MATCH_ITERS = 12  # Σc = 1: Newton steps on G for m(β) = c (converged in ≤ 12 on peaked inputs)
EXPLORE_ITERS = (5, 15, 40)  # |y| ≥ 3: iterations of every start, 5 |y| clamped to [15, 40]
EXPLORE_DTYPE = torch.float32  # the multi-start phase only ranks starts; the polish is float64
KEEP = 2  # best starts per image that are polished
POLISH_ITERS = 4  # Newton–KKT steps on an active set (float64)
POLISH_ROUNDS = 2  # active sets tried: the guess, then one change per round
STEPS = (1.0, 0.25)  # step lengths tried at once; keeping the current point is the third choice
MU0, MU_DECAY, MU_MIN = 0.1, 0.5, 1e-5  # barrier weight: at entry, per accepted full step, floor
RIDGE = {torch.float32: 1e-6, torch.float64: 1e-12}  # smallest shift of a Newton matrix, × its scale
DAMP_FAIL = 1e-3  # shift (× scale) after a step that found nothing better; ×10 per further failure
MAX_STEP = 20.0  # cap on |Δu|∞ per iteration (β ratios change by at most e^20)
Z_MIN = {torch.float32: 1e-12, torch.float64: 0.0}  # floor on Z_j in the Hessians' w_j / Z_j² (float32
# range; pixels with a smaller Z_j have q one-hot on a class of tiny β and add ~0 to the off-diagonals)
SUM_TOL = 1e-9  # |Σc − 1| below this is the single-point case m = c
FEAS_TOL = 1e-9  # slack allowed when choosing among end points (polished points sit on the boundary)
EXPLORE_TOL = 1e-5  # the same when ranking the float32 end points (vertex rows sit on the boundary)


def adaptive_prior(probs: Tensor, labels: Tensor, c_bg: float = 0.4, c_fg: float | Tensor = 0.2,
                   valid: Tensor | None = None) -> Tensor:
    """Max-entropy prior β (B, C) of eq. 7 (eq. 22's minimum-violation point when infeasible).

    probs (B, C, h, w) softmax output; labels (B, C) in {0, 1}, background
    (class 0) always counted as present; valid (B, h, w) bool restricts the
    pixel means to real (unpadded) pixels. c_fg may be a (B, C) tensor: a demand per image
    and class (see `foreground_demand`; its background entries are ignored). β is 0 on absent classes and sums
    to 1 over present ones; returned in probs.dtype, without grad.
    """
    with torch.no_grad():
        prob = _Problem(probs, labels, c_bg, c_fg, valid)
        beta = _solve(prob)  # (B, K) float64, 0 on empty slots
        out = torch.zeros(prob.B, prob.C, dtype=torch.float64, device=prob.device)
        out.scatter_(1, prob.idx, beta)
        if not prob.all_finite:
            out = torch.where(prob.finite[:, None], out, torch.full_like(out, math.nan))
        return out.to(probs.dtype)


def pixel_label_targets(probs: Tensor, labels: Tensor, c_bg: float = 0.4, c_fg: float | Tensor = 0.2,
                        valid: Tensor | None = None) -> Tensor:
    """Auxiliary ground truth q (B, C, h, w) of eq. 5: q_j(l) ∝ p_j(l) β_l, exactly 0 on absent classes.

    Same arguments as `adaptive_prior`. Invalid (padded) pixels get a q too,
    computed the same way; they just do not count in the class masses.
    """
    with torch.no_grad():
        prob = _Problem(probs, labels, c_bg, c_fg, valid)
        beta = _solve(prob)  # (B, K)
        wq = prob.P * beta[:, :, None]  # (B, K, N)
        q = (wq / wq.sum(1, keepdim=True)).to(probs.dtype)
        out = torch.zeros(prob.B, prob.C, prob.N, dtype=probs.dtype, device=prob.device)
        out.scatter_(1, prob.idx[:, :, None].expand(-1, -1, prob.N), q)
        if not prob.all_finite:
            out = torch.where(prob.finite[:, None, None], out, torch.full_like(out, math.nan))
        return out.view(probs.shape)


def foreground_demand(probs: Tensor, labels: Tensor, mode: str, c_fg: float, object_fraction: float,
                      valid: Tensor | None = None) -> float | Tensor:
    """The c_fg to pass to the prior: the paper's constant, or one that follows the objects' size.

    fixed: c_fg. size: object_fraction, a dataset statistic (the mean share of the image one
    object class covers). confident: per image and class, the share of (valid) pixels with
    p(l) >= 0.5, clamped to [object_fraction, c_fg], so the demand grows with what the
    network already finds, from a floor, up to the paper's constant. Returns a float or (B, C).
    """
    if mode == "fixed":
        return c_fg
    if mode == "size":
        return object_fraction
    if mode != "confident":
        raise UserError(f"unknown c_fg mode {mode!r} (fixed, size or confident)")
    with torch.no_grad():
        conf = (probs.detach() >= 0.5).flatten(2).to(torch.float64)  # (B, C, N)
        if valid is None:
            share = conf.mean(2)
        else:
            v = valid.flatten(1)[:, None].to(torch.float64)
            share = (conf * v).sum(2) / v.sum(2).clamp(min=1.0)
        return share.clamp(object_fraction, c_fg)


# ----------------------------------------------------------------------------- inputs


def _real(name: str, value: object) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise UserError(f"{name} must be a number in [0, 1], got {value!r}")
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= x <= 1.0):
        raise UserError(f"{name} must be a number in [0, 1], got {value!r}")
    return x


class _Problem:
    """Validated inputs, restricted to each image's present classes (K = largest |y| in the batch)."""

    def __init__(self, probs: Tensor, labels: Tensor, c_bg: float, c_fg: float | Tensor,
                 valid: Tensor | None) -> None:
        c_fg_t = c_fg if isinstance(c_fg, Tensor) else None
        c_bg, c_fg = _real("c_bg", c_bg), (0.0 if c_fg_t is not None else _real("c_fg", c_fg))
        if not isinstance(probs, Tensor) or probs.dim() != 4 or not probs.is_floating_point():
            what = (f"{probs.dtype} of shape {tuple(probs.shape)}" if isinstance(probs, Tensor)
                    else type(probs).__name__)
            raise UserError(f"probs must be a floating (B, C, h, w) tensor, got {what}")
        B, C, h, w = probs.shape
        if C < 2:
            raise UserError(f"probs needs at least 2 classes (background + one object), got C = {C}")
        if not isinstance(labels, Tensor) or tuple(labels.shape) != (B, C):
            raise UserError(f"labels must be a (B, C) = ({B}, {C}) tensor, got shape "
                            f"{tuple(getattr(labels, 'shape', ()))}")
        if valid is not None and (not isinstance(valid, Tensor) or tuple(valid.shape) != (B, h, w)):
            raise UserError(f"valid must be a (B, h, w) = ({B}, {h}, {w}) bool tensor, got shape "
                            f"{tuple(getattr(valid, 'shape', ()))}")
        if h * w == 0:
            raise UserError(f"probs has no pixels: its grid is {h} × {w}")
        if c_fg_t is not None and (tuple(c_fg_t.shape) != (B, C) or not bool(((c_fg_t >= 0) & (c_fg_t <= 1)).all())):
            raise UserError(f"c_fg as a tensor must be (B, C) = ({B}, {C}) with values in [0, 1], got shape "
                            f"{tuple(c_fg_t.shape)}")
        dev = probs.device
        self.B, self.C, self.N, self.device = B, C, h * w, dev

        lab = labels.detach().to(dev)
        bad_label = ((lab != 0) & (lab != 1)).any(1)  # (B,)
        present_c = lab != 0  # a new tensor: the caller's labels are not touched
        present_c[:, 0] = True  # background is always present
        counts = present_c.sum(1)  # (B,)
        if valid is not None:
            wpix = valid.detach().to(dev).reshape(B, self.N).bool().to(torch.float64)  # (B, N)
        else:
            wpix = torch.ones(B, self.N, dtype=torch.float64, device=dev)
        wsum = wpix.sum(1)  # (B,)
        empty = wsum == 0
        x = probs.detach().reshape(B, C, self.N)
        self.finite = torch.isfinite(x).all(2).all(1)  # (B,) non-finite images give NaN outputs
        # first host synchronisation: batch-wide K and the validation flags
        K, any_bad, first_bad, any_empty, first_empty, all_finite = 1, 0, 0, 0, 0, 1
        if B:
            stats = torch.stack([counts.max(), bad_label.any().long(), bad_label.long().argmax(),
                                 empty.any().long(), empty.long().argmax(), self.finite.all().long()]).tolist()
            K, any_bad, first_bad, any_empty, first_empty, all_finite = (int(s) for s in stats)
        if any_bad:
            raise UserError(f"labels must be 0/1, image {first_bad} of the batch has other values")
        if any_empty:
            raise UserError(f"valid marks no pixel of image {first_empty} of the batch as real")
        self.K, self.all_finite = K, bool(all_finite)
        self.w = wpix / wsum[:, None]  # (B, N), sums to 1

        # present classes first, in class order (background in slot 0)
        order = torch.argsort((~present_c).to(torch.int8), dim=1, stable=True)  # (B, C)
        self.idx = order[:, :K]  # (B, K) class id per slot
        slot = torch.arange(K, device=dev)
        self.present = slot[None] < counts[:, None]  # (B, K)
        if c_fg_t is None:
            c = torch.full((K,), c_fg, dtype=torch.float64, device=dev)
            c[0] = c_bg  # (K,) in float64: c_fg = 0.2 must not pass through float32
            self.c = c[None] * self.present  # (B, K), 0 on empty slots
        else:  # a demand per image and class
            c = c_fg_t.detach().to(dev, torch.float64).gather(1, self.idx)  # (B, K)
            c[:, 0] = c_bg
            self.c = c * self.present

        p = x.gather(1, self.idx[:, :, None].expand(-1, -1, self.N)).to(torch.float64)  # (B, K, N)
        if not self.all_finite:
            p = torch.where(self.finite[:, None, None], p, torch.ones_like(p))
        p = p.clamp_min(P_FLOOR) * self.present[:, :, None]
        self.P = p / p.sum(1, keepdim=True)  # (B, K, N): restricted to y, renormalised per pixel


# ----------------------------------------------------------------------------- routing


def _solve(prob: _Problem) -> Tensor:
    """β (B, K) in float64, 0 on empty slots: uniform where feasible, else each image's solver.

    Images are grouped by solver and by their number k of classes that get mass, so
    every solver runs on exact-size (G, k, N) tensors: no padding, no masks.
    """
    P, w, c = prob.P, prob.w, prob.c
    B, K, N = P.shape
    dev, dt = P.device, P.dtype

    csum = c.sum(1)  # (B,)
    sigma = torch.where(csum <= 1.0 + SUM_TOL, 1.0, -1.0).to(dt)  # +1: m ≥ c,  −1: m ≤ c
    point = (csum - 1.0).abs() <= SUM_TOL
    # Σc ≥ 1 forces m_l = 0, i.e. β_l = 0, for classes with c_l = 0
    act = prob.present & ~((csum >= 1.0 - SUM_TOL)[:, None] & (c == 0))  # (B, K) classes that get mass
    kb = act.sum(1)  # (B,)
    uniform = act.to(dt) / kb[:, None]  # (B, K)
    m0 = uniform * ((w[:, None] / (uniform[:, None] @ P)) @ P.transpose(1, 2))[:, 0]  # (B, K) its masses
    uniform_ok = ((sigma[:, None] * (m0 - c) >= 0) | ~(act & (c > 0))).all(1)  # H's global maximum
    route = torch.where(uniform_ok | (kb <= 1), 0, torch.where(kb == 2, 1, torch.where(point, 2, 3)))
    # second (and last) host synchronisation: which images need which solver, and their k
    plan = torch.stack([route, kb]).cpu().tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for b, (r, k) in enumerate(zip(*plan)):
        if r:
            groups.setdefault((r, k), []).append(b)
    if not groups:
        return uniform
    beta = uniform.clone()
    first = torch.argsort((~act).to(torch.int8), dim=1, stable=True)  # (B, K) active slots first
    for (r, k), images in sorted(groups.items()):
        ix = torch.tensor(images, device=dev)
        sl = first[ix, :k]  # (G, k)
        Pg = P[ix].gather(1, sl[:, :, None].expand(-1, -1, N))  # (G, k, N)
        cg, m0g = c[ix].gather(1, sl), m0[ix].gather(1, sl)  # (G, k)
        if r == 1:
            bg = _two(Pg, w[ix], cg, m0g, point[ix])
        elif r == 2:
            bg = _match(Pg, w[ix], cg, m0g)
        else:
            bg = _general(Pg, w[ix], cg, sigma[ix], m0g)
        beta[ix] = torch.zeros(len(images), K, dtype=dt, device=dev).scatter_(1, sl, bg)
    return beta


# ----------------------------------------------------------------------------- |y| = 2


def _two(P: Tensor, w: Tensor, c: Tensor, m0: Tensor, point: Tensor) -> Tensor:
    """|y| = 2: β (G, 2) whose m_1 is m_1(uniform) clamped to the admissible interval.

    With x = log(β_1/β_0), m_1(x) = Σ_j w_j σ(a_j + x), a_j = log(p_j(1)/p_j(0)), increases,
    and logit m_1 has slope in (0, 1] (Σ w σ(1 − σ) ≤ m_1(1 − m_1)). So the root of
    logit m_1(x) = logit t lies beyond x_0 = logit t − logit m_1(0), and inside
    [logit t − max a, logit t − min a]: a bracket for Newton on the logit scale, which is
    exact in one step when all pixels agree and falls back to bisection when it leaves it.
    """
    lo_c, hi_c = torch.minimum(c[:, 1], 1.0 - c[:, 0]), torch.maximum(c[:, 1], 1.0 - c[:, 0])
    t = torch.where(point, c[:, 1], torch.minimum(torch.maximum(m0[:, 1], lo_c), hi_c))  # (G,)
    a = torch.log(P[:, 1] / P[:, 0])  # (G, N)
    lt = torch.log(t) - torch.log1p(-t)
    x = lt - (torch.log(m0[:, 1]) - torch.log(m0[:, 0]))  # x_0
    lo = torch.maximum(lt - a.amax(1), torch.where(x > 0, x, -math.inf))
    hi = torch.minimum(lt - a.amin(1), torch.where(x < 0, x, math.inf))
    x = torch.minimum(torch.maximum(x, lo), hi)
    wc = w[:, :, None]  # (G, N, 1)
    for _ in range(TWO_ITERS):
        z = a + x[:, None]  # (G, N)
        s, sb = torch.sigmoid(z), torch.sigmoid(-z)  # σ and 1 − σ, both to full relative precision
        mm = (torch.stack([s, sb, s * sb], 1) @ wc)[..., 0]  # (G, 3): m_1, m_0 = 1 − m_1, dm_1/dx
        f = torch.log(mm[:, 0]) - torch.log(mm[:, 1]) - lt  # logit m_1(x) − logit t, increasing
        lo = torch.where(f <= 0, torch.maximum(lo, x), lo)
        hi = torch.where(f >= 0, torch.minimum(hi, x), hi)
        xn = x - f * mm[:, 0] * mm[:, 1] / mm[:, 2]
        x = torch.where((xn >= lo) & (xn <= hi), xn, 0.5 * (lo + hi))  # bisect if it leaves the bracket
    b1 = torch.sigmoid(x)
    return torch.stack([1.0 - b1, b1], 1)


# ----------------------------------------------------------------------------- shared pieces


class _Point:
    """u, β = softmax(u), H(β) and the class masses m at many u per image.

    P (B, K, N), w (B, N), u (B, R, K). Z_j = Σ_k p_j(k) β_k ≥ 1e-30 / K cannot underflow,
    and the pass over the pixels is two batched matrix products. Z and w / Z, which the
    Hessians need, are recomputed there rather than carried along. buf (B, R, N), if
    given, receives the per-pixel values: loops reuse their buffers, because on the CPU a
    fresh multi-megabyte tensor per step costs more in page faults than the step itself.
    """

    def __init__(self, P: Tensor, w: Tensor, u: Tensor, buf: Tensor | None = None) -> None:
        us = u - u.amax(-1, keepdim=True)
        E = torch.exp(us)
        Es = E.sum(-1, keepdim=True)
        self.u, self.beta = u, E / Es
        self.H = torch.log(Es[..., 0]) - (self.beta * us).sum(-1)  # (B, R)
        Z = torch.bmm(self.beta, P, out=buf)  # (B, R, N)
        r = torch.div(w[:, None], Z, out=Z)  # w_j / Z_j
        self.m = self.beta * torch.bmm(r, P.transpose(1, 2))  # (B, R, K)

    def where(self, keep: Tensor, other: _Point) -> _Point:
        """Row-wise choice (keep (B, R)): self where keep, else other."""
        out = _Point.__new__(_Point)
        k3 = keep[..., None]
        out.u, out.beta, out.m = (torch.where(k3, a, b) for a, b in
                                  ((self.u, other.u), (self.beta, other.beta), (self.m, other.m)))
        out.H = torch.where(keep, self.H, other.H)
        return out

    def rows(self, ix: Tensor) -> _Point:
        """Rows ix (B, R') of every image."""
        out = _Point.__new__(_Point)
        e = ix[..., None].expand(*ix.shape, self.u.shape[-1])
        out.u, out.beta, out.m = self.u.gather(1, e), self.beta.gather(1, e), self.m.gather(1, e)
        out.H = self.H.gather(1, ix)
        return out


class _Pairs:
    """The pixels' pairwise products p_j(a) p_j(b), a < b, for the Hessians' off-diagonals."""

    def __init__(self, P: Tensor) -> None:
        K = P.shape[1]
        ia, ib = torch.triu_indices(K, K, 1, device=P.device)
        self.PPt = (P[:, ia] * P[:, ib]).transpose(1, 2)  # (B, N, Q)
        spread = torch.zeros(K, K, dtype=torch.long, device=P.device)  # pair index + 1, 0 on the diagonal
        spread[ia, ib] = spread[ib, ia] = torch.arange(1, ia.numel() + 1, device=P.device)
        self.spread, self.K = spread.view(-1), K

    def sym(self, sums: Tensor, beta: Tensor) -> Tensor:
        """(B, R', Q) pixel sums -> β_a β_b × sum: (B, R', K, K) symmetric, zero diagonal."""
        z = torch.cat([torch.zeros_like(sums[..., :1]), sums], -1)[..., self.spread]
        return z.view(*sums.shape[:-1], self.K, self.K) * (beta[..., :, None] * beta[..., None, :])


def _curvature(P: Tensor, w: Tensor, pairs: _Pairs, at: _Point, y: Tensor | None,
               bufs: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    """M = dm/du, A = Σ_j w_j q_j q_jᵀ and C = Σ_j w_j (y·q_j) q_j q_jᵀ (off the diagonal).

    M = diag(m) − A; the constraints' curvature Σ_l y_l ∇²m_l enters through C (the third
    cumulant of q). Both sums are one product of per-pixel weights with p_j(a) p_j(b).
    bufs: three (B, R, N) buffers for the per-pixel values.
    """
    Z = torch.bmm(at.beta, P, out=bufs[0])  # (B, R, N)
    s = torch.clamp_min(Z, Z_MIN[Z.dtype], out=bufs[1]).square_()
    s = torch.div(w[:, None], s, out=s)  # w_j / Z_j²
    A = pairs.sym(s @ pairs.PPt, at.beta)
    C = None
    if y is not None:
        sy = torch.bmm(y * at.beta, P, out=bufs[2]).div_(Z).mul_(s)  # w_j (y·q_j) / Z_j²
        C = pairs.sym(sy @ pairs.PPt, at.beta)
    return _lap(A), A, C


def _lap(a: Tensor) -> Tensor:
    """diag(a 1) − a for a zero-diagonal a: rows summing to 0, as every Hessian here (all annihilate 1).

    Forming the diagonal from the off-diagonals avoids the cancellation in e.g.
    m_l − Σ_j w_j q_j(l)² when q is nearly one-hot.
    """
    return torch.diag_embed(a.sum(-1)) - a


def _entropy_terms(at: _Point, offmask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """∇H = −rb, the off-diagonal of −∇²H (rows of ∇²H sum to 0), and ββᵀ off the diagonal."""
    beta = at.beta
    rb = beta * (torch.log(beta.clamp_min(torch.finfo(beta.dtype).tiny)) + at.H[..., None])
    bb = beta[..., :, None] * beta[..., None, :] * offmask
    br = beta[..., :, None] * rb[..., None, :]
    return rb, bb + (br + br.transpose(-1, -2)) * offmask, bb


def _newton(mats: Tensor, grad: Tensor, damp: Tensor, ridge: float) -> Tensor:
    """Ascent direction mats⁻¹ grad, with mats (…, L, K, K) candidates in order of preference.

    The first candidate that is positive definite after a shift (ridge + damp) × scale is
    used (batched Cholesky without error checks, so no host synchronisation); the last
    should be positive semidefinite by construction. The null direction 1, shared by every
    Hessian here, is shifted to the matrix's scale. Capped at MAX_STEP.
    """
    K, L = grad.shape[-1], mats.shape[-3]
    scale = mats.abs().amax((-1, -2), keepdim=True)
    eye = torch.eye(K, dtype=grad.dtype, device=grad.device)
    shift = (damp[..., None, None, None] + ridge) * eye + 1.0 / K
    chol, info = torch.linalg.cholesky_ex(mats + scale * shift)
    first = torch.where(info == 0, torch.arange(L, device=grad.device), L - 1).amin(-1)  # (…,)
    chol = chol.gather(-3, first[..., None, None, None].expand(*first.shape, 1, K, K))[..., 0, :, :]
    d = torch.nan_to_num(torch.cholesky_solve(grad[..., None], chol)[..., 0], nan=0.0, posinf=0.0, neginf=0.0)
    return d * (MAX_STEP / d.abs().amax(-1, keepdim=True)).clamp(max=1.0)


# ----------------------------------------------------------------------------- Σc = 1


def _match(P: Tensor, w: Tensor, t: Tensor, m0: Tensor) -> Tensor:
    """β (B, K) with m(β) = t: Newton on the convex G_t(u), taking the longer of STEPS along
    which G_t still decreases ((m − t)·d ≤ 0 at the trial point) or the residual halves."""
    B, K, N = P.shape
    dev, dt = P.device, P.dtype
    pairs = _Pairs(P)
    alphas = torch.tensor(STEPS, dtype=dt, device=dev)[:, None]  # (J, 1)
    J = alphas.shape[0]
    bufs = P.new_empty(3, B, 1, N).unbind(0)
    trial_buf = P.new_empty(B, J, N)
    at = _Point(P, w, (torch.log(t) - torch.log(m0))[:, None])  # exact for flat p, a good start otherwise
    damp = torch.zeros(B, 1, dtype=dt, device=dev)
    tt = t[:, None]  # (B, 1, K)
    for _ in range(MATCH_ITERS):
        M, _, _ = _curvature(P, w, pairs, at, None, bufs)
        d = _newton(M[:, :, None], tt - at.m, damp, RIDGE[dt])  # (B, 1, K)
        trial = _Point(P, w, at.u + alphas * d, trial_buf)  # (B, J, K)
        err = trial.m - tt
        ok = ((err * d).sum(-1) <= 0) | (err.abs().amax(-1) <= 0.5 * (at.m - tt).abs().amax(-1))  # (B, J)
        j = torch.where(ok, torch.arange(J, device=dev), J - 1).amin(-1, keepdim=True)  # (B, 1)
        moved = ok.any(-1, keepdim=True)
        at = trial.rows(j).where(moved, at)
        damp = torch.where(moved, 0.1 * damp, (10.0 * damp).clamp_min(DAMP_FAIL))
    return at.beta[:, 0]


# ----------------------------------------------------------------------------- |y| ≥ 3


def _general(P: Tensor, w: Tensor, c: Tensor, sigma: Tensor, m0: Tensor) -> Tensor:
    """|y| ≥ 3, uniform β infeasible, Σc ≠ 1: the best end point of several local solves -> β (B, K).

    Rows per image: the K vertices v_k = c + (1 − Σc) e_k of the polytope, and interior
    starts towards the centre of the polytope, of every facet and near every vertex (the
    face with the classes outside F at their bound has centre c + (1 − Σc) 1_F / |F|).
    """
    B, K, N = P.shape
    dev, dt = P.device, P.dtype
    csum = c.sum(1)
    kappa = c > 0
    z = torch.where(sigma[:, None] > 0, c + (1.0 - csum[:, None]) / K, c / csum[:, None])  # interior point
    eye = torch.eye(K, dtype=dt, device=dev)
    verts = c[:, None] + (1.0 - csum)[:, None, None] * eye  # (B, K, K), row k = v_k
    vert_ok = torch.diagonal(verts, dim1=1, dim2=2) > 0  # (B, K): false where Σc > 1 leaves v_k(k) ≤ 0
    verts = torch.where(vert_ok[..., None], verts.clamp_min(1e-12), z[:, None])
    verts = verts / verts.sum(-1, keepdim=True)
    faces = torch.cat([torch.ones(1, K, dtype=dt, device=dev), 1.0 - eye, eye])  # (F, K): F as indicators
    centres = c[:, None] + (1.0 - csum)[:, None, None] * faces / faces.sum(-1, keepdim=True)
    inner = _radial(centres, z[:, None], c[:, None], sigma[:, None, None], kappa[:, None], 0.8)
    tgt = torch.cat([verts, inner], 1)  # (B, R, K)
    R = tgt.shape[1]
    vertex = (torch.arange(R, device=dev) < K)[None].expand(B, R)
    u0 = torch.log(tgt) - torch.log(m0)[:, None]  # exact for flat p, a good start otherwise

    lo = EXPLORE_DTYPE
    end, y = _explore(P.to(lo), w.to(lo), c.to(lo), sigma.to(lo), kappa, u0.to(lo), tgt.to(lo), vertex)
    keep = _score(end, c.to(lo), sigma.to(lo), kappa, EXPLORE_TOL).topk(min(KEEP, R), dim=1).indices
    e = keep[..., None].expand(*keep.shape, K)
    start = _Point(P, w, end.u.gather(1, e).to(dt))
    y, cc = y.gather(1, e).to(dt), c[:, None]
    # active set: interior rows' constraints whose multiplier exceeds their slack (y > g, i.e.
    # g < √μ on the central path), vertex rows' constraints at their bound
    vert = (keep < K)[..., None]
    active = kappa[:, None] & torch.where(vert, (tgt.gather(1, e) - cc).abs() <= 1e-9,
                                          y > sigma[:, None, None] * (start.m - cc))
    lam = torch.where(vert, 0.0, y)
    cands = [start]
    for _ in range(POLISH_ROUNDS):
        end, lam = _polish(P, w, c, sigma, start, lam, active)
        cands.append(end)
        # active-set correction (a constraint with slack below √μ is guessed active): drop the
        # one with the most negative multiplier, add the ones the end point violates
        worst = torch.where(active, lam, math.inf).argmin(-1, keepdim=True)  # (B, R, 1)
        drop = torch.zeros_like(active).scatter_(-1, worst, True) & (lam < 0)
        violated = kappa[:, None] & (sigma[:, None, None] * (end.m - cc) < -FEAS_TOL)
        active = (active & ~drop) | violated
        lam = lam.clamp_min(0.0)
    beta = torch.cat([x.beta for x in cands], 1)
    best = torch.cat([_score(x, c, sigma, kappa) for x in cands], 1).argmax(1)  # (B,)
    return beta.gather(1, best[:, None, None].expand(B, 1, K))[:, 0]


def _score(at: _Point, c: Tensor, sigma: Tensor, kappa: Tensor, tol: float = FEAS_TOL) -> Tensor:
    """Entropy of feasible rows, −1 − violation of the others (so feasible rows always win)."""
    viol = ((sigma[:, None, None] * (c[:, None] - at.m)).clamp_min(0.0) * kappa[:, None]).amax(-1)
    return torch.where(viol <= tol, at.H, -1.0 - viol)


def _radial(x: Tensor, z: Tensor, c: Tensor, sigma: Tensor, kappa: Tensor, frac: float) -> Tensor:
    """z + θ(x − z): the point on the segment from the interior point z towards x, a fraction
    `frac` of the way to where it leaves the polytope {σ(m − c) ≥ 0 on κ, m ≥ 0} (or x itself)."""
    gz = sigma * (z - c)  # (…, K) > 0 on κ
    dx = sigma * (x - z)
    inf = torch.full_like(x, math.inf)
    r1 = torch.where(kappa & (dx < 0), gz / (-dx).clamp_min(1e-300), inf)
    r2 = torch.where(x < z, z / (z - x).clamp_min(1e-300), inf)
    theta = (torch.minimum(r1, r2).amin(-1, keepdim=True) * frac).clamp(max=1.0)
    return z + theta * (x - z)


def _explore(P: Tensor, w: Tensor, c: Tensor, sigma: Tensor, kappa: Tensor, u: Tensor, tgt: Tensor,
             vertex: Tensor) -> tuple[_Point, Tensor]:
    """A fixed number of globalised Newton steps for every row (B, R) at once -> end points, multipliers.

    Row modes, re-decided each iteration from the current point:
      vertex rows     — Newton on G_t towards the row's target t;
      infeasible rows — the same towards the row's interior target (feasibility
                        restoration), taking a strictly feasible trial point as soon as there is one;
      feasible rows   — primal-dual interior-point step for max H s.t. σ(m − c) ≥ 0: the
                        Newton step of the barrier merit Φ = H + μ Σ log σ(m_l − c_l)
                        with the multipliers y (≈ μ/g) carried as variables, μ reduced
                        after every accepted full step.
    The Newton matrix is the exact −∇²Φ where it is positive definite, else its
    Gauss–Newton part cov(β) + M diag(y/g) M: an ascent direction without an
    eigendecomposition. Both step lengths of STEPS are evaluated in one pass; after a step
    that found nothing better the system is damped (Levenberg–Marquardt), so no row stalls.
    """
    B, K, N = P.shape
    R = tgt.shape[1]
    dev, dt = P.device, P.dtype
    alphas = torch.tensor(STEPS, dtype=dt, device=dev)
    J = alphas.shape[0]
    steps = torch.arange(J, device=dev)
    pairs = _Pairs(P)
    kapf = kappa[:, None].to(dt)  # (B, 1, K)
    free = ~kappa[:, None]
    sg, cc = sigma[:, None, None], c[:, None]  # (B, 1, 1), (B, 1, K)
    offmask = 1.0 - torch.eye(K, dtype=dt, device=dev)
    tiny, eps = torch.finfo(dt).tiny, torch.finfo(dt).eps
    can_bar = ~vertex
    mu = torch.full((B, R), MU0, dtype=dt, device=dev)
    damp = torch.zeros(B, R, dtype=dt, device=dev)
    y = torch.zeros(B, R, K, dtype=dt, device=dev)  # constraint multipliers
    was_bar = torch.zeros(B, R, dtype=torch.bool, device=dev)
    bufs = P.new_empty(3, B, R, N).unbind(0)
    trial_buf = P.new_empty(B, R * J, N)
    at = _Point(P, w, u)
    per_class, least, most = EXPLORE_ITERS
    for _ in range(min(max(per_class * K, least), most)):
        g = sg * (at.m - cc)  # (B, R, K) slack, > 0 on κ when strictly feasible
        bar = ((g > 0) | free).all(-1) & can_bar  # (B, R)
        v = kapf * bar[..., None] / g.clamp_min(tiny)  # 1/g on κ of barrier rows
        y = torch.where(was_bar[..., None], y, mu[..., None] * v)  # enter on the central path
        M, A, C = _curvature(P, w, pairs, at, y, bufs)

        # −∇²Φ = −∇²H − σ Σ_l y_l ∇²m_l + M diag(y/g) M  and  ∇Φ = −rb + μσ M (1/g)
        rb, off_h, bb = _entropy_terms(at, offmask)
        off = off_h + sg[..., None] * (2.0 * C - (y[..., :, None] + y[..., None, :]) * A)
        barrier = (M * (y * v)[..., None, :]) @ M
        mats = torch.stack([_lap(off), _lap(bb)], -3) + barrier[..., None, :, :]  # exact, Gauss–Newton
        mats = torch.where(bar[..., None, None, None], mats, M[..., None, :, :])  # others: G_t's Hessian
        grad = torch.where(bar[..., None], (mu * sigma[:, None])[..., None] * (M @ v[..., None])[..., 0] - rb,
                           tgt - at.m)  # restoration and vertex rows: ∇(−G_t) = t − m
        d = _newton(mats, grad, damp, RIDGE[dt])  # (B, R, K)

        # both step lengths in one pass
        ut = (at.u[:, :, None] + alphas[:, None] * d[:, :, None]).view(B, R * J, K)
        trial = _Point(P, w, ut, trial_buf)
        gt = (sg * (trial.m - cc)).view(B, R, J, K)
        feas = ((gt > 0) | free[:, :, None]).all(-1)  # (B, R, J)
        Ht = trial.H.view(B, R, J)
        phi = Ht + mu[..., None] * (kapf[:, :, None] * torch.log(gt.clamp_min(tiny))).sum(-1)
        phi0 = at.H + mu * (kapf * torch.log(g.clamp_min(tiny))).sum(-1)
        ok_bar = feas & (phi >= (phi0 - 8.0 * eps * (1.0 + phi0.abs()))[..., None])
        # restoration and vertex rows: G_t decreases along the step, or the residual halves
        err = trial.m.view(B, R, J, K) - tgt[:, :, None]
        res0 = (at.m - tgt).abs().amax(-1)
        ok_g = ((err * d[:, :, None]).sum(-1) <= 0) | (err.abs().amax(-1) <= 0.5 * res0[..., None])
        ok_res = torch.where((feas & can_bar[..., None]).any(-1, keepdim=True), feas, ok_g)
        ok = torch.where(bar[..., None], ok_bar, ok_res) & torch.isfinite(Ht)
        # barrier rows: best merit; the others: longest acceptable step
        j = torch.where(bar, torch.where(ok, phi, -math.inf).argmax(-1),
                        torch.where(ok, steps, J - 1).amin(-1))  # (B, R)
        moved = ok.any(-1)
        at = trial.rows(torch.arange(R, device=dev) * J + j).where(moved, at)

        # multipliers: y + α Δy with Δy = μ/g − y − y σ (M d)/g, kept positive
        alpha = torch.where(moved, alphas[j], 0.0)[..., None]
        dy = mu[..., None] * v - y - y * sg * (M @ d[..., None])[..., 0] * v
        y = torch.maximum(y + alpha * dy, 0.01 * y) * kapf
        was_bar = bar
        full = moved & (j == 0)
        mu = torch.where(bar & full, (mu * MU_DECAY).clamp_min(MU_MIN), mu)
        # Levenberg–Marquardt: damp after a step that found nothing better, relax after a full step
        damp = torch.where(moved, torch.where(full, 0.1 * damp, damp), (10.0 * damp).clamp_min(DAMP_FAIL))
    return at, y


def _polish(P: Tensor, w: Tensor, c: Tensor, sigma: Tensor, start: _Point, lam: Tensor,
            active: Tensor) -> tuple[_Point, Tensor]:
    """POLISH_ITERS Newton–KKT steps for rows (B, R) from start -> end point and multipliers.

    The constraints in active (B, R, K) become equalities m_l = c_l, the others are
    dropped, and Newton's method on the KKT system
        [W    σJᵀ] [Δu]     [∇H + σ Jᵀλ  ]
        [σJ   0  ] [Δλ] = − [σ(m_A − c_A)]      (W = ∇²H + σ Σ λ_l ∇²m_l, J = rows A of M)
    converges quadratically from a nearby point. It is solved by LU without error checks;
    the caller keeps the end point only if it is feasible and better.
    """
    B, K, N = P.shape
    dev, dt = P.device, P.dtype
    pairs = _Pairs(P)
    sg, cc = sigma[:, None, None], c[:, None]
    offmask = 1.0 - torch.eye(K, dtype=dt, device=dev)
    at = start
    actf = active.to(dt)
    lam = lam * actf
    inactive = torch.diag_embed(1.0 - actf)  # rows Δλ_l = −λ_l for dropped constraints
    bufs = P.new_empty(4, *lam.shape[:2], N).unbind(0)
    for _ in range(POLISH_ITERS):
        M, A, C = _curvature(P, w, pairs, at, lam, bufs[:3])
        rb, off_h, _ = _entropy_terms(at, offmask)
        W = _lap(-off_h - sg[..., None] * (2.0 * C - (lam[..., :, None] + lam[..., None, :]) * A))
        W = W - W.abs().amax((-1, -2), keepdim=True) / K  # shift the null direction 1
        Jac = sg[..., None] * M * actf[..., :, None]  # rows l ∈ A: σ ∇m_l
        kkt = torch.cat([torch.cat([W, Jac.transpose(-1, -2)], -1), torch.cat([Jac, inactive], -1)], -2)
        rhs = torch.cat([rb - sg * (M @ lam[..., None])[..., 0],
                         torch.where(active, sg * (cc - at.m), -lam)], -1)
        sol = torch.linalg.solve_ex(kkt, rhs[..., None])[0][..., 0]  # (B, R, 2K)
        sol = torch.nan_to_num(sol, nan=0.0, posinf=0.0, neginf=0.0)
        du = sol[..., :K]
        at = _Point(P, w, at.u + du * (MAX_STEP / du.abs().amax(-1, keepdim=True)).clamp(max=1.0), bufs[3])
        lam = (lam + sol[..., K:]) * actf
    return at, lam
