"""IQ1_S in numpy, byte for byte what llama-quantize --imatrix writes: libggml's ``quantize_iq1_s``
(``quantize_row_iq1_s_impl``), which needs an importance vector (libggml asserts on its absence, and
llama-quantize refuses the file type without an imatrix).

A super-block of 256 is eight 32-runs; a run stores x as four 8-weight points of a 2048-point codebook whose
coordinates are -1, 0, 1, all shifted by +-delta (delta = 1/8, one sign per run), times the run's scale. The
weights are qw * sqrt(sigma2 + x^2), sigma2 = 2 sum(x^2) / 256 per super-block. Each run is solved exactly
over the three levels: the weights sorted by x (C's qsort, stable here), every split (i1 <= i2) of the sorted
run into levels 0 / 1 / 2 and both shifts scored by weighted least squares, in C's order (the first of the
best wins, ties and float32 rounding as C's). Its 8-groups are then looked up in the codebook; a group off it
takes the best of its neighbours (the codebook points at the 3 nearest distances, ``iq2xs_init_impl``'s lists,
built by ``codebook_search``) by weighted error, and the run's scale is refitted on the points. The run scales
are stored as 3-bit l with scale = d (2l + 1), d = max_scale / 15, fp16 d * 1.125.

Arrays are [32, S] with a run's elements on axis 0 (``quantkit.formats.gguf.ggml_float``'s float32 C order).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from gguf import quants as gq

from quantkit.formats.gguf.codebook_search import CodebookOverflowError, build_tables, grid_levels
from quantkit.formats.gguf.ggml_float import F32, Scratch, columns, dot, nearest_int
from quantkit.formats.gguf.iquants import importance_weights
from quantkit.formats.gguf.layouts import pack_iq1_s

DELTA = F32(0.125)  # IQ1S_DELTA
SHIFTED = {1: np.array([-1, 0, 1], F32) + DELTA, -1: np.array([-1, 0, 1], F32) - DELTA}  # C's x_p, x_m
EPS = F32(1e-12)  # GROUP_MAX_EPS_IQ1_S
FLT_MAX = np.finfo(F32).max
RUNS_PER_PASS = 2048  # runs scored together: the split tables are [561, runs] per shift


@cache
def tables() -> dict:
    """The IQ1_S codebook (levels 0..2 of 8 coordinates) and iq2xs_init_impl's neighbour lists (nwant 3)."""
    return build_tables(grid_levels(gq.IQ1_S), nwant=3, bits=2, kmax=3)


@cache
def _pairs() -> tuple[np.ndarray, np.ndarray]:
    """Every split (i1, i2), 0 <= i1 <= i2 <= 32, in C's loop order."""
    i1, i2 = np.triu_indices(33)
    return i1, i2


def _split_sums(sx: np.ndarray, sw: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum q x w and sum q^2 w of every split [P, S], from the prefix sums sx, sw [33, S] and the levels xs."""
    i1, i2 = _pairs()
    a, b, c = sx[i1] - sx[0], sx[i2] - sx[i1], sx[32] - sx[i2]
    wa, wb, wc = sw[i1] - sw[0], sw[i2] - sw[i1], sw[32] - sw[i2]
    qx = (a * xs[0] + b * xs[1]) + c * xs[2]
    q2 = ((wa * xs[0]) * xs[0] + (wb * xs[1]) * xs[1]) + (wc * xs[2]) * xs[2]
    return qx, q2


def _best_split(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """C's exhaustive search over splits and shifts for runs x, w [32, S] -> scale [S] (signed, as found),
    i1, i2 [S] (-1: no candidate), shift [S] (+-1), and each element's rank in the sorted run [32, S]."""
    order = np.argsort(x, axis=0, kind="stable")  # glibc's qsort of 32 pairs is a merge sort: stable
    xo, wo = np.take_along_axis(x, order, 0), np.take_along_axis(w, order, 0)
    S = x.shape[1]
    sx, sw = np.zeros((33, S), F32), np.zeros((33, S), F32)
    np.cumsum(wo * xo, axis=0, out=sx[1:])  # C's running sums, in sorted order
    np.cumsum(wo, axis=0, out=sw[1:])
    cand = {s: _split_sums(sx, sw, SHIFTED[s]) for s in (1, -1)}
    i1s, i2s = _pairs()
    best, scale = np.full(S, -FLT_MAX, F32), np.abs(x).max(axis=0)
    bi1, bi2, shift = np.full(S, -1), np.full(S, -1), np.zeros(S, np.int64)
    for k in range(i1s.size):
        for s in (1, -1):
            qx, q2 = cand[s][0][k], cand[s][1][k]
            upd = (q2 > 0) & (qx * qx > best * q2)
            if upd.any():
                sc = qx / q2
                np.copyto(scale, sc, where=upd)
                np.copyto(best, sc * qx, where=upd)
                bi1[upd], bi2[upd], shift[upd] = i1s[k], i2s[k], s
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(32)[:, None], 0)
    return scale, bi1, bi2, shift, rank


