"""The codebook search that libggml's codebook i-quants share (IQ3_XXS / IQ3_S: 4-weight points, IQ2_XXS /
IQ2_XS / IQ2_S: 8-weight points), in numpy, float32 in C order (``quantkit.formats.gguf.ggml_float``).

A codebook's points have coordinates 2l + 1 (levels l in 0..kmax - 1); a point's key packs its levels,
``bits`` per coordinate. A run of n weights (32, or 16 for IQ2_XS / IQ2_S) stores |x| as n / dim points times
the run's scale, and the signs apart (with ``parity``: 7 bits per 8 weights, an even count of negatives; an
odd count flips the least important weight, whose |x| then counts as negative). Each run's scale is searched
over trial inverse scales (2 kmax - 1 + step * is) / base, is in -trials..trials, base the run's max |x| (or
kmax times make_qp_quants' scale, IQ2_XXS): every group's levels are rounded, looked up in the codebook, and
a group not in it takes its best neighbour by weighted error among the codebook points at the nwant nearest
squared distances from the rounded point (the lists ``iq3xs_init_impl`` / ``iq2xs_init_impl`` build, derived
here from gguf-py's grids: no pasted tables); the scale is refitted by weighted least squares and the best
fit kept. Groups off the codebook (IQ2_XXS: every group) are then re-rounded once more at the final scale.

Arrays are [n, S] with a run's elements on axis 0; a run's groups are [n / dim, dim, S] views of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from gguf import GGMLQuantizationType as QT

from quantkit.formats.gguf.ggml_float import F32, dot, nearest_int
from quantkit.formats.gguf.weighted_search import make_qp

FLT_MAX = np.finfo(F32).max


class CodebookOverflowError(ValueError):
    """Weights so large (|x| ~ 1e10 and up) that every candidate's float32 error overflows: libggml aborts
    there (``GGML_ASSERT(grid_index >= 0)``), quantkit raises this."""


@dataclass(frozen=True)
class Codebook:
    """One i-quant's search parameters and its codebook tables (``iq3xs_init_impl`` / ``iq2xs_init_impl``)."""

    qtype: QT
    kmax: int  # levels per coordinate the rounding reaches (kMaxQ)
    step: float  # trial inverse scales (2 kmax - 1 + step * is) / base
    trials: int  # is in -trials..trials
    eps: float  # a run whose max |x| is below this is all zeros (0: exactly 0)
    fudge: float  # stored d = max_scale / 31 * fudge
    parity: bool  # 7 sign bits per 8 weights, even count of negatives
    on_grid_init: bool  # C's is_on_grid before the first trial that improves
    resnap_all: bool  # re-round every group at the final scale (else only those off the codebook)
    resnap_always: bool  # ... even when every group was on it (IQ2_XXS)
    qp_start: bool  # base = kmax * make_qp_quants(kmax + 1) scale rather than max |x| (IQ2_XXS)
    shifts: np.ndarray  # int64 [dim]: a point's key is sum l_i << shifts_i
    levels: np.ndarray  # int64 [G, dim]: the points' levels l (coordinates 2l + 1)
    index: np.ndarray  # int64 [keys]: key -> point index, -1 off the codebook
    count: np.ndarray  # int64 [keys]: how many candidate points a key off the codebook has (0 on it)
    row: np.ndarray  # int64 [keys]: the key's row in ``lists[count]``
    lists: dict[int, np.ndarray]  # n -> int64 [keys with n candidates, n]: the points in C's order
    coords: dict[int, np.ndarray]  # n -> float32 [dim, keys with n candidates, n]: their coordinates 2l + 1

    @property
    def dim(self) -> int:
        return self.levels.shape[1]


