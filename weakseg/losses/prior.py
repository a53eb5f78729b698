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
  returned exactly.
* |y| = 2: m_1 increases with β_1 and H is unimodal, so the feasible set is
  an interval and the answer is ½ clamped to it. The appendix's grid search
  converges to this point as its grid is refined. We compute the limit exactly:
  m*_1 = clamp(m_1(½)) to [c_1, 1 − c_0] (feasible) or [1 − c_0, c_1]
  (infeasible), then β(m*) by Newton on G, to float64 precision. Σc = 1
  (|y| = 4 at the defaults) is solved the same way with m* = c.
* |y| ≥ 3 is a genuinely non-convex program: {β : m_l(β) ≥ c_l} is not convex
  (m_l is convex along the lines that trade two other classes). With peaked
  probabilities it has several local maxima. They lie on faces of the polytope
  (some constraints active) and differ in which classes are squeezed to a tiny
  β, so which face wins is a combinatorial question. So we run a batched
  multi-start solver and keep the best feasible end point. Images × starts are
  rows of one batch:
    - K "vertex" rows: m = c + (1 − Σc) e_k (all other constraints active),
      solved exactly by Newton on G. For peaked inputs the optimum is often a
      vertex;
    - one row per face (every non-empty set F of free classes while |y| ≤ 6,
      else vertices, edges, their complements and the whole set), started
      inside the face near its centre c + (1 − Σc) 1_F/|F|. Each runs a
      primal-dual interior-point method in u = log β: Newton steps for
      H + μ Σ log σ(m_l − c_l), with the multipliers as variables, on the exact
      K×K Hessian (the third cumulant of q enters through one extra matrix
      product), μ halved after each accepted near-full step. A row that
      starts infeasible first steps on G towards its start point.
  Each Newton step uses |eigenvalues|, so it is an ascent direction also where
  the Hessian is indefinite. Six step lengths are evaluated in one pass and the
  best merit is kept (0 is one of them). After a failed step the system is
  damped (Levenberg–Marquardt), so a row cannot stall. There is no host
  synchronisation inside the loop, the iteration count is fixed, and the result
  is deterministic.
  We chose u-space Newton over an m-space method because the merit and the
  masses for all step lengths cost one pass over the pixels, and u = log β is
  the natural scale for peaked inputs (an answer's β can span 10 orders of
  magnitude). A larger starting μ also smooths the landscape early (the
  central path acts as a homotopy), which helps reach the global maximum.
  Validation: against multi-start SLSQP on random instances (tests/test_prior.py)
  it matches or beats the oracle. With extremely peaked probabilities (i.i.d.
  logits of std 10) and |y| ≥ 7 it can end a few 1e-2 nats below the best local
  maximum that SLSQP finds.

Numerics: everything runs in float64 on the input's device. Probabilities are
restricted to y, floored at 1e-30 (float32 softmax underflows to exact 0, and
the floor keeps every present class reachable) and renormalised per pixel.
They are then kept in linear space: with E = exp(u − max u), a pass over the
pixels is two batched matrix products, and Z_j = Σ_k p_j(k) E_k ≥ 1e-30 / |y|
cannot underflow. Every Hessian here annihilates 1, so its diagonal is formed
from the off-diagonals; this avoids the cancellation in m_l − Σ_j q_j(l)²/N
when q is one-hot.

Cost: two host synchronisations per call. The first sizes the class axis to
the batch's largest |y| and validates the inputs; the second routes each image
to the closed form, the exact Newton solve (15 iterations) or the
multi-start solve (25 iterations). Each iteration is about 70 (exact) or 160
(multi-start) small kernels, on (images × rows × step lengths × pixels)
tensors. On a GPU that is launch-bound; both loops trace without graph breaks
under torch.compile(fullgraph=True), which is the way to fuse them. Gradients
never flow through β or q (they are targets, eq. 4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from weakseg.errors import UserError

P_FLOOR = 1e-30  # probabilities below this are raised to it (see module docstring)
ITERS = 25  # multi-start solver iterations (fixed: no data-dependent stopping, no host sync)
MATCH_ITERS = 15  # Newton steps for the exact cases (quadratic convergence after a few capped steps)
STEPS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0)  # step lengths tried in parallel; 0 keeps the iterate
MAX_FACES = 63  # start in every face of the polytope while |y| ≤ 6
MU0, MU_DECAY = 0.1, 0.5  # barrier weight: start, factor per accepted near-full step
MAX_STEP = 20.0  # cap on |Δu|∞ per iteration (β ratios change by at most e^20)
SUM_TOL = 1e-9  # |Σc − 1| below this is the single-point case m = c
FEAS_TOL = 1e-9  # slack allowed when choosing among end points (vertex rows sit on the boundary)


