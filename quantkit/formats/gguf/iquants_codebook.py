"""The codebook i-quants IQ3_XXS and IQ3_S in numpy, byte for byte what llama-quantize writes without an
importance matrix: libggml's ``quantize_iq3_xxs`` / ``quantize_iq3_s`` (``quantize_row_iq3_xxs_impl`` /
``quantize_row_iq3_s_impl`` with weights x^2).

A super-block of 256 is eight 32-runs; a run stores |x| as eight 4-weight points of a codebook (256 points for
IQ3_XXS, 512 for IQ3_S) whose coordinates are odd levels 2l + 1, l in 0..7, times the run's scale, and the
signs apart: IQ3_S one bit per weight, IQ3_XXS 7 bits per 8 weights with an even count of negatives (an odd
count flips the least important weight, whose |x| then counts as negative). Each run's scale is searched
over trial inverse scales (15 + 0.2 is) / max (is in -15..15 for IQ3_XXS, -9..9 for IQ3_S): every 4-group's
levels are rounded, looked up in the codebook, and a group not in it takes its best neighbour (the
codebook points at the nearest two (IQ3_XXS) or three (IQ3_S) distances from the rounded point, as
``iq3xs_init_impl`` lists them) by weighted error; the scale is refitted by weighted least squares and the
best fit kept. Groups left off the codebook are re-rounded once more at the final scale. The run scales
are then stored as 4-bit l with scale = d (2l + 1), d = max_scale / 31 times a fudge factor (1.0125 / 1.033).

Arrays are [32, S] with a run's elements on axis 0 (``quantkit.formats.gguf.ggml_float``'s float32 C order);
a run's eight groups are [8, 4, S] views of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from quantkit.formats.gguf.ggml_float import F32, Scratch, columns, dot, nearest_int
from quantkit.formats.gguf.iquants import importance_weights
from quantkit.formats.gguf.layouts import pack_iq3_s, pack_iq3_xxs

KMAX = 8  # levels per coordinate
FLT_MAX = np.finfo(F32).max


class CodebookOverflowError(ValueError):
    """Weights so large (|x| ~ 1e10 and up) that every candidate's float32 error overflows: libggml aborts
    there (``GGML_ASSERT(grid_index >= 0)``), quantkit raises this."""


_SHIFTS = np.array([0, 3, 6, 9])  # a point's key: l0 | l1 << 3 | l2 << 6 | l3 << 9, 4096 keys


@dataclass(frozen=True)
class Codebook:
    """One i-quant's search parameters and its codebook tables (``iq3xs_init_impl``)."""

    qtype: QT
    trials: int  # inverse scales (15 + 0.2 is) / max for is in -trials..trials
    eps: float  # a run whose max |x| is below this is all zeros (IQ3_S: exactly 0)
    fudge: float  # stored d = max_scale / 31 * fudge
    parity: bool  # IQ3_XXS: 7 sign bits per 8 weights, even count of negatives
    on_grid_init: bool  # C's is_on_grid before the first trial that improves
    resnap_all: bool  # IQ3_S re-rounds every group at the final scale, IQ3_XXS the off-codebook ones
    levels: np.ndarray  # int64 [G, 4]: the points' levels l (coordinates 2l + 1)
    index: np.ndarray  # int64 [4096]: key -> point index, -1 off the codebook
    count: np.ndarray  # int64 [4096]: how many candidate points a key off the codebook has (0 on it)
    row: np.ndarray  # int64 [4096]: the key's row in ``lists[count]``
    lists: dict[int, np.ndarray]  # n -> int64 [keys with n candidates, n]: the points in C's order
    coords: dict[int, np.ndarray]  # n -> float32 [4, keys with n candidates, n]: their coordinates 2l + 1


def _codebook_levels(cls: type) -> np.ndarray:
    """gguf-py's dequantization grid of an i-quant as level indices l [G, 4] (its values are levels' values)."""
    cls.init_grid()
    return np.searchsorted(np.array(cls.grid_map, dtype=F32), cls.grid.reshape(-1, 4)).astype(np.int64)