def coarser(cb: Codebook, stride: int) -> Codebook:
    """``cb`` trying every ``stride``-th trial scale over the same range (``trials`` a multiple of ``stride``):
    what GPTQ's codebook grids use, where only the run scales are kept (``codebook_grid``)."""
    if stride == 1:
        return cb
    if cb.trials % stride:
        raise ValueError(f"{cb.qtype.name}: {cb.trials} trials are not a multiple of {stride}")
    return replace(cb, trials=cb.trials // stride, step=cb.step * stride)


def grid_levels(cls: type) -> np.ndarray:
    """gguf-py's dequantization grid of an i-quant as level indices l [G, dim] (its values are levels' values)."""
    cls.init_grid()
    dim = cls.grid_shape[1]
    return np.searchsorted(np.array(cls.grid_map, dtype=F32), cls.grid.reshape(-1, dim)).astype(np.int64)


def build_tables(levels: np.ndarray, nwant: int, bits: int, kmax: int) -> dict:
    """The init functions' tables: key -> point index (-1 off the codebook); and for keys off it whose levels
    are all below kmax (the ones rounding reaches), the points at the nwant nearest squared distances, sorted
    by (distance, index) as C's qsort, grouped by their number n: each key's n and row in the [keys, n] table
    of its n; and those points' coordinates."""
    dim = levels.shape[1]
    shifts = bits * np.arange(dim)
    index = np.full(1 << (bits * dim), -1, dtype=np.int64)
    index[(levels << shifts).sum(1)] = np.arange(len(levels))
    lv = np.stack(np.meshgrid(*[np.arange(kmax)] * dim, indexing="ij"), -1).reshape(-1, dim)[:, ::-1]
    keys = (lv << shifts).sum(1)  # every reachable key
    off = index[keys] < 0
    keys, lv = keys[off], lv[off]
    d2 = np.zeros((len(keys), len(levels)), dtype=np.int32)  # [K, G]
    for i in range(dim):
        d2 += ((2 * levels[None, :, i] - 2 * lv[:, None, i]) ** 2).astype(np.int32)
    order = np.argsort(d2, axis=1, kind="stable")  # ties by index, as qsort on (d2, index)
    s = np.take_along_axis(d2, order, axis=1)
    rank = np.concatenate([np.zeros((len(keys), 1), np.int64), np.cumsum(s[:, 1:] != s[:, :-1], axis=1)], axis=1)
    n_of = (rank < nwant).sum(1)
    count = np.zeros_like(index)
    row = np.zeros_like(index)
    count[keys] = n_of
    lists = {}
    for n in np.unique(n_of).tolist():
        with_n = np.flatnonzero(n_of == n)
        row[keys[with_n]] = np.arange(with_n.size)
        lists[n] = order[with_n, :n]
    odd = (2 * levels + 1).astype(F32)  # [G, dim]
    coords = {n: np.ascontiguousarray(odd[c].transpose(2, 0, 1)) for n, c in lists.items()}
    return dict(shifts=shifts, levels=levels, index=index, count=count, row=row, lists=lists, coords=coords)


# ------------------------------------------------------------------------------------------ one run


def signs(x: np.ndarray, w: np.ndarray, parity: bool) -> tuple[np.ndarray, np.ndarray]:
    """xval = |x| [n, S] (with the parity flip: the first weight of least w*x*x in an 8-group with an odd count
    of negatives is negated) and the sign bytes [n/8, S] (bit i: element i of the 8-group)."""
    neg = ~(x >= 0)
    xval = np.where(neg, -x, x)
    neg8 = neg.reshape(-1, 8, x.shape[1])
    if parity:
        odd = neg8.sum(1) % 2 == 1  # [n/8, S]
        imin = np.argmin(((w * x) * x).reshape(neg8.shape), axis=1)  # first minimum
        flip = odd[:, None, :] & (np.arange(8)[None, :, None] == imin[:, None, :])  # [n/8, 8, S]
        xval = np.where(flip.reshape(x.shape), -xval, xval)
        neg8 = neg8 ^ flip
    bits = (neg8.astype(np.int64) << np.arange(8)[None, :, None]).sum(1)
    return xval, (bits & 127 if parity else bits)


def best_neighbours(cb: Codebook, key: np.ndarray, xv: np.ndarray, wv: np.ndarray, scale: np.ndarray):
    """``iq*_find_best_neighbour`` for M groups off the codebook: keys [M], |x| and sqrt(w) [dim, M], scale [M]
    -> the candidate of least sum over i of (wv * diff) * diff, diff = scale * q - xv, summed in C's order
    [M]; argmin's first of the least is C's strict '<'. Groups are taken by their number of candidates n,
    each such batch dense, coordinate-major: [dim, Mn, n] (4x fewer strided passes than [Mn, n, dim]:
    measured 1.6x faster)."""
    cnt = cb.count[key]
    order = np.argsort(cnt.astype(np.int16), kind="stable")  # counts <= 2048: numpy's radix sort, 15x faster
    cnt = cnt[order]
    cuts = [0, *(np.flatnonzero(cnt[1:] != cnt[:-1]) + 1).tolist(), cnt.size]
    best = np.empty(key.size, dtype=np.int64)
    for a, b in zip(cuts[:-1], cuts[1:], strict=False):
        idx = order[a:b]
        n = int(cnt[a])
        rows = cb.row[key[idx]]  # [Mn]
        diff = cb.coords[n][:, rows]  # [dim, Mn, n]
        diff *= scale[idx][:, None]
        diff -= xv[:, idx][:, :, None]
        err = wv[:, idx][:, :, None] * diff
        err *= diff
        d2 = err[0]
        for i in range(1, cb.dim):
            d2 = d2 + err[i]  # [Mn, n]
        pick = d2.argmin(axis=1)
        if not (d2[np.arange(pick.size), pick] < FLT_MAX).all():  # inf, or NaN that C's '<' would skip
            raise CodebookOverflowError(f"weights too large for {cb.qtype.name}: the codebook search overflows")
        best[idx] = cb.lists[n][rows, pick]
    return best


def _by_group(cb: Codebook, a: np.ndarray) -> np.ndarray:
    """[n, S] -> [dim, g S]: coordinate i of group k of run s at [i, g s + k], g = n / dim (a copy)."""
    return a.reshape(-1, cb.dim, a.shape[1]).transpose(1, 2, 0).reshape(cb.dim, -1)


def _keys(cb: Codebook, lv: np.ndarray) -> np.ndarray:
    """Levels [n, S] -> the groups' keys [n / dim, S]."""
    return (lv.reshape(-1, cb.dim, lv.shape[1]) << cb.shifts[None, :, None]).sum(1)


def _snap(cb: Codebook, xval: np.ndarray, xt: np.ndarray, wt: np.ndarray, iscale: np.ndarray, scale: np.ndarray):
    """Levels [n, S] of xval at inverse scale ``iscale`` [S], each group on the codebook: rounded, or its best
    neighbour at ``scale`` [S]; and which groups were on the codebook as rounded [n / dim, S]. xt, wt: |x| and
    sqrt(w) by group (``_by_group``)."""
    f = np.multiply(iscale, xval, dtype=F32)
    f -= F32(1)
    f *= F32(0.5)
    lv = nearest_int(f, 0, cb.kmax - 1).astype(np.int64)  # [n, S]
    g = lv.reshape(-1, cb.dim, lv.shape[1])
    key = _keys(cb, lv)  # [n / dim, S]
    on = cb.index[key] >= 0
    k, s = np.nonzero(~on)
    if k.size:
        col = s * key.shape[0] + k
        best = best_neighbours(cb, key[k, s], xt[:, col], wt[:, col], scale[s])
        g[k, :, s] = cb.levels[best]
    return lv, on


def _fit(w: np.ndarray, xval: np.ndarray, lv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum w*x*q and sum w*q*q per run, q = 2l + 1."""
    q = (2 * lv + 1).astype(F32)
    return dot(w, xval, q), dot(w, q, q)


def search_runs(cb: Codebook, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs x [n, S] with weights w [n, S] -> scale [S] (0 for all-zero runs), levels [n, S], sign bytes
    [n/8, S], and which runs are all zeros [S]."""
    with np.errstate(over="ignore"):  # huge weights: inf squares, as in C (the search then refuses them)
        waux = np.sqrt(w)
        xval, sbytes = signs(x, w, cb.parity)
    xt, wt = _by_group(cb, xval), _by_group(cb, waux)
    mx = xval.max(axis=0)
    zero = (mx < F32(cb.eps)) if cb.eps else ~(mx != 0)
    top = F32(2 * cb.kmax - 1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if cb.qp_start:
            scale = make_qp(xval, w, cb.kmax + 1)[0]
            base = scale * F32(cb.kmax)  # eff_max
            zero |= ~(base > 0)
        else:
            base = mx
            scale = mx / top
        base = np.where(zero, F32(1), base)
        best = np.zeros_like(base)
        lv = np.zeros(x.shape, dtype=np.int64)
        on = np.full((x.shape[0] // cb.dim, x.shape[1]), cb.on_grid_init)
        for i in range(-cb.trials, cb.trials + 1):
            iscale = (top + F32(i) * F32(cb.step)) / base
            aux, aux_on = _snap(cb, xval, xt, wt, iscale, F32(1) / iscale)
            sumqx, sumq2 = _fit(w, xval, aux)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            np.copyto(scale, sumqx / sumq2, where=better)
            np.copyto(best, scale * sumqx, where=better)
            np.copyto(lv, aux, where=better)
            np.copyto(on, aux_on, where=better)
        redo = ((~on).any(axis=0) | cb.resnap_always) & (scale > 0) & ~zero
        if redo.any():
            cols = np.flatnonzero(redo)
            sub = scale[cols]
            xc = xval[:, cols]
            again, _ = _snap(cb, xc, _by_group(cb, xc), _by_group(cb, waux[:, cols]), F32(1) / sub, sub)
            if not cb.resnap_all:  # keep the groups that were on the codebook
                keep = np.repeat(on[:, cols], cb.dim, axis=0)
                again = np.where(keep, lv[:, cols], again)
            lv[:, cols] = again
            sumqx, sumq2 = _fit(w[:, cols], xval[:, cols], again)
            scale[cols] = np.where(sumq2 > 0, sumqx / sumq2, sub)
    flip = scale < 0  # "should never happen" (C): a positive scale, every sign flipped
    scale = np.where(zero, F32(0), np.where(flip, -scale, scale))
    sbytes = np.where(flip, ~sbytes & (127 if cb.parity else 255), sbytes)
    return scale, lv, sbytes, zero


def points(cb: Codebook, lv: np.ndarray) -> np.ndarray:
    """Levels [n, S] -> codebook point indices [n / dim, S] (each group is on the codebook by now)."""
    idx = cb.index[_keys(cb, lv)]
    if (idx < 0).any():
        raise AssertionError("a group off the codebook")  # C aborts here too ("Oops: found point")
    return idx


def super_scales(cb: Codebook, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run scales [B, R] -> fp16 d [B], 4-bit run scales [B, R], and which super-blocks are all zeros [B]."""
    top = scale.max(axis=1)
    empty = ~(top != 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # 1 / subnormal d: inf, as in C
        d = top / F32(31)
        dh = np.where(empty, F32(0), d * F32(cb.fudge)).astype(np.float16)
        f = np.multiply((F32(1) / d)[:, None], scale, dtype=F32)
        f -= F32(1)
        f *= F32(0.5)
        sc = nearest_int(f, 0, 15).astype(np.int64)
    return dh, np.where(empty[:, None], 0, sc), empty