def adaptive_prior(probs: Tensor, labels: Tensor, c_bg: float = 0.4, c_fg: float = 0.2,
                   valid: Tensor | None = None) -> Tensor:
    """Max-entropy prior β (B, C) of eq. 7 (eq. 22's minimum-violation point when infeasible).

    probs (B, C, h, w) softmax output; labels (B, C) in {0, 1}, background
    (class 0) always counted as present; valid (B, h, w) bool restricts the
    pixel means to real (unpadded) pixels. β is 0 on absent classes and sums
    to 1 over present ones; returned in probs.dtype, without grad.
    """
    with torch.no_grad():
        prob = _Problem(probs, labels, c_bg, c_fg, valid)
        beta = _solve(prob)  # (B, K) float64
        out = torch.zeros(prob.B, prob.C, dtype=torch.float64, device=prob.device)
        out.scatter_(1, prob.idx, beta * prob.present)
        out = torch.where(prob.finite[:, None], out, torch.full_like(out, math.nan))
        return out.to(probs.dtype)


def pixel_label_targets(probs: Tensor, labels: Tensor, c_bg: float = 0.4, c_fg: float = 0.2,
                        valid: Tensor | None = None) -> Tensor:
    """Auxiliary ground truth q (B, C, h, w) of eq. 5: q_j(l) ∝ p_j(l) β_l, exactly 0 on absent classes.

    Same arguments as `adaptive_prior`. Invalid (padded) pixels get a q too,
    computed the same way; they just do not count in the class masses.
    """
    with torch.no_grad():
        prob = _Problem(probs, labels, c_bg, c_fg, valid)
        beta = _solve(prob)  # (B, K)
        w = prob.P * beta[:, :, None]  # (B, K, N)
        q = w / w.sum(1, keepdim=True)
        out = torch.zeros(prob.B, prob.C, prob.N, dtype=torch.float64, device=prob.device)
        out.scatter_(1, prob.idx[:, :, None].expand(-1, -1, prob.N), q * prob.present[:, :, None])
        out = torch.where(prob.finite[:, None, None], out, torch.full_like(out, math.nan))
        return out.view(probs.shape).to(probs.dtype)


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

    def __init__(self, probs: Tensor, labels: Tensor, c_bg: float, c_fg: float,
                 valid: Tensor | None) -> None:
        c_bg, c_fg = _real("c_bg", c_bg), _real("c_fg", c_fg)
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
        # first host synchronisation: batch-wide K and the validation flags
        K, any_bad, first_bad, any_empty, first_empty = 1, 0, 0, 0, 0
        if B:
            stats = torch.stack([counts.max(), bad_label.any().long(), bad_label.long().argmax(),
                                 empty.any().long(), empty.long().argmax()]).tolist()
            K, any_bad, first_bad, any_empty, first_empty = (int(s) for s in stats)
        if any_bad:
            raise UserError(f"labels must be 0/1, image {first_bad} of the batch has other values")
        if any_empty:
            raise UserError(f"valid marks no pixel of image {first_empty} of the batch as real")
        self.K = K
        self.w = wpix / wsum[:, None]  # (B, N), sums to 1

        # present classes first, in class order (background in slot 0)
        order = torch.argsort((~present_c).to(torch.int8), dim=1, stable=True)  # (B, C)
        self.idx = order[:, :K]  # (B, K) class id per slot
        slot = torch.arange(K, device=dev)
        self.present = slot[None] < counts[:, None]  # (B, K)
        c = torch.full((K,), c_fg, dtype=torch.float64, device=dev)
        c[0] = c_bg  # (K,) in float64: c_fg = 0.2 must not pass through float32
        self.c = c[None] * self.present  # (B, K), 0 on empty slots

        x = probs.detach().reshape(B, C, self.N)
        self.finite = torch.isfinite(x).all(2).all(1)  # (B,) non-finite images give NaN outputs
        p = x.gather(1, self.idx[:, :, None].expand(-1, -1, self.N)).to(torch.float64)  # (B, K, N)
        p = torch.where(self.finite[:, None, None], p, torch.ones_like(p))
        p = p.clamp_min(P_FLOOR) * self.present[:, :, None]
        self.P = p / p.sum(1, keepdim=True)  # (B, K, N): restricted to y, renormalised per pixel


