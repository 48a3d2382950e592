"""The per-group grid search behind ``grids.choose_grid``, and rounding onto a type's codes or levels.

For each group of g weights x with importance w, a candidate grid (s, b) is scored by Σ w (x - value)², every
value the grid point nearest x; candidates stretch the group's range (or, for level tables, map its signed
largest value onto levels near either end), each refitted by weighted least squares on its codes. Groups are
independent: ``search_in_chunks`` runs them a chunk at a time on a thread pool with the same bits as one pass.
Shapes: x, w [N, g] (N groups) -> s, b [N].
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from quantkit.formats.gguf.ggml_float import signed_absmax
from quantkit.formats.gguf.layouts import Layout
from quantkit.formats.gguf.stream import torch_threads

SEARCH_CHUNK = 8192  # groups searched together: a few MB, kept in cache
SEARCH_STEPS = 10  # candidate grids per group: 2 * SEARCH_STEPS + 1 (twice that for the IQ4 types)
Levels = tuple[int, ...] | None  # a non-linear type's levels (Layout.levels)


def nearest_codes(t: torch.Tensor, lo: int, hi: int, levels: Levels) -> torch.Tensor:
    """The code nearest t = (w - b) / s, as float: round and clamp to [lo, hi], or for a non-linear type the
    index of the nearest level (ties to the upper one, as ggml's best_index_int8)."""
    if levels is None:
        return torch.round(t).clamp(lo, hi)
    if t.device.type == "cpu" and t.dtype == torch.float32:  # 8x faster than bucketize, same codes
        return _nearest_by_table(t, levels, values=False)
    lv = torch.tensor(levels, dtype=t.dtype, device=t.device)
    return torch.bucketize(t, (lv[:-1] + lv[1:]) / 2, right=True).to(t.dtype)


def nearest_codes_and_levels(t: torch.Tensor, lo: int, hi: int, levels: Levels) -> tuple[torch.Tensor, torch.Tensor]:
    """``nearest_codes(t)`` and what s multiplies for each (``level_of``), from one table lookup on CPU."""
    if levels is None:
        c = torch.round(t).clamp(lo, hi)
        return c, c
    if t.device.type == "cpu" and t.dtype == torch.float32:
        lim, codes, vals = _nearest_tables(levels)
        i = _table_index(t, lim)
        return torch.from_numpy(codes[i]), torch.from_numpy(vals[i])
    c = nearest_codes(t, lo, hi, levels)
    return c, level_of(c, levels)


def round_onto(
    w: torch.Tensor, s: torch.Tensor, b: torch.Tensor, lo: int, hi: int, levels: Levels
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (float; 0 where s = 0) and values s * level + b of w rounded to nearest onto (s, b), which
    broadcast against w. Where s = 0 the value is b whatever the level."""
    safe = torch.where(s == 0, torch.ones_like(s), s)
    c, v = nearest_codes_and_levels((w - b) / safe, lo, hi, levels)
    return torch.where(s == 0, torch.zeros_like(c), c), s * v + b


@functools.cache
def _nearest_tables(levels: tuple[int, ...]) -> tuple[int, np.ndarray, np.ndarray]:
    """(lim, codes, values): the code nearest t (ties to the upper one) is codes[floor(2t) + lim], its level
    values[floor(2t) + lim], for floor(2t) clipped to [-lim, lim]. Exact for integer levels: each midpoint m
    between two is a multiple of 1/2, so t >= m exactly where floor(2t) >= 2m."""
    lim = 2 * max(abs(v) for v in levels) + 2
    lv = torch.tensor(levels, dtype=torch.float32)
    u = torch.arange(-lim, lim + 1, dtype=torch.float32) / 2
    codes = torch.bucketize(u, (lv[:-1] + lv[1:]) / 2, right=True)
    return lim, codes.float().numpy(), lv[codes].numpy()


def _table_index(t: torch.Tensor, lim: int) -> np.ndarray:
    """floor(2t) clipped to [-lim, lim], plus lim: the row of ``_nearest_tables`` for every t (float32, CPU)."""
    u = np.floor(t.detach().numpy() * 2)
    return (np.clip(u, -lim, lim, out=u) + lim).astype(np.int32)


def _nearest_by_table(t: torch.Tensor, levels: tuple[int, ...], values: bool) -> torch.Tensor:
    """The nearest level's code (``values``: its value) for every t, float32 on CPU (``_nearest_tables``)."""
    lim, codes, vals = _nearest_tables(levels)
    return torch.from_numpy((vals if values else codes)[_table_index(t, lim)])


@functools.cache
def _level_array(levels: tuple[int, ...]) -> np.ndarray:
    return np.asarray(levels, dtype=np.float32)


def level_of(c: torch.Tensor, levels: Levels) -> torch.Tensor:
    """What s multiplies for code c (float, or integer codes: then float32): c itself, or its level of a
    non-linear type. On CPU by numpy's indexing (int8 codes index directly: 4x faster than torch's)."""
    if levels is None:
        return c if c.is_floating_point() else c.float()
    if c.device.type == "cpu":
        idx = c.numpy() if c.dtype in (torch.int8, torch.uint8) else c.numpy().astype(np.int32)
        out = torch.from_numpy(_level_array(levels)[idx])
        return out.to(c.dtype) if c.is_floating_point() else out
    dt = c.dtype if c.is_floating_point() else torch.float32
    return torch.tensor(levels, dtype=dt, device=c.device)[c.long()]


# ------------------------------------------------------------------------------------------ grid search


def _rounded_error(
    x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, b: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """Σ w (x - (s c + b))² with c the integer code nearest (x - b) / s: the error of rounding onto (s, b)
    (the level types': ``_search_levels``)."""
    _, value = round_onto(x, s[:, None], b[:, None], lo, hi, None)
    return (w * (x - value) ** 2).sum(-1)


def _keep_better(best: list[torch.Tensor], cand: list[torch.Tensor], ok: torch.Tensor) -> list[torch.Tensor]:
    """best / cand = [s, b, error]: per group, the candidate where it is valid and lower."""
    better = ok & (cand[2] < best[2])
    return [torch.where(better, c, o) for c, o in zip(cand, best, strict=True)]


def _search_sym(x: torch.Tensor, w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per group the scale s minimising Σ w (x - s c)², c = clamp(round(x / s), lo, hi). Candidates map the
    signed largest-magnitude value m near the code lo (s = m / lo, the reference quantizers' choice, is the
    first; where the positive codes reach further, as Q2_0's, m near hi too), each refitted by weighted least
    squares on its codes and kept if re-rounding onto it is better. x, w [N, g] -> s [N] (0 for all-zero groups)."""
    m = torch.from_numpy(signed_absmax(x.numpy(), 1))  # [N]
    zero_b = torch.zeros_like(m)
    s0 = m / lo
    best = [s0, zero_b, _rounded_error(x, w, s0, zero_b, lo, hi)]
    safe_m = torch.where(m == 0, torch.ones_like(m), m)
    ends = (lo, hi) if hi > -lo else (lo,)  # Q2_0's -1..2: m onto the longer, positive side too
    for end in ends:
        for t in range(-SEARCH_STEPS, SEARCH_STEPS + 1):
            target = end + 0.1 * t * (1 if end > 0 else -1)  # where m lands
            c = torch.round(x * (target / safe_m)[:, None]).clamp(lo, hi)
            num, den = (w * x * c).sum(-1), (w * c * c).sum(-1)
            s = num / den.clamp_min(1e-30)
            best = _keep_better(best, [s, zero_b, _rounded_error(x, w, s, zero_b, lo, hi)], den > 0)
    return torch.where(m == 0, zero_b, best[0])


def _search_levels(x: torch.Tensor, w: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """Per group the scale s minimising Σ w (x - s q)², q the level nearest x / s. Candidates map the signed
    largest-magnitude value m onto levels near either end of the table (s = m / levels[0] is the first),
    each refitted by weighted least squares on its levels and kept if re-rounding onto it is better.
    x, w [N, g] -> s [N] (0 for all-zero groups)."""
    m = torch.from_numpy(signed_absmax(x.numpy(), 1))  # [N]
    wx = w * x
    wxx = (wx * x).sum(-1).double()  # [N]

    def rounded_error(s: torch.Tensor) -> torch.Tensor:  # Σ w (x - s q)², expanded: one pass less per term
        q = _nearest_levels(x / torch.where(s == 0, torch.ones_like(s), s)[:, None], levels)
        sd = s.double()
        return wxx - 2 * sd * (wx * q).sum(-1).double() + sd * sd * (w * q * q).sum(-1).double()

    s0 = m / levels[0]
    best = [s0, rounded_error(s0)]
    safe_m = torch.where(m == 0, torch.ones_like(m), m)
    for end in (levels[0], levels[-1]):
        for t in range(-SEARCH_STEPS, SEARCH_STEPS + 1):
            q = _nearest_levels(x * ((end + t) / safe_m)[:, None], levels)
            wq = w * q
            num, den = (wq * x).sum(-1), (wq * q).sum(-1)
            s = num / den.clamp_min(1e-30)
            err = rounded_error(s)
            better = (den > 0) & (err < best[1])
            best = [torch.where(better, s, best[0]), torch.where(better, err, best[1])]
    return torch.where(m == 0, torch.zeros_like(m), best[0])


def _nearest_levels(t: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """The level nearest t, as ``level_of(nearest_codes(t))``: one table lookup on CPU."""
    if t.device.type == "cpu" and t.dtype == torch.float32:
        return _nearest_by_table(t, levels, values=True)
    return level_of(nearest_codes(t, 0, len(levels) - 1, levels), levels)


def _search_asym(x: torch.Tensor, w: torch.Tensor, nmax: int, offset_le_zero: bool):
    """Per group (s >= 0, b) minimising Σ w (x - (s c + b))², c = clamp(round((x - b) / s), 0, nmax).
    Candidates stretch the [min, max] range (the min-max grid is the first), each refitted by weighted least
    squares on its codes; K types store the offset as a non-negative min that is subtracted, so there b <= 0.
    x, w [N, g] -> s, b [N]."""
    lo, hi = x.amin(-1), x.amax(-1)
    if offset_le_zero:
        lo = lo.clamp(max=0.0)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    s0 = (hi - lo) / nmax
    best = [s0, lo, _rounded_error(x, w, s0, lo, 0, nmax)]
    sw, swx = w.sum(-1), (w * x).sum(-1)
    for t in range(-SEARCH_STEPS, SEARCH_STEPS + 1):
        c = torch.round((x - lo[:, None]) * ((nmax + 0.1 * t) / span)[:, None]).clamp(0, nmax)
        swc, swcc, swcx = (w * c).sum(-1), (w * c * c).sum(-1), (w * c * x).sum(-1)
        det = sw * swcc - swc * swc
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        s, b = (sw * swcx - swc * swx) / det, (swcc * swx - swc * swcx) / det
        if offset_le_zero:  # refit the scale alone with the offset pinned at 0
            pos = b > 0
            s, b = torch.where(pos, swcx / swcc.clamp_min(1e-30), s), torch.where(pos, torch.zeros_like(b), b)
        best = _keep_better(best, [s, b, _rounded_error(x, w, s, b, 0, nmax)], ok & (s > 0))
    flat = hi <= lo
    return torch.where(flat, torch.zeros_like(best[0]), best[0]), torch.where(flat, lo, best[1])


def _search(x: torch.Tensor, w: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (s, b) for the layout's kind of grid; x, w [N, g] -> s, b [N]."""
    if lay.levels is not None:
        return _search_levels(x, w, lay.levels), torch.zeros(x.shape[0])
    if lay.sym:
        return _search_sym(x, w, lay.lo, lay.hi), torch.zeros(x.shape[0])
    return _search_asym(x, w, lay.hi, offset_le_zero=lay.super_block)


def search_in_chunks(x: torch.Tensor, w: torch.Tensor, lay: Layout):
    """``_search`` over SEARCH_CHUNK groups at a time, the chunks spread over torch's threads (each chunk
    single-threaded). Every group is searched alone, so the scales are the same bits as in one pass; a chunk
    stays in cache across the search's dozens of passes, where a 9B MLP weight (51M values) went to memory on
    every pass: 47 s for IQ4_XS's grid of one 14336 x 3584 weight on 2 threads before."""
    n = SEARCH_CHUNK
    parts = [(x[a : a + n], w[a : a + n]) for a in range(0, x.shape[0], n)]
    workers = max(1, min(torch.get_num_threads(), len(parts)))
    if workers == 1:
        out = [_search(xp, wp, lay) for xp, wp in parts]
    else:
        with torch_threads(1), ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(lambda p: _search(*p, lay), parts))
    return torch.cat([s for s, _ in out]), torch.cat([b for _, b in out])