def _neighbours(levels: np.ndarray, nwant: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """iq3xs_init_impl's tables: key -> point index (-1 off the codebook); and for keys off it, the points at
    the nwant nearest squared distances, sorted by (distance, index), grouped by their number n (1-38): each
    key's n and row in the [keys, n] table of its n."""
    index = np.full(4096, -1, dtype=np.int64)
    index[(levels << _SHIFTS).sum(1)] = np.arange(len(levels))
    keys = np.arange(4096)
    pos = 2 * ((keys[:, None] >> _SHIFTS) & 7) + 1  # [4096, 4]
    d2 = (((2 * levels + 1)[None] - pos[:, None]) ** 2).sum(-1)  # [4096, G]
    order = np.argsort(d2, axis=1, kind="stable")  # ties by index, as qsort on (d2, index)
    s = np.take_along_axis(d2, order, axis=1)
    rank = np.concatenate([np.zeros((4096, 1), np.int64), np.cumsum(s[:, 1:] != s[:, :-1], axis=1)], axis=1)
    keep = (rank < nwant) & (index < 0)[:, None]
    count = keep.sum(1)
    row = np.zeros(4096, dtype=np.int64)
    lists = {}
    for n in np.unique(count[count > 0]).tolist():
        with_n = np.flatnonzero(count == n)
        row[with_n] = np.arange(with_n.size)
        lists[n] = order[with_n, :n]
    return index, count, row, lists


@cache
def codebook(qtype: QT) -> Codebook:
    if qtype not in (QT.IQ3_XXS, QT.IQ3_S):
        raise ValueError(f"no codebook for {qtype.name}")
    xxs = qtype == QT.IQ3_XXS
    levels = _codebook_levels(gq.IQ3_XXS if xxs else gq.IQ3_S)
    index, count, row, lists = _neighbours(levels, 2 if xxs else 3)
    odd = (2 * levels + 1).astype(F32)  # [G, 4]
    coords = {n: np.ascontiguousarray(odd[c].transpose(2, 0, 1)) for n, c in lists.items()}
    params = (15, 1e-8, 1.0125, True, True, False) if xxs else (9, 0.0, 1.033, False, False, True)
    return Codebook(qtype, *params, levels, index, count, row, lists, coords)


# ------------------------------------------------------------------------------------------ one run


def _signs(x: np.ndarray, w: np.ndarray, parity: bool) -> tuple[np.ndarray, np.ndarray]:
    """xval = |x| [32, S] (with IQ3_XXS's parity flip: the first weight of least w*x*x in an 8-group with an
    odd count of negatives is negated) and the sign bytes [4, S] (bit i: element i of the 8-group)."""
    neg = ~(x >= 0)
    xval = np.where(neg, -x, x)
    neg8 = neg.reshape(4, 8, -1)
    if parity:
        odd = neg8.sum(1) % 2 == 1  # [4, S]
        imin = np.argmin(((w * x) * x).reshape(4, 8, -1), axis=1)  # first minimum
        flip = odd[:, None, :] & (np.arange(8)[None, :, None] == imin[:, None, :])  # [4, 8, S]
        xval = np.where(flip.reshape(32, -1), -xval, xval)
        neg8 = neg8 ^ flip
    bits = (neg8.astype(np.int64) << np.arange(8)[None, :, None]).sum(1)
    return xval, (bits & 127 if parity else bits)


def _best_neighbours(cb: Codebook, key: np.ndarray, xv: np.ndarray, wv: np.ndarray, scale: np.ndarray):
    """``iq3_find_best_neighbour`` for M groups off the codebook: keys [M], |x| and sqrt(w) [4, M], scale [M]
    -> the candidate of least sum over i of (wv * diff) * diff, diff = scale * q - xv, summed in C's order
    [M]; argmin's first of the least is C's strict '<'. Groups are taken by their number of candidates n,
    each such batch dense, coordinate-major: [4, Mn, n] (4x fewer strided passes than [Mn, n, 4]: measured
    1.6x faster)."""
    cnt = cb.count[key]
    order = np.argsort(cnt, kind="stable")
    cnt = cnt[order]
    cuts = [0, *(np.flatnonzero(cnt[1:] != cnt[:-1]) + 1).tolist(), cnt.size]
    best = np.empty(key.size, dtype=np.int64)
    for a, b in zip(cuts[:-1], cuts[1:], strict=False):
        idx = order[a:b]
        n = int(cnt[a])
        rows = cb.row[key[idx]]  # [Mn]
        diff = cb.coords[n][:, rows]  # [4, Mn, n]
        diff *= scale[idx][:, None]
        diff -= xv[:, idx][:, :, None]
        err = wv[:, idx][:, :, None] * diff
        err *= diff
        d2 = ((err[0] + err[1]) + err[2]) + err[3]  # [Mn, n]
        pick = d2.argmin(axis=1)
        if not (d2[np.arange(pick.size), pick] < FLT_MAX).all():  # inf, or NaN that C's '<' would skip
            raise CodebookOverflowError(f"weights too large for {cb.qtype.name}: the codebook search overflows")
        best[idx] = cb.lists[n][rows, pick]
    return best


def _by_group(a: np.ndarray) -> np.ndarray:
    """[32, S] -> [4, 8 S]: coordinate i of group k of run s at [i, 8 s + k] (a copy)."""
    return a.reshape(8, 4, -1).transpose(1, 2, 0).reshape(4, -1)


def _snap(cb: Codebook, xval: np.ndarray, xt: np.ndarray, wt: np.ndarray, iscale: np.ndarray, scale: np.ndarray):
    """Levels [32, S] of xval at inverse scale ``iscale`` [S], each 4-group on the codebook: rounded, or its
    best neighbour at ``scale`` [S]; and which groups were on the codebook as rounded [8, S]. xt, wt: |x| and
    sqrt(w) as [4, 8 S] (coordinate, group k + 8 s)."""
    f = np.multiply(iscale, xval, dtype=F32)
    f -= F32(1)
    f *= F32(0.5)
    lv = nearest_int(f, 0, KMAX - 1).astype(np.int64)  # [32, S]
    g = lv.reshape(8, 4, -1)
    key = (g << _SHIFTS[None, :, None]).sum(1)  # [8, S]
    on = cb.index[key] >= 0
    k, s = np.nonzero(~on)
    if k.size:
        col = s * 8 + k
        best = _best_neighbours(cb, key[k, s], xt[:, col], wt[:, col], scale[s])
        g[k, :, s] = cb.levels[best]
    return lv, on


def _fit(w: np.ndarray, xval: np.ndarray, lv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum w*x*q and sum w*q*q per run, q = 2l + 1."""
    q = (2 * lv + 1).astype(F32)
    return dot(w, xval, q), dot(w, q, q)


def search_runs(
    cb: Codebook, x: np.ndarray, w: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs x [32, S] (weights w [32, S], None: x^2) -> scale [S] (0 for all-zero runs), levels [32, S], sign
    bytes [4, S], and which runs are all zeros [S]."""
    with np.errstate(over="ignore"):  # huge weights: inf squares, as in C (the search then refuses them)
        w = np.multiply(x, x) if w is None else w
        waux = np.sqrt(w)
        xval, signs = _signs(x, w, cb.parity)
    xt, wt = _by_group(xval), _by_group(waux)
    mx = xval.max(axis=0)
    zero = (mx < F32(cb.eps)) if cb.eps else ~(mx != 0)
    mx = np.where(zero, F32(1), mx)
    best = np.zeros_like(mx)
    scale = mx / F32(2 * KMAX - 1)
    lv = np.zeros(x.shape, dtype=np.int64)
    on = np.full((8, x.shape[1]), cb.on_grid_init)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i in range(-cb.trials, cb.trials + 1):
            iscale = (F32(2 * KMAX - 1) + F32(i) * F32(0.2)) / mx
            aux, aux_on = _snap(cb, xval, xt, wt, iscale, F32(1) / iscale)
            sumqx, sumq2 = _fit(w, xval, aux)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            np.copyto(scale, sumqx / sumq2, where=better)
            np.copyto(best, scale * sumqx, where=better)
            np.copyto(lv, aux, where=better)
            np.copyto(on, aux_on, where=better)
        redo = (~on).any(axis=0) & (scale > 0)
        if redo.any():
            cols = np.flatnonzero(redo)
            sub = scale[cols]
            xc = xval[:, cols]
            again, _ = _snap(cb, xc, _by_group(xc), _by_group(waux[:, cols]), F32(1) / sub, sub)
            if not cb.resnap_all:  # IQ3_XXS keeps the groups that were on the codebook
                keep = np.repeat(on[:, cols], 4, axis=0)
                again = np.where(keep, lv[:, cols], again)
            lv[:, cols] = again
            sumqx, sumq2 = _fit(w[:, cols], xval[:, cols], again)
            scale[cols] = np.where(sumq2 > 0, sumqx / sumq2, sub)
    scale = np.where(zero, F32(0), scale)
    return scale, lv, signs, zero


def _points(cb: Codebook, lv: np.ndarray) -> np.ndarray:
    """Levels [32, S] -> codebook point indices [8, S] (each 4-group is on the codebook by now)."""
    idx = cb.index[(lv.reshape(8, 4, -1) << _SHIFTS[None, :, None]).sum(1)]
    if (idx < 0).any():
        raise AssertionError("a 4-group off the codebook")  # C aborts here too ("Oops: found point")
    return idx


def _super_scales(cb: Codebook, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run scales [B, 8] -> fp16 d [B], 4-bit run scales [B, 8], and which super-blocks are all zeros [B]."""
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


def quantize_codebook(x: np.ndarray, qtype: QT, ws: Scratch | None = None, qw: np.ndarray | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 98] IQ3_XXS or [B, 110] IQ3_S blocks. ``qw`` [B, 256]: an
    importance (llama-quantize --imatrix): weights qw * sqrt(sigma2 + x^2), sigma2 = 2 sum(x^2) / 256 per
    super-block, as for IQ4_XS."""
    cb = codebook(qtype)
    ws = ws or Scratch()
    B = x.shape[0]
    w = None if qw is None else importance_weights(x, qw, ws)
    scale, lv, signs, zero = search_runs(cb, columns(x, 32, ws), w)
    points = _points(cb, lv)  # [8, 8B]
    dh, sc, empty = _super_scales(cb, scale.reshape(B, 8))
    points = points.T.reshape(B, 8, 8)  # [B, run, group]
    signs = signs.T.reshape(B, 8, 4)  # [B, run, byte]
    zero = zero.reshape(B, 8)
    if qtype == QT.IQ3_XXS:  # all-zero runs store point 0 and no signs; an all-zero super-block stores nothing
        blank = zero | empty[:, None]
        return pack_iq3_xxs(dh, np.where(blank[..., None], 0, points), np.where(blank[..., None], 0, signs), sc)
    return pack_iq3_s(dh, points, signs, sc, ~zero)


def quantize_iq3_xxs(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    return quantize_codebook(x, QT.IQ3_XXS, ws)


def quantize_iq3_s(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    return quantize_codebook(x, QT.IQ3_S, ws)