# ----------------------------------------------------------------------------- solver


def _moments(P: Tensor, w: Tensor, u: Tensor, neg: Tensor) -> tuple[Tensor, ...]:
    """One pass over the pixels for many u at once: P (B, K, N), w (B, N), u (B, R, K).

    neg (B, 1, K) is 0 on present slots and −inf on absent ones. Returns β (B, R, K),
    H(β) (B, R), Z (B, R, N) with Z_j = Σ_k p_j(k) β_k / max β, the masses m (B, R, K)
    and Σ_j w_j logsumexp_k(log p_j(k) + u_k) (B, R).
    """
    ul = u + neg
    umax = ul.amax(-1, keepdim=True)  # (B, R, 1)
    E = torch.exp(ul - umax)  # (B, R, K), max 1, 0 on absent slots
    Es = E.sum(-1, keepdim=True)
    beta = E / Es
    H = torch.log(Es[..., 0]) - (beta * (u - umax)).sum(-1)  # −Σ β log β
    Z = E @ P  # (B, R, N), ≥ 1e-30 / K: the largest E is 1
    m = E * ((w[:, None] / Z) @ P.transpose(1, 2))  # (B, R, K)
    lse = (torch.log(Z) @ w[:, :, None])[..., 0] + umax[..., 0]  # (B, R)
    return beta, H, Z, m, lse


def _laplacian(a: Tensor, eye: Tensor) -> Tensor:
    """diag(a 1) − a, ignoring a's own diagonal: off-diagonal −a, rows summing to 0.

    Forming the diagonal from the off-diagonals avoids the cancellation in e.g.
    m_l − Σ_j w_j q_j(l)² when q is nearly one-hot.
    """
    a = a.masked_fill(eye, 0.0)
    return torch.diag_embed(a.sum(-1)) - a


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


def _solve(prob: _Problem) -> Tensor:
    """β (B, K) in float64 for every image: closed-form and exact cases, then the multi-start solver."""
    P, w, c, present = prob.P, prob.w, prob.c, prob.present
    B, K, N = P.shape
    dev, dt = P.device, P.dtype

    csum = c.sum(1)  # (B,)
    sigma = torch.where(csum <= 1.0 + SUM_TOL, 1.0, -1.0).to(dt)  # +1: m ≥ c,  −1: m ≤ c
    point = (csum - 1.0).abs() <= SUM_TOL
    # Σc ≥ 1 forces m_l = 0, i.e. β_l = 0, for classes with c_l = 0
    present = present & ~((csum >= 1.0 - SUM_TOL)[:, None] & (c == 0))
    kappa = present & (c > 0)  # constrained classes
    kb = present.sum(1)  # (B,)
    neg = torch.zeros(B, 1, K, dtype=dt, device=dev).masked_fill(~present[:, None], -math.inf)

    uniform, _, _, m0, _ = _moments(P, w, torch.zeros(B, 1, K, dtype=dt, device=dev), neg)
    uniform, m0 = uniform[:, 0], m0[:, 0]  # (B, K): uniform β and its class masses
    uniform_ok = ((sigma[:, None] * (m0 - c) >= 0) | ~kappa).all(1)  # H's global maximum is feasible
    exact = ~uniform_ok & ((kb <= 2) | point)
    general = ~uniform_ok & ~exact
    # second (and last) host synchronisation: which images need which solver
    kind = (exact.long() + 2 * general.long()).cpu()
    ex, gen = (torch.nonzero(kind == k)[:, 0].to(dev) for k in (1, 2))
    beta = uniform.clone()

    if ex.numel():
        # |y| = 2: m* = m(uniform) clamped to the interval of admissible masses; Σc = 1: m* = c
        cx, other = c[ex], 1.0 - csum[ex, None] + c[ex]
        t = torch.minimum(torch.maximum(m0[ex], torch.minimum(cx, other)), torch.maximum(cx, other))
        t = torch.where(point[ex, None], cx, t)  # (E, K)
        beta[ex] = _match(P[ex], w[ex], t, neg[ex], MATCH_ITERS)

    if gen.numel():
        beta[gen] = _multistart(P[gen], w[gen], c[gen], sigma[gen], present[gen], kappa[gen], neg[gen])
    return beta


