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
from quantkit.formats.gguf.layouts import pack_iq1_m, pack_iq1_s

DELTA = F32(0.125)  # IQ1S_DELTA = IQ1M_DELTA
SHIFTED = {False: np.array([-1, 0, 1], F32) + DELTA, True: np.array([-1, 0, 1], F32) - DELTA}  # x_p, x_m
EPS = F32(1e-12)  # GROUP_MAX_EPS_IQ1_S (and _M)
FLT_MAX = np.finfo(F32).max
RUNS_PER_PASS = 2048  # runs scored together: the split tables are [splits, runs] per shift
# IQ1_M's shift pairs (group 0, group 1) in C's order k = 0..3: +,+ / +,- / -,+ / -,-
M_MINUS = np.array([[False, False], [False, True], [True, False], [True, True]])


@cache
def tables() -> dict:
    """The IQ1_S / IQ1_M codebook (levels 0..2 of 8 coordinates) and iq2xs_init_impl's neighbour lists."""
    return build_tables(grid_levels(gq.IQ1_S), nwant=3, bits=2, kmax=3)


def _sorted_sums(x: np.ndarray, w: np.ndarray, parts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs x, w [n, S] sorted by x (glibc's qsort of n pairs is a merge sort: stable) -> each element's rank
    [n, S] and C's running sums of w x and w in sorted order, zero-led, per part of the run (IQ1_M: each half
    alone) [parts, n + 1, S]."""
    n, S = x.shape
    order = np.argsort(x, axis=0, kind="stable")
    xo, wo = np.take_along_axis(x, order, 0), np.take_along_axis(w, order, 0)
    part = order // (n // parts)
    sx, sw = np.zeros((parts, n + 1, S), F32), np.zeros((parts, n + 1, S), F32)
    for h in range(parts):  # adding the other part's 0.0 leaves a sum as it is
        np.cumsum(np.where(part == h, wo * xo, F32(0)), axis=0, out=sx[h, 1:])
        np.cumsum(np.where(part == h, wo, F32(0)), axis=0, out=sw[h, 1:])
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n)[:, None], 0)
    return rank, sx, sw


def _first_best(cands: list[tuple[np.ndarray, np.ndarray]], start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's scan: candidate j (sum q x w, sum q^2 w [S]) replaces the best when sumq2 > 0 and sumqx^2 > best *
    sumq2, best = scale * sumqx, scale = sumqx / sumq2 -> the scale [S] (``start`` where none) and the index of
    the last replacement (-1: none)."""
    S = start.size
    best, scale, pick = np.full(S, -FLT_MAX, F32), start.copy(), np.full(S, -1)
    for j, (qx, q2) in enumerate(cands):
        upd = (q2 > 0) & (qx * qx > best * q2)
        if upd.any():
            sc = qx / q2
            np.copyto(scale, sc, where=upd)
            np.copyto(best, sc * qx, where=upd)
            pick[upd] = j
    return scale, pick


def _search_s(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """IQ1_S's split search on 32-runs -> scale [S] (signed), i1, i2 [S] (-1: none), minus [1, S], rank."""
    rank, sx, sw = _sorted_sums(x, w, 1)
    sx, sw = sx[0], sw[0]
    i1, i2 = np.triu_indices(33)
    a, b, c = sx[i1] - sx[0], sx[i2] - sx[i1], sx[32] - sx[i2]
    wa, wb, wc = sw[i1] - sw[0], sw[i2] - sw[i1], sw[32] - sw[i2]
    sums = {}
    for m, v in SHIFTED.items():
        sums[m] = ((a * v[0] + b * v[1]) + c * v[2], ((wa * v[0]) * v[0] + (wb * v[1]) * v[1]) + (wc * v[2]) * v[2])
    cands = [(sums[m][0][k], sums[m][1][k]) for k in range(i1.size) for m in (False, True)]
    scale, pick = _first_best(cands, np.abs(x).max(axis=0))
    k = np.maximum(pick, 0) // 2
    return scale, np.where(pick < 0, -1, i1[k]), np.where(pick < 0, -1, i2[k]), (pick % 2 == 1)[None], rank


def _search_m(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """IQ1_M's split search on 16-runs, each half with its own shift -> scale, i1, i2, minus [2, S], rank."""
    rank, px, pw = _sorted_sums(x, w, 2)
    i1, i2 = np.triu_indices(17)
    qx, q2 = {}, {}
    for m, v in SHIFTED.items():
        c1, c2 = v[0] * v[0] - v[1] * v[1], v[1] * v[1] - v[2] * v[2]
        for h in (0, 1):
            qx[m, h] = px[h, 16] * v[2] - (px[h, i1] + px[h, i2])
            q2[m, h] = ((pw[h, 16] * v[2]) * v[2] + pw[h, i1] * c1) + pw[h, i2] * c2
    combo = [(qx[m0, 0] + qx[m1, 1], q2[m0, 0] + q2[m1, 1]) for m0, m1 in M_MINUS]
    cands = [(c[0][k], c[1][k]) for k in range(i1.size) for c in combo]
    scale, pick = _first_best(cands, np.abs(x).max(axis=0))
    k = np.maximum(pick, 0) // 4
    return scale, np.where(pick < 0, -1, i1[k]), np.where(pick < 0, -1, i2[k]), M_MINUS[pick % 4].T, rank


def _neighbours(key: np.ndarray, x: np.ndarray, w: np.ndarray, scale: np.ndarray, minus: np.ndarray) -> np.ndarray:
    """``iq1_find_best_neighbour2`` for M groups off the codebook: keys [M], x and w [8, M], scale, minus [M]
    -> the candidate point of least sum over i of (w * diff) * diff, diff = scale * q - x, q the shifted
    level of its coordinate i (the first of the least: C's strict '<')."""
    t = tables()
    best = np.empty(key.size, dtype=np.int64)
    cnt = t["count"][key]
    for n in np.unique(cnt).tolist():
        idx = np.flatnonzero(cnt == n)
        cands = t["lists"][n][t["row"][key[idx]]]  # [Mn, n]
        lv = t["levels"][cands].transpose(2, 0, 1)  # [8, Mn, n]
        q = np.where(minus[idx][:, None], SHIFTED[True][lv], SHIFTED[False][lv])
        d2 = np.zeros(cands.shape, F32)
        for i in range(8):
            diff = scale[idx][:, None] * q[i] - x[i, idx][:, None]
            d2 += (w[i, idx][:, None] * diff) * diff
        pick = d2.argmin(axis=1)
        if not (d2[np.arange(pick.size), pick] < FLT_MAX).all():
            raise CodebookOverflowError("weights too large for IQ1: the codebook search overflows")
        best[idx] = cands[np.arange(pick.size), pick]
    return best


def _levels(pts: np.ndarray, minus: np.ndarray) -> np.ndarray:
    """Points [G, S] and their shifts [G, S] -> each element's shifted level [8 G, S]."""
    lv = tables()["levels"][pts]  # [G, S, 8]
    return (
        np.where(minus[..., None], SHIFTED[True][lv], SHIFTED[False][lv]).transpose(0, 2, 1).reshape(-1, pts.shape[1])
    )


def _runs(x: np.ndarray, w: np.ndarray, search) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs x, w [n, S] -> scale [S] (0 for runs left empty), codebook points [n / 8, S], minus [n / 8, S]."""
    n, S = x.shape
    G = n // 8
    scale, i1, i2, minus, rank = search(x, w)
    minus = np.broadcast_to(minus, (G, S))
    empty = (i1 < 0) | ~(np.abs(x).max(axis=0) >= EPS)
    lv = (rank >= i1).astype(np.int64) + (rank >= i2)  # [n, S]
    neg = scale < 0  # C flips the levels and the shifts
    lv, minus, scale = np.where(neg, 2 - lv, lv), np.where(neg, ~minus, minus), np.where(neg, -scale, scale)
    key = (lv.reshape(G, 8, S) << (2 * np.arange(8))[None, :, None]).sum(1)  # [G, S]
    pts = tables()["index"][key]
    g, s = np.nonzero((pts < 0) & ~empty)
    if g.size:
        xg, wg = x.reshape(G, 8, S)[g, :, s].T, w.reshape(G, 8, S)[g, :, s].T  # [8, M]
        pts[g, s] = _neighbours(key[g, s], xg, wg, scale[s], minus[g, s])
        r = np.unique(s)  # runs with a group off the codebook: the scale refitted on the points
        q = _levels(pts[:, r], minus[:, r])
        wr = np.ascontiguousarray(w[:, r])
        sqx, sq2 = dot(wr, q, np.ascontiguousarray(x[:, r])), dot(wr, q, q)
        ok = (sqx > 0) & (sq2 > 0)
        scale[r] = np.where(ok, sqx / np.where(ok, sq2, F32(1)), scale[r])
    scale = np.where(empty, F32(0), scale).astype(F32)
    return scale, np.where(empty, 0, pts), np.where(empty, False, minus)


def _all_runs(xs: np.ndarray, w: np.ndarray, search) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, S = xs.shape
    scale, pts, minus = np.empty(S, F32), np.empty((n // 8, S), np.int64), np.empty((n // 8, S), bool)
    for a in range(0, S, RUNS_PER_PASS):
        b = a + RUNS_PER_PASS
        scale[a:b], pts[:, a:b], minus[:, a:b] = _runs(xs[:, a:b], w[:, a:b], search)
    return scale, pts, minus


def _run_scales(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run scales [B, R] -> d = max / 15 [B], 3-bit l = nearest_int((scale / d - 1) / 2) [B, R], empty [B]."""
    top = scale.max(axis=1)
    empty = ~(top != 0)
    d = top / F32(15)
    f = np.multiply((F32(1) / d)[:, None], scale, dtype=F32)
    f -= F32(1)
    f *= F32(0.5)
    return d, np.where(empty[:, None], 0, nearest_int(f, 0, 7).astype(np.int64)), empty


def iq1_s_fields(x: np.ndarray, qw: np.ndarray, ws: Scratch | None = None) -> dict:
    """Super-blocks x float32 [B, 256] with importance qw [B, 256] -> the fields ``pack_iq1_s`` writes: fp16 d
    [B], points [B, 8 runs, 4], 3-bit run scales [B, 8], whether a run's shift is -delta [B, 8]."""
    ws = ws or Scratch()
    B = x.shape[0]
    w = np.array(importance_weights(x, qw, ws))  # [32, 8B]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        scale, pts, minus = _all_runs(np.array(columns(x, 32, ws)), w, _search_s)
        d, sc, empty = _run_scales(scale.reshape(B, 8))
        dh = np.where(empty, F32(0), d * F32(1.125)).astype(np.float16)
    minus = np.where(empty[:, None], False, minus[0].reshape(B, 8))
    return dict(d=dh, points=pts.T.reshape(B, 8, 4), sc=sc, minus=minus)


def quantize_iq1_s(x: np.ndarray, qw: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """Super-blocks x float32 [B, 256] with importance qw [B, 256] -> IQ1_S blocks uint8 [B, 50]."""
    return pack_iq1_s(**iq1_s_fields(x, qw, ws))


def iq1_m_fields(x: np.ndarray, qw: np.ndarray | None, ws: Scratch | None = None) -> dict:
    """Super-blocks x float32 [B, 256] (importance qw [B, 256], or None: weights x^2) -> the fields
    ``pack_iq1_m`` writes: fp16 dh [B], points [B, 16 runs, 2], 3-bit run scales [B, 16], whether a group's
    shift is -delta [B, 16, 2]. The super-scale is refitted by least squares over the whole super-block on the
    stored levels and scales."""
    ws = ws or Scratch()
    B = x.shape[0]
    xs = np.array(columns(x, 16, ws))  # [16, 16B]
    if qw is None:
        w = xs * xs
    else:  # the 32-run weights (sigma2 over the super-block), each column split in its two 16-runs
        w = np.array(importance_weights(x, qw, ws)).reshape(2, 16, -1).transpose(1, 2, 0).reshape(16, -1)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        scale, pts, minus = _all_runs(xs, w, _search_m)
        d, sc, empty = _run_scales(scale.reshape(B, 16))
        q = _levels(pts, minus).reshape(16, B, 16) * (2 * sc.astype(F32) + F32(1))[None]  # [16, B, 16 runs]
        q = np.ascontiguousarray(q.transpose(2, 0, 1).reshape(256, B))
        wt = np.ascontiguousarray(w.reshape(16, B, 16).transpose(2, 0, 1).reshape(256, B))
        xt = np.ascontiguousarray(x.T)
        sqx, sq2 = dot(wt, q, xt), dot(wt, q, q)
        d = np.where(sq2 > 0, sqx / np.where(sq2 > 0, sq2, F32(1)), d)
        dh = np.where(empty, F32(0), d * F32(1.1125)).astype(np.float16)
    minus = np.where(empty[:, None, None], False, minus.T.reshape(B, 16, 2))
    return dict(dh=dh, points=pts.T.reshape(B, 16, 2), sc=sc, minus=minus)


def quantize_iq1_m(x: np.ndarray, qw: np.ndarray | None, ws: Scratch | None = None) -> np.ndarray:
    """Super-blocks x float32 [B, 256] (importance qw [B, 256], or None: weights x^2) -> IQ1_M uint8 [B, 56]."""
    return pack_iq1_m(**iq1_m_fields(x, qw, ws))


def refuse_without_importance(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """IQ1_S without an importance vector: libggml's quantize_iq1_s aborts the process; quantkit raises."""
    raise ValueError("IQ1_S needs an importance matrix (libggml's quantize_iq1_s asserts one)")
