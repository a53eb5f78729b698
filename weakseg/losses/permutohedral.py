"""O(N) Gaussian filtering on the permutohedral lattice, in plain PyTorch.

Adams, Baek & Davis, "Fast High-Dimensional Filtering Using the Permutohedral
Lattice" (Eurographics 2010), as used by Krähenbühl & Koltun's dense CRF
(`permutohedral.cpp` of their densecrf code, also shipped in pydensecrf). The
filter approximates

    out_i = Σ_{j≠i} exp(-½‖f_i − f_j‖²) v_j

in four steps: *elevate* each d-dim feature onto the hyperplane
{y ∈ R^{d+1}: Σ y = 0}; *splat* its value onto the d+1 vertices of the lattice
simplex enclosing it, with barycentric weights; *blur* the lattice with
[1 2 1]/4 along each of its d+1 directions; *slice* back with the same
weights. Everything is batched tensor code: the lattice is the set of unique
packed vertex keys (one sort), blur neighbours come from one `searchsorted`,
splat and slice are sparse (CSR) matrix products, the blur is gathers. The
lattice is built once per call and shared by all C channels, by the backward
pass, and (through `PermutohedralLattice`) by any number of filterings.

Three points where this file departs from a plain port, and why:

- Scale. densecrf only ever uses the filter row-normalised, so its output is
  off by a constant. Here it is multiplied by the constant that makes it
  approximate the *unnormalised* Gaussian sum (`_gaussian_scale`), so this
  backend is interchangeable with the exact dense one.
- Symmetry. On a sparse lattice (missing neighbours count as zero) the blurs
  along different directions do not commute, so B_d…B_0 is not symmetric
  (densecrf applies the directions in reverse order for the transpose). We
  blur with ½(B_d…B_0 + B_0…B_d): symmetric, so k(i, j) = k(j, i) as for the
  exact kernel, and the backward is the forward.
- Self term. The lattice gives each point a weight on itself that is not 1
  (it depends on where the point sits in its simplex and on which lattice
  points around it exist). We compute that diagonal exactly and subtract it,
  rather than subtracting v_i (`_self_weights`); points the lattice sees no
  neighbour of are then cut out, so that they get exactly 0, not ±rounding
  noise (see `_build`).

Accuracy (tests/test_permutohedral.py against the exact sum; `-s` prints
it): where points are dense the lattice kernel has the Gaussian's integral
(ratio 1.00–1.03) and unit variance, and sums are within a few percent (2-D
grids 1–3 %). Mass the blur sends towards lattice points that no feature
occupies is dropped, so where points are sparse, or lie on a lower-dimensional
manifold as image features do (colour nearly constant within a region), raw
sums come out low: 13–24 % on image-like features, ~30 % for sparse 5-D
clouds, and the kernel's reach shrinks to about 2 std where points are sparse
(farther neighbours give 0). Row-normalised, as the neighbourhood loss uses
it, the error is 0.1–1.5 % on image-like features and ≤ 10 % in that sparse
5-D worst case.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from weakseg.errors import UserError

# Packed lattice keys must stay below this (int64, with headroom).
_KEY_LIMIT = 2**62
# The self weights keep, per lattice point, a 2^{d+1}-bit word of which blur
# paths survive; that fits one int64 up to d+1 = 6. Above, they walk the paths.
_WORD_MAX_D1 = 6
# Points per chunk in `_self_weights` (bounds its (chunk, pairs) temporaries).
_CHUNK = 1 << 16


def _gaussian_scale(d: int) -> float:
    """Constant c such that c × (normalised lattice filter) ≈ Σ_j exp(-½‖f_i − f_j‖²) v_j.

    With points of density ρ (per unit feature volume), the exact filter of a
    constant is ρ (2π)^{d/2}. The normalised lattice filter conserves mass:
    splat and slice weights sum to 1 and the [1 2 1]/4 blur sums to 1, so it
    returns the mass a lattice vertex receives, ρ V / J, where
    J = (√(2/3)(d+1))^d is the volume scale of the elevation (E has orthonormal
    columns times √(2/3)(d+1), see `_elevate`) and V = (d+1)^{d−½} is the
    volume per point of the lattice (d+1)·A_d* (A_d* has covolume (d+1)^{−½}).
    Hence c = (2π)^{d/2} J / V = (4π/3)^{d/2} √(d+1). For d = 1 one checks it
    by hand: spacing h = √3/2, splat + two [1 2 1]/4 blurs + slice is a kernel
    of variance h²/6 + h²/2 + h²/2 + h²/6 = 1 and integral h, and c = √(2π)/h.
    The tests confirm integral ratio 1.00 ± 0.03 for dense points in d = 1…5.
    """
    return (4.0 * math.pi / 3.0) ** (d / 2.0) * math.sqrt(d + 1.0)


def _elevate(features: Tensor) -> Tensor:
    """(P, d) features -> (P, d+1) points on the hyperplane Σ y = 0, scaled so that
    the lattice blur is a unit-std Gaussian in feature space.

    y = E f with E's k-th column (1, …, 1, −k, 0, …, 0)/√(k(k+1)) (k ones; Adams
    et al. §3.1, p. 5), times √(2/3)(d+1), the lattice std of the blur (p. 6;
    `inv_std_dev` in densecrf's permutohedral.cpp).
    """
    P, d = features.shape
    k = torch.arange(1, d + 1, device=features.device, dtype=features.dtype)
    cf = features * (math.sqrt(2.0 / 3.0) * (d + 1) / torch.sqrt(k * (k + 1)))  # (P, d)
    # y_j = Σ_{k≥j} cf_k − j·cf_{j−1}   (0-based; the first term is a suffix sum)
    zero = cf.new_zeros(P, 1)
    suffix = torch.cat([cf.flip(1).cumsum(1).flip(1), zero], 1)  # (P, d+1)
    previous = torch.cat([zero, cf], 1)  # (P, d+1): cf_{j−1}
    j = torch.arange(d + 1, device=features.device, dtype=features.dtype)
    return suffix - j * previous


def _enclosing_simplex(elevated: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Adams et al. §3.1 (p. 9–10): the simplex containing each elevated point.

    Returns rem0 (P, d+1) int64, the simplex's remainder-0 vertex (coordinates
    multiples of d+1 summing to 0); rank (P, d+1) int64, a permutation of 0..d
    (rank 0 = largest coordinate of `elevated − rem0`); and the barycentric
    weights (P, d+1) of the vertices v_r = rem0 + r − (d+1)[rank > d − r],
    r = 0..d, which are ≥ 0, sum to 1 and reproduce the point.
    """
    P, d1 = elevated.shape
    d = d1 - 1
    q = torch.round(elevated / d1)  # nearest multiple of d+1, over d+1
    delta = elevated - q * d1  # (P, d+1)
    # rank_x = #{y: δ_y > δ_x} + #{y < x: δ_y = δ_x}, densecrf's pairwise count
    # (on contiguous (d+1, P) rows; uint8 holds d ≤ 60)
    delta_t = delta.T.contiguous()
    rank_t = torch.zeros(d1, P, dtype=torch.uint8, device=elevated.device)
    for x in range(d1):
        for y in range(x + 1, d1):
            y_first = delta_t[x] < delta_t[y]
            rank_t[x] += y_first
            rank_t[y] += ~y_first
    rank = rank_t.T.long()
    # The rounded point need not lie on the plane: Σ q ≠ 0 shifts the ranks by
    # Σ q, and coordinates pushed out of 0..d wrap to the next multiple of d+1.
    rank += q.sum(1, keepdim=True).long()
    wrap = (rank < 0).long() - (rank > d).long()
    rank += d1 * wrap
    rem0 = (q.long() + wrap) * d1
    # Barycentric coordinates (p. 10): differences of the sorted offsets.
    v = (elevated - rem0.to(elevated.dtype)) / d1  # (P, d+1)
    bary = elevated.new_zeros(P, d1 + 1)
    bary.scatter_add_(1, d - rank, v)
    bary.scatter_add_(1, d + 1 - rank, -v)
    bary[:, 0] += 1.0 + bary[:, d1]
    return rem0, rank, bary[:, :d1]


def _packed_keys(rem0: Tensor, coord_of_rank: Tensor, batch: Tensor, num_batches: int
                 ) -> tuple[Tensor, Tensor] | None:
    """Each point's d+1 vertex keys packed into one int64 each; None if they don't fit.

    A vertex's coordinates are x_k = (d+1) q_k + r with one remainder r for all
    k, so it is the digits (batch, q_0, …, q_{d−1}, r) (x_d follows from
    Σ x = 0). Mixed-radix packing, with each radix the data's own q range plus
    2 each side for neighbours, is injective, and the blur neighbour x ± s_j is
    the key plus a constant that depends only on j and on whether r wraps.
    The radices cost ~log2(range/(d+1)) bits per coordinate: a 500×500 image
    with θ = 1 in d = 5 needs ~50 of the 62 bits, so the fallback
    (`_unique_rows`) is for unrealistic ranges only.

    Returns keys (P, d+1) and the neighbour key offsets plus_delta (d+1, d+1)
    [direction j, remainder r] (x + s_j = x + plus_delta[j, r]), or None.
    """
    P, d1 = rem0.shape
    d = d1 - 1
    q = torch.div(rem0[:, :d], d1, rounding_mode="floor")  # (P, d), exact
    q_min, q_max = q.amin(0), q.amax(0)
    radix = (q_max - q_min + 4).tolist()  # vertex q ∈ [min−1, max], neighbours ±1
    total = num_batches * d1
    for r in radix:
        total *= r
    if total >= _KEY_LIMIT:
        return None
    stride = [0] * d  # stride of q_k; r has stride 1 and radix d+1
    s = d1
    for k in reversed(range(d)):
        stride[k] = s
        s *= radix[k]
    dev = rem0.device
    stride_ext = torch.tensor(stride + [0], dtype=torch.int64, device=dev)  # (d+1,); x_d unstored
    base = batch * s + ((q - (q_min - 2)) * stride_ext[:d]).sum(1)  # (P,)
    # Vertex r = rem0 + r − (d+1)[rank > d−r]: from r−1 to r, q_k drops by 1 for
    # the coordinate k of rank d−r+1.
    drop = stride_ext[coord_of_rank].flip(1).cumsum(1)  # (P, d+1): over ranks d, d−1, …
    keys = base[:, None] + torch.arange(d1, device=dev)
    keys[:, 1:] -= drop[:, :-1]
    # x + s_j: every x_k − 1 (r − 1; or r = d and every q_k − 1 when r was 0),
    # then x_j + d+1 (q_j + 1).
    lower = torch.where(torch.arange(d1, device=dev) >= 1, -1, d - sum(stride))  # (d+1,) over r
    plus_delta = lower[None, :] + stride_ext[:, None]  # (d+1 directions, d+1 remainders)
    return keys, plus_delta


def _lattice_from_keys(keys: Tensor, plus_delta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unique lattice points and blur neighbours from packed keys.

    Returns offsets (P, d+1) lattice index of each vertex; order (P(d+1),) the
    stable sort of offsets.flatten() (the splat matrix's column order);
    plus and minus (d+1, M+1) indices of x ± s_j, M (a zero row) if absent.
    """
    P, d1 = keys.shape
    flat = keys.reshape(-1)
    sorted_keys, order = torch.sort(flat, stable=True)
    is_new = torch.ones_like(sorted_keys, dtype=torch.bool)
    is_new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    lattice_keys = sorted_keys[is_new]  # (M,), sorted
    M = lattice_keys.numel()
    offsets = torch.empty_like(flat).scatter_(0, order, is_new.cumsum(0) - 1).reshape(P, d1)
    # One searchsorted for x + s_j; x − s_j is the inverse map (y = x + s_j ⇔ x = y − s_j).
    queries = lattice_keys + plus_delta[:, lattice_keys % d1]  # (d+1, M)
    pos = torch.searchsorted(lattice_keys, queries).clamp_(max=M - 1)
    plus = torch.where(lattice_keys[pos] == queries, pos, M)
    plus = torch.cat([plus, plus.new_full((d1, 1), M)], 1)  # (d+1, M+1)
    minus = torch.full_like(plus, M)
    # Points with no +s_j neighbour write into the sentinel column, reset after.
    minus.scatter_(1, plus[:, :M], torch.arange(M, device=keys.device).expand(d1, M))
    minus[:, M] = M
    return offsets, order, plus, minus


def _unique_rows(rem0: Tensor, rank: Tensor, batch: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`_packed_keys` + `_lattice_from_keys` with explicit key rows: any range, slower."""
    P, d1 = rem0.shape
    d = d1 - 1
    dev = rem0.device
    r = torch.arange(d1, device=dev)
    # (P, d+1 vertices, d coords): x = rem0 + r − (d+1)[rank > d − r]
    x = rem0[:, None, :d] + r[None, :, None] - d1 * (rank[:, None, :d] > (d - r)[None, :, None])
    rows = torch.cat([batch[:, None, None].expand(P, d1, 1), x], 2).reshape(P * d1, d1)
    lattice_rows, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (M, d+1)
    M = lattice_rows.shape[0]
    # s_j = (d+1)e_j − 1 on the stored coordinates (row d has no e_j there), batch unchanged
    step = torch.cat([torch.zeros(d1, 1, dtype=torch.int64, device=dev),
                      d1 * torch.eye(d1, d, dtype=torch.int64, device=dev) - 1], 1)
    queries = torch.cat([lattice_rows[None] + step[:, None], lattice_rows[None] - step[:, None]])
    _, ids = torch.unique(torch.cat([lattice_rows, queries.reshape(-1, d1)]), dim=0,
                          return_inverse=True)
    table = torch.full((int(ids.max()) + 1,), M, dtype=torch.int64, device=dev)
    table[ids[:M]] = torch.arange(M, device=dev)
    idx = torch.cat([table[ids[M:]].reshape(2 * d1, M), ids.new_full((2 * d1, 1), M)], 1)
    return inverse.reshape(P, d1), torch.argsort(inverse, stable=True), idx[:d1], idx[d1:]


def _walk(plus: Tensor, minus: Tensor, start: Tensor, negative: Tensor, mask: Tensor) -> Tensor:
    """End point (M if it fell off the lattice) of moving from lattice point `start`
    by −s_j (where `negative`) or +s_j, for every j in the bit set `mask`, in
    increasing j: the order in which the blur B_d…B_0 applies its directions."""
    idx = start
    for j in range(plus.shape[0]):
        step = torch.where(negative, minus[j][idx], plus[j][idx])
        idx = torch.where((mask >> j) & 1 == 1, step, idx)
    return idx


def _path_words(plus: Tensor, minus: Tensor) -> tuple[Tensor, Tensor]:
    """For every lattice point x, bit X of word_s[x] says whether the `_walk` from x
    with sign s (+, −) along direction set X stays on the lattice; (M+1,) each.

    Dynamic programming over X: X's walk is X∖{max X}'s walk plus one step along
    max X, so all 2^{d+1} walks cost 2^{d+1} gathers of M indices per sign.
    Needs 2^{d+1} ≤ 64 (d ≤ 5); bit 63 is the sign bit, which `>>` then `& 1`
    reads back correctly.
    """
    d1, M1 = plus.shape
    n = 1 << d1
    dev = plus.device
    words = (torch.zeros(M1, dtype=torch.int64, device=dev),
             torch.zeros(M1, dtype=torch.int64, device=dev))
    for table, word in zip((plus, minus), words):
        for c in range(0, M1, _CHUNK):  # (n, chunk) walk ends at a time
            ends = torch.empty(n, min(_CHUNK, M1 - c), dtype=torch.int64, device=dev)
            ends[0] = torch.arange(c, c + ends.shape[1], device=dev)
            for X in range(1, n):
                j = X.bit_length() - 1
                torch.index_select(table[j], 0, ends[X ^ (1 << j)], out=ends[X])
            alive = ends != M1 - 1
            for X in range(n):
                word[c:c + ends.shape[1]] |= alive[X] * (1 << X if X < 63 else -(1 << 63))
    return words


def _self_weights(offsets: Tensor, coord_of_rank: Tensor, bary: Tensor, plus: Tensor,
                  minus: Tensor) -> Tensor:
    """Exact diagonal of S^T B S: the weight the lattice filter gives each point on itself.

    Why not just subtract v_i: the lattice's self weight is
    Σ_{a,b} b_a b_b B[v_a, v_b] (B = B_d…B_0 normalised, b the barycentric
    weights), which varies with the point's place in its simplex and with
    which lattice points around it exist (a blur move into a missing point is
    lost). A few percent off 1 in dense regions, it is the *whole* response of
    an isolated point, and the neighbourhood loss divides by filter(1):
    subtracting v_i there would leave a spurious (or negative) self weight
    exactly where the normaliser is smallest. ½(B + Bᵀ) has the same diagonal.

    B moves mass along direction j by 0 (centre tap ½) or ±s_j (side taps ¼),
    for j = 0, …, d in turn; a move survives only if it lands on an existing
    lattice point. The simplex vertices are v_t = v_0 − Σ_{j∈S_t} s_j with S_t
    the t coordinates of largest rank, and Σ_j s_j = 0, so for a < b, with
    T = S_b ∖ S_a, exactly four move patterns join v_a and v_b: −1 on T or +1
    off T from v_a, +1 on T or −1 off T from v_b, of weights 2^{−(d+1)}·2^{−|T|}
    and 2^{−(d+1)}·2^{−(d+1−|T|)}. A vertex reaches itself by staying
    (2^{−(d+1)}, always there) or by moving +1 (or −1) along every direction
    (2^{−2(d+1)} each). A pattern counts iff its walk stays on the lattice.
    Returns (P,) in bary's dtype, normalised (`_gaussian_scale` not applied).
    """
    d1 = offsets.shape[1]
    words = _path_words(plus, minus) if d1 <= _WORD_MAX_D1 else None
    # Coordinate-major (d+1, P) layout: picking vertex rows is then a plain copy.
    offsets_t, coord_t, bary_t = offsets.T.contiguous(), coord_of_rank.T.contiguous(), bary.T
    return torch.cat([_self_weights_chunk(offsets_t[:, c:c + _CHUNK], coord_t[:, c:c + _CHUNK],
                                          bary_t[:, c:c + _CHUNK].contiguous(), plus, minus, words)
                      for c in range(0, offsets.shape[0], _CHUNK)])


def _self_weights_chunk(offsets: Tensor, coord_of_rank: Tensor, bary: Tensor, plus: Tensor,
                        minus: Tensor, words: tuple[Tensor, Tensor] | None) -> Tensor:
    """`_self_weights` for one chunk of points, all inputs (d+1, P); `words` from
    `_path_words`, or None to walk the paths."""
    d1, P = offsets.shape
    dev = offsets.device
    full = (1 << d1) - 1
    # sets[t] = bit set S_t (coordinates of the t largest ranks), t = 0..d+1
    bits = torch.ones_like(coord_of_rank) << coord_of_rank  # (d+1, P), by rank
    sets = torch.cat([bits.new_zeros(1, P), bits.flip(0).cumsum(0)])  # (d+2, P)
    a, b = torch.triu_indices(d1, d1, 1, device=dev)  # all vertex pairs a < b

    def at(x: Tensor, i: Tensor) -> Tensor:  # rows i of x, much faster than x[i]
        return x.index_select(0, i)

    T = at(sets, b) - at(sets, a)  # (pairs, P): S_b ∖ S_a
    C = full - T  # the other directions
    if words is not None:
        w_plus, w_minus = words[0].take(offsets), words[1].take(offsets)  # (d+1, P)
        near = ((at(w_minus, a) >> T) & 1) + ((at(w_plus, b) >> T) & 1)  # (pairs, P)
        far = ((at(w_plus, a) >> C) & 1) + ((at(w_minus, b) >> C) & 1)
        loops = ((w_plus >> full) & 1) + ((w_minus >> full) & 1)  # (d+1, P)
    else:
        M = plus.shape[1] - 1
        yes, no = torch.tensor(True, device=dev), torch.tensor(False, device=dev)

        def on(start: Tensor, neg: Tensor, mask: Tensor) -> Tensor:
            return (_walk(plus, minus, start, neg, mask) != M).long()

        near = on(at(offsets, a), yes, T) + on(at(offsets, b), no, T)
        far = on(at(offsets, a), no, C) + on(at(offsets, b), yes, C)
        everything = torch.full_like(offsets, full)
        loops = on(offsets, no, everything) + on(offsets, yes, everything)
    n = (b - a).to(bary.dtype)[:, None]  # |T|
    pair = near.to(bary.dtype) * 2.0 ** -n + far.to(bary.dtype) * 2.0 ** -(d1 - n)  # (pairs, P)
    self_loops = 1.0 + 2.0 ** -d1 * loops.to(bary.dtype)  # (d+1, P)
    diag = (bary.square() * self_loops).sum(0) + (at(bary, a) * at(bary, b) * pair).sum(0)
    return diag * 2.0 ** -d1


def _csr(crow: Tensor, col: Tensor, val: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR matrix, without torch's one-time 'beta' warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, val, size, check_invariants=False)


@dataclass(frozen=True)
class _Lattice:
    """Everything the filter needs, built once from the features."""

    splat: Tensor  # (M+1, P) CSR: barycentric weights, points -> lattice (row M empty)
    slice: Tensor  # (P, M+1) CSR: the transpose, lattice -> points
    plus: Tensor  # (d+1, M+1) int64 index of x + s_j; M (the zero row) if absent
    minus: Tensor  # (d+1, M+1) int64 index of x − s_j; M if absent
    self_weight: Tensor  # (P,) the operator's diagonal, scaled like the output
    scale: float  # _gaussian_scale(d)
    isolated: Tensor | None = None  # int64 indices of points with no neighbour at all


def _build(features: Tensor, dtype: torch.dtype) -> _Lattice:
    """Lattice for features (B, N, d), one per image, all in one hash table."""
    B, N, d = features.shape
    P, d1 = B * N, d + 1
    dev = features.device
    # Centring per image keeps float32 elevation accurate (the exact filter is
    # translation invariant; the lattice nearly so, and each image is centred
    # by its own mean only, so batching changes nothing).
    f = features.to(dtype)
    f = (f - f.mean(1, keepdim=True)).reshape(P, d)
    rem0, rank, bary = _enclosing_simplex(_elevate(f))
    coord_of_rank = torch.empty_like(rank).scatter_(
        1, rank, torch.arange(d1, device=dev).expand(P, d1))  # [:, t] = coordinate of rank t
    batch = torch.arange(B, device=dev).repeat_interleave(N)
    packed = _packed_keys(rem0, coord_of_rank, batch, B)
    if packed is not None:
        offsets, order, plus, minus = _lattice_from_keys(packed[0], packed[1])
    else:
        offsets, order, plus, minus = _unique_rows(rem0, rank, batch)
    M = plus.shape[1] - 1
    flat = offsets.reshape(-1)
    weights = bary.reshape(-1)
    crow = torch.zeros(M + 2, dtype=torch.int64, device=dev)
    crow[1:] = torch.bincount(flat, minlength=M + 1).cumsum(0)
    splat = _csr(crow, torch.div(order, d1, rounding_mode="floor"), weights[order], (M + 1, P))
    slice_ = _csr(torch.arange(0, P * d1 + 1, d1, device=dev), flat, weights, (P, M + 1))
    scale = _gaussian_scale(d)
    diag = _self_weights(offsets, coord_of_rank, bary, plus, minus)
    lattice = _Lattice(splat=splat, slice=slice_, plus=plus, minus=minus,
                       self_weight=diag * scale, scale=scale)
    # A point none of whose lattice neighbours carries anyone else's mass gets
    # out = (own lattice weight) − (the same, computed as the diagonal): ±ε
    # rounding noise, ~1e-7 in float32, of either sign, where the exact filter
    # gives a non-negative ~0, and the neighbourhood loss divides by filter(1).
    # Such points are cut out of the operator (their rows and columns zeroed):
    # still linear and symmetric, and a change below rounding level.
    k1 = _apply(lattice, bary.new_ones(P, 1))[:, 0]  # filter(1)
    isolated = torch.nonzero(k1 <= 8 * torch.finfo(dtype).eps * lattice.self_weight).flatten()
    if isolated.numel() == 0:
        return lattice
    return dataclasses.replace(lattice, isolated=isolated)


def _blur(grid: Tensor, plus: Tensor, minus: Tensor) -> Tensor:
    """[1 2 1]/4 along one lattice direction; missing neighbours (row M) are zero."""
    return torch.add(grid.index_select(0, plus), grid.index_select(0, minus)).mul_(0.25).add_(
        grid, alpha=0.5)


def _apply(lat: _Lattice, values: Tensor) -> Tensor:
    """The self-excluded filter as a linear map of values (P, C) -> (P, C)."""
    d1 = lat.plus.shape[0]
    v = values.to(lat.self_weight.dtype).contiguous()
    if lat.isolated is not None:
        v = v.index_fill(0, lat.isolated, 0.0)
    grid = lat.splat @ v  # (M+1, C); row M is 0
    forward, backward = grid, grid
    for j in range(d1):  # ½(B_d…B_0 + B_0…B_d): symmetric, see the module docstring
        forward = _blur(forward, lat.plus[j], lat.minus[j])
        backward = _blur(backward, lat.plus[d1 - 1 - j], lat.minus[d1 - 1 - j])
    grid = forward.add_(backward).mul_(0.5 * lat.scale)
    out = lat.slice @ grid  # (P, C)
    out.addcmul_(v, lat.self_weight[:, None], value=-1.0)
    if lat.isolated is not None:
        out.index_fill_(0, lat.isolated, 0.0)
    return out.to(values.dtype)


class _LatticeFilter(torch.autograd.Function):
    """Linear and symmetric in `values`, so the backward is the same filter.

    The backward reuses the forward's lattice (kept on ctx, nothing rebuilt)
    and calls this Function again, so double backward works too. There is no
    gradient w.r.t. the features: the lattice is built without autograd.
    """

    @staticmethod
    def forward(ctx, values: Tensor, lattice: _Lattice) -> Tensor:
        ctx.lattice = lattice
        return _apply(lattice, values)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return _LatticeFilter.apply(grad_out.contiguous(), ctx.lattice), None


class PermutohedralLattice:
    """The lattice of a batch of feature sets, reusable for many value tensors.

    features (B, N, d), already divided by their θ's, one lattice per image
    (batched into one hash table). Build once, then `filter` any number of
    (B, N, C) values: p and 1 in the neighbourhood loss, or the iterations of
    a mean-field CRF. Features are constants: no gradient flows to them.
    `dtype` (float32 or float64) is the precision of the lattice and filter.
    """

    def __init__(self, features: Tensor, dtype: torch.dtype = torch.float32) -> None:
        if features.dim() != 3 or features.shape[2] < 1:
            raise ValueError(f"features must be (B, N, d) with d ≥ 1, got {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got {features.dtype}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        if features.shape[2] > 60:
            raise ValueError(f"at most 60 feature dimensions are supported, "
                             f"got {features.shape[2]}")
        self.shape = tuple(features.shape)
        self.dtype = dtype
        self._lattice: _Lattice | None = None
        with torch.no_grad():
            if not bool(torch.isfinite(features).all()):
                raise UserError("permutohedral_filter: features contain NaN or inf "
                                "(check the image and the θ bandwidths it was divided by)")
            if features.shape[0] * features.shape[1] > 0:
                self._lattice = _build(features.detach(), dtype)

    @property
    def num_vertices(self) -> int:
        """Lattice points in use over all images: the size of the blurred grid."""
        return 0 if self._lattice is None else self._lattice.plus.shape[1] - 1

    def filter(self, values: Tensor) -> Tensor:
        """out_i ≈ Σ_{j≠i} exp(-½‖f_i − f_j‖²) v_j; values (B, N, C) -> (B, N, C).

        Runs in the lattice's dtype, returns values' dtype; differentiable in values.
        """
        B, N, _ = self.shape
        if values.dim() != 3 or tuple(values.shape[:2]) != (B, N):
            raise ValueError(f"values must be (B, N, C) = ({B}, {N}, C) like the features, "
                             f"got {tuple(values.shape)}")
        if not values.is_floating_point():
            raise ValueError(f"values must be floating point, got {values.dtype}")
        if self._lattice is None or values.numel() == 0:
            return torch.zeros_like(values)
        if values.device != self._lattice.plus.device:
            raise ValueError(f"values on {values.device} but the lattice on "
                             f"{self._lattice.plus.device}")
        v = values.reshape(B * N, values.shape[2])
        return _LatticeFilter.apply(v, self._lattice).reshape(values.shape)


def permutohedral_filter(features: Tensor, values: Tensor) -> Tensor:
    """out_i ≈ Σ_{j≠i} exp(-½‖f_i − f_j‖²) v_j   (self term excluded)

    features (B, N, d) already divided by their θ's (d = 5 for the bilateral
    kernel: 3 colours + 2 positions; any d ≥ 1 works); values (B, N, C) ->
    (B, N, C), same dtype/device as values. O(B·N·(d+1)·C) time and memory;
    float64 values run in float64, anything else in float32. Differentiable
    in values (the backward is the same filter); no gradient w.r.t. features.
    """
    if features.dim() != 3 or values.dim() != 3 or features.shape[:2] != values.shape[:2]:
        raise ValueError(f"features must be (B, N, d) and values (B, N, C) with the same B, N; "
                         f"got {tuple(features.shape)} and {tuple(values.shape)}")
    if features.device != values.device:
        raise ValueError(f"features on {features.device} but values on {values.device}")
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    return PermutohedralLattice(features, dtype).filter(values)