def _newton(hess: Tensor, grad: Tensor, null: Tensor, damp: Tensor | float = 0.0) -> Tensor:
    """Ascent direction V (|Λ| + damping)⁻¹ Vᵀ grad, capped at MAX_STEP.

    This is the Newton step where hess is negative definite and an ascent direction
    where it is not. The null directions (1 and absent slots, where every Hessian here
    vanishes) are shifted to an eigenvalue of the matrix's scale, so rounding in grad
    along them is not amplified.
    """
    scale = hess.abs().amax((-1, -2), keepdim=True)  # (…, 1, 1)
    lam, V = torch.linalg.eigh(hess - scale * null)
    lam = lam.abs().clamp_min(1e-12 * scale[..., 0] + 1e-30) + damp * scale[..., 0]
    d = (V @ ((V.transpose(-1, -2) @ grad[..., None]) / lam[..., None]))[..., 0]
    return d * (MAX_STEP / d.abs().amax(-1, keepdim=True).clamp_min(1e-300)).clamp(max=1.0)


def _null(present: Tensor) -> Tensor:
    """Projector onto span(1 on present slots, e_k on absent slots): (B, 1, K, K)."""
    pres = present[:, None].to(torch.float64)
    ones = pres[..., :, None] * pres[..., None, :] / pres.sum(-1, keepdim=True)[..., None]
    return ones + torch.diag_embed(1.0 - pres)


def _match(P: Tensor, w: Tensor, t: Tensor, neg: Tensor, iters: int) -> Tensor:
    """β (B, K) with m(β) = t: Newton on the convex G_t(u), with a parallel line search on G_t."""
    B, K, N = P.shape
    dev, dt = P.device, P.dtype
    alphas = torch.tensor(STEPS, dtype=dt, device=dev)[:, None]  # (J, 1)
    PP = (P[:, :, None] * P[:, None]).reshape(B, K * K, N).transpose(1, 2)  # (B, N, K²): p_j(a) p_j(b)
    eye = torch.eye(K, dtype=torch.bool, device=dev)
    null = _null(neg[:, 0] == 0)[:, 0]  # (B, K, K)
    u = torch.zeros(B, K, dtype=dt, device=dev)
    beta, _, Z, m, _ = (x[:, 0] for x in _moments(P, w, u[:, None], neg))
    for _ in range(iters):
        E = beta / beta.amax(-1, keepdim=True)
        A = ((w / Z**2)[:, None] @ PP).view(B, K, K) * (E[:, :, None] * E[:, None, :])
        d = _newton(_laplacian(A, eye), t - m, null)  # −G_t has Hessian −M; |Λ| makes it M
        uc = u[:, None] + alphas * d[:, None]  # (B, J, K)
        bc, _, Zc, mc, lsec = _moments(P, w, uc, neg)
        score = (t[:, None] * uc).sum(-1) - lsec  # −G_t (B, J)
        # near the solution G's differences drop below its rounding: there take the full step
        score[:, 0] += 1e12 * ((mc[:, 0] - t).abs().amax(-1) < 1e-6)
        best = score.argmax(-1)  # (B,)
        u, beta, m = (x.gather(1, best[:, None, None].expand(B, 1, K))[:, 0] for x in (uc, bc, mc))
        Z = Zc.gather(1, best[:, None, None].expand(B, 1, N))[:, 0]
    return beta