def _neighbours(key: np.ndarray, x: np.ndarray, w: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``iq1_find_best_neighbour2`` for M groups off the codebook: keys [M], x and w [8, M], scale, shift [M]
    -> the candidate point of least sum over i of (w * diff) * diff, diff = scale * q - x, q the shifted
    level of its coordinate i (the first of the least: C's strict '<')."""
    t = tables()
    best = np.empty(key.size, dtype=np.int64)
    cnt = t["count"][key]
    for n in np.unique(cnt).tolist():
        idx = np.flatnonzero(cnt == n)
        cands = t["lists"][n][t["row"][key[idx]]]  # [Mn, n]
        lv = t["levels"][cands].transpose(2, 0, 1)  # [8, Mn, n]
        q = np.where(shift[idx][:, None] == 1, SHIFTED[1][lv], SHIFTED[-1][lv])
        d2 = np.zeros(cands.shape, F32)
        for i in range(8):
            diff = scale[idx][:, None] * q[i] - x[i, idx][:, None]
            d2 += (w[i, idx][:, None] * diff) * diff
        pick = d2.argmin(axis=1)
        if not (d2[np.arange(pick.size), pick] < FLT_MAX).all():
            raise CodebookOverflowError("weights too large for IQ1_S: the codebook search overflows")
        best[idx] = cands[np.arange(pick.size), pick]
    return best


def _runs(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs x, w [32, S] -> scale [S] (0 for runs left empty), codebook points [4, S], shift [S]."""
    S = x.shape[1]
    scale, i1, i2, shift, rank = _best_split(x, w)
    empty = (i1 < 0) | ~(np.abs(x).max(axis=0) >= EPS)
    lv = (rank >= i1).astype(np.int64) + (rank >= i2)  # [32, S]
    neg = scale < 0
    lv = np.where(neg, 2 - lv, lv)
    scale, shift = np.where(neg, -scale, scale), np.where(neg, -shift, shift)
    t = tables()
    key = (lv.reshape(4, 8, S) << (2 * np.arange(8))[None, :, None]).sum(1)  # [4, S]
    pts = t["index"][key]
    off = (pts < 0) & ~empty
    g, s = np.nonzero(off)
    if g.size:
        xg, wg = x.reshape(4, 8, S)[g, :, s].T, w.reshape(4, 8, S)[g, :, s].T  # [8, M]
        pts[g, s] = _neighbours(key[g, s], xg, wg, scale[s], shift[s])
        refit = np.unique(s)
        q = t["levels"][pts[:, refit]].transpose(0, 2, 1).reshape(32, -1)  # [32, R]: levels by element
        q = np.where(shift[refit] == 1, SHIFTED[1][q], SHIFTED[-1][q])
        wr = np.ascontiguousarray(w[:, refit])
        sqx, sq2 = dot(wr, q, np.ascontiguousarray(x[:, refit])), dot(wr, q, q)
        ok = (sqx > 0) & (sq2 > 0)
        scale[refit] = np.where(ok, sqx / np.where(ok, sq2, F32(1)), scale[refit])
    scale = np.where(empty, F32(0), scale).astype(F32)
    return scale, np.where(empty, 0, pts), np.where(empty, 1, shift)


def quantize_iq1_s(x: np.ndarray, qw: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """Super-blocks x float32 [B, 256] with importance qw [B, 256] -> IQ1_S blocks uint8 [B, 50]."""
    ws = ws or Scratch()
    B = x.shape[0]
    w = np.array(importance_weights(x, qw, ws))  # [32, 8B]
    xs = np.array(columns(x, 32, ws))
    scale, pts, shift = np.empty(8 * B, F32), np.empty((4, 8 * B), np.int64), np.empty(8 * B, np.int64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for a in range(0, 8 * B, RUNS_PER_PASS):
            b = a + RUNS_PER_PASS
            scale[a:b], pts[:, a:b], shift[a:b] = _runs(xs[:, a:b], w[:, a:b])
        top = scale.reshape(B, 8).max(axis=1)
        empty = ~(top != 0)
        d = top / F32(15)
        dh = np.where(empty, F32(0), d * F32(1.125)).astype(np.float16)
        f = np.multiply((F32(1) / d)[:, None], scale.reshape(B, 8), dtype=F32)
        f -= F32(1)
        f *= F32(0.5)
        sc = np.where(empty[:, None], 0, nearest_int(f, 0, 7).astype(np.int64))
    minus = np.where(empty[:, None], False, shift.reshape(B, 8) == -1)
    return pack_iq1_s(dh, pts.T.reshape(B, 8, 4), sc, minus)


def refuse_without_importance(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """IQ1_S without an importance vector: libggml's quantize_iq1_s aborts the process; quantkit raises."""
    raise ValueError("IQ1_S needs an importance matrix (libggml's quantize_iq1_s asserts one)")