def _multistart(P: Tensor, w: Tensor, c: Tensor, sigma: Tensor, present: Tensor, kappa: Tensor,
                neg: Tensor) -> Tensor:
    """|y| ≥ 3, uniform β infeasible, Σc ≠ 1: the best end point of many local solves -> β (B, K)."""
    B, K, N = P.shape
    dev, dt = P.device, P.dtype
    csum = c.sum(1)
    kf = present.sum(1).to(dt)[:, None]
    sg, cc, kap = sigma[:, None, None], c[:, None], kappa[:, None]
    # interior reference point z and the vertices v_k = c + (1 − Σc) e_k of the polytope
    z = torch.where(sigma[:, None] > 0, c + (1.0 - csum[:, None]) / kf, c / csum[:, None]) * present
    eye = torch.eye(K, dtype=dt, device=dev)
    verts = (c[:, None] + (1.0 - csum)[:, None, None] * eye) * present[:, None]  # (B, K, K), row k = v_k
    vert_ok = present & (torch.diagonal(verts, dim1=1, dim2=2) > 0)  # (B, K)
    exact_v = torch.where(vert_ok[..., None], verts, z[:, None].expand(B, K, K))
    # faces: with the classes outside a set F at their bound, the face's centre is
    # c + (1 − Σc) 1_F / |F|; local maxima lie on faces, and which face wins is combinatorial
    faces = _face_sets(K, dev)  # (F, K) bool
    fok = (faces[None] <= present[:, None]).all(-1)  # (B, F): F ⊆ y
    ff = faces.to(dt)
    centres = (c[:, None] + (1.0 - csum)[:, None, None] * ff / ff.sum(-1, keepdim=True)) * present[:, None]
    zf = z[:, None].expand_as(centres)
    near_f = torch.where(fok[..., None], _radial(centres, zf, cc, sg, kap, 0.8), zf)  # (B, F, K)
    # rows: the exact vertices (match rows), then a barrier start inside every face
    tgt = torch.cat([exact_v, near_f], 1)  # (B, R, K)
    R = tgt.shape[1]
    match = (torch.arange(R, device=dev) < K)[None].expand(B, R)
    u = _iterate(P, w, c, sigma, present, kappa, torch.zeros_like(tgt), tgt, match, ITERS)  # (B, R, K)

    # per image, the feasible end point of largest entropy (least violation if none is)
    b, H, _, m, _ = _moments(P, w, u, neg)
    viol = ((sg * (cc - m)).clamp_min(0.0) * kap).amax(-1)  # (B, R)
    best = torch.where(viol <= FEAS_TOL, H, -1.0 - viol).argmax(1)  # H ≥ 0 > −1 − viol
    return b.gather(1, best[:, None, None].expand(B, 1, K))[:, 0]


def _face_sets(K: int, device: torch.device) -> Tensor:
    """Sets of free classes whose faces get a start: every non-empty subset while there are at
    most MAX_FACES, else the vertices, edges, their complements and the whole set. (F, K) bool."""
    if 2**K - 1 <= MAX_FACES:
        bits = torch.arange(1, 2**K, device=device)
        return (bits[:, None] >> torch.arange(K, device=device)) & 1 == 1
    eye = torch.eye(K, dtype=torch.bool, device=device)
    ia, ib = torch.triu_indices(K, K, 1, device=device)
    small = torch.cat([eye, eye[ia] | eye[ib]])
    return torch.cat([small, ~small, torch.ones(1, K, dtype=torch.bool, device=device)])


def _iterate(P: Tensor, w: Tensor, c: Tensor, sigma: Tensor, present: Tensor, kappa: Tensor,
             u: Tensor, tgt: Tensor, match: Tensor, iters: int) -> Tensor:
    """A fixed number of globalised Newton steps for every row (B, R) at once; returns u (B, R, K).

    Row modes, re-decided each iteration from the current point:
      match rows      — Newton on G_t towards the row's target t (an exact vertex);
      infeasible rows — the same towards the row's interior target (feasibility restoration);
      feasible rows   — primal-dual interior-point step for max H s.t. σ(m − c) ≥ 0: the
                        Newton step of the barrier merit Φ = H + μ Σ_κ log σ(m_l − c_l)
                        with the multipliers y (≈ μ/g) carried as variables, μ halved
                        after every accepted near-full step.
    Step lengths STEPS are evaluated in one pass and the best merit kept (0 is one of
    them, so the merit never decreases); after a step that found nothing better the
    Newton system is damped (Levenberg–Marquardt), so the search cannot stall.
    """
    B, K, N = P.shape
    R = u.shape[1]
    dev, dt = P.device, P.dtype
    alphas = torch.tensor(STEPS, dtype=dt, device=dev)  # (J,)
    J = alphas.shape[0]
    PP = (P[:, :, None] * P[:, None]).reshape(B, K * K, N).transpose(1, 2)  # (B, N, K²): p_j(a) p_j(b)
    neg = torch.zeros(B, 1, K, dtype=dt, device=dev).masked_fill(~present[:, None], -math.inf)
    kapf = kappa[:, None].to(dt)  # (B, 1, K)
    free = ~kappa[:, None]  # unconstrained slots
    sg, cc = sigma[:, None, None], c[:, None]  # (B, 1, 1), (B, 1, K)
    sg4 = sg[..., None]
    eye = torch.eye(K, dtype=torch.bool, device=dev)
    null = _null(present)
    can_bar = ~match
    mu = torch.full((B, R), MU0, dtype=dt, device=dev)
    damp = torch.zeros(B, R, 1, dtype=dt, device=dev)
    y = torch.zeros(B, R, K, dtype=dt, device=dev)  # constraint multipliers
    was_bar = torch.zeros(B, R, dtype=torch.bool, device=dev)

    beta, H, Z, m, _ = _moments(P, w, u, neg)
    for _ in range(iters):
        g = sg * (m - cc)  # (B, R, K) slack, > 0 on κ when strictly feasible
        bar = ((g > 0) | free).all(-1) & can_bar  # (B, R)
        v = kapf / g.clamp_min(1e-100)  # 1/g on κ (meaningful on barrier rows only)
        y = torch.where(was_bar[..., None], y, mu[..., None] * v)  # enter on the central path

        # A = Σ_j w_j q_j q_jᵀ and C = Σ_j w_j (y·q_j) q_j q_jᵀ, from the products p_j(a) p_j(b)
        E = beta / beta.amax(-1, keepdim=True)  # the β / max β that built Z
        s = w[:, None] / Z**2  # (B, R, N)
        ybar = ((y * E) @ P) / Z  # (B, R, N)
        EE = E[..., :, None] * E[..., None, :]  # (B, R, K, K)
        AC = (torch.cat([s, s * ybar], 1) @ PP).view(B, 2, R, K, K)
        A, C = AC[:, 0] * EE, AC[:, 1] * EE  # (B, R, K, K)
        M = _laplacian(A, eye)  # dm/du = diag(m) − A, with exact zero row sums

        # ∇²H + σ Σ_l y_l ∇²m_l − M diag(y/g) M  and  ∇Φ = ∇H + μσ M (1/g)
        rb = beta * (torch.log(beta.clamp_min(1e-300)) + H[..., None])  # ∇H = −rb
        bb = beta[..., :, None] * (beta + 2.0 * rb)[..., None, :]
        off = 0.5 * (bb + bb.transpose(-1, -2)) + sg4 * (2.0 * C - (y[..., :, None] + y[..., None, :]) * A)
        hess_b = _laplacian(-off, eye) - (M * (y * v)[..., None, :]) @ M
        grad_b = (mu * sigma[:, None])[..., None] * (M @ v[..., None])[..., 0] - rb
        grad = torch.where(bar[..., None], grad_b, tgt - m)  # restoration: ∇(−G_t) = t − m
        hess = torch.where(bar[..., None, None], hess_b, -M)
        d = _newton(hess, grad, null, damp)  # (B, R, K)

        # all step lengths in one pass, keep the best merit
        uc = (u[:, :, None] + alphas[:, None] * d[:, :, None]).view(B, R * J, K)
        bc, Hc, Zc, mc, lsec = _moments(P, w, uc, neg)
        gc = (sg * (mc - cc)).view(B, R, J, K)
        feasc = ((gc > 0) | free[:, :, None]).all(-1)  # (B, R, J)
        phi = Hc.view(B, R, J) + mu[..., None] * (kapf[:, :, None] * torch.log(gc.clamp_min(1e-300))).sum(-1)
        uc4, mc4 = uc.view(B, R, J, K), mc.view(B, R, J, K)
        neg_g = (tgt[:, :, None] * uc4).sum(-1) - lsec.view(B, R, J)  # −G_t
        # restoration prefers feasible points; near a match target G's differences drop below
        # its rounding, so there the full Newton step is taken
        newton = (alphas == 1.0) & ((mc4 - tgt[:, :, None]).abs().amax(-1) < 1e-6)
        bonus = (feasc & can_bar[..., None]) | newton
        score = torch.where(bar[..., None], phi.masked_fill(~feasc, -math.inf), neg_g + 1e12 * bonus)
        best = score.argmax(-1)  # (B, R)
        pick = torch.arange(R, device=dev)[None] * J + best  # (B, R) index into R·J
        u, beta, m = (x.gather(1, pick[..., None].expand(B, R, K)) for x in (uc, bc, mc))
        H = Hc.gather(1, pick)
        Z = Zc.gather(1, pick[..., None].expand(B, R, N))

        # multipliers: y + α Δy with Δy = μ/g − y − y σ (M d)/g, kept positive
        dy = mu[..., None] * v - y - y * sg * (M @ d[..., None])[..., 0] * v
        y = torch.maximum(y + alphas[best][..., None] * dy, 0.01 * y) * kapf
        was_bar = bar
        mu = torch.where(bar & (best <= 1), mu * MU_DECAY, mu)
        # Levenberg–Marquardt: damp after a step that found nothing better, relax after a full step
        fail, full = (best == J - 1)[..., None], (best == 0)[..., None]
        damp = torch.where(fail, (10.0 * damp).clamp_min(1e-2), torch.where(full, 0.1 * damp, damp))
    return u
