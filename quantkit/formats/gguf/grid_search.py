"""The per-group grid search behind ``grids.choose_grid``, and rounding onto a type's codes or levels.

For each group of g weights x with importance w, the grid (s, b) is searched to minimise Σ w (x - value)², every
value the grid point nearest x: candidate codes stretch the group's range (or, for level tables, map its
signed largest value onto levels near either end), each fitted by weighted least squares on its codes, and
the best is refined by re-rounding and refitting. Groups are
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
    w: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None, lo: int, hi: int, levels: Levels, s_nonzero: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (float; 0 where s = 0) and values s * level + b of w rounded to nearest onto (s, b), which
    broadcast against w (b None: 0). Where s = 0 the value is b whatever the level; ``s_nonzero``: the
    caller knows no s is 0 (the two passes that handle it are skipped)."""
    t = w if b is None else w - b
    if s_nonzero:
        c, v = nearest_codes_and_levels(t / s, lo, hi, levels)
    else:
        c, v = nearest_codes_and_levels(t / torch.where(s == 0, torch.ones_like(s), s), lo, hi, levels)
        c = torch.where(s == 0, torch.zeros_like(c), c)
    v = s * v
    return c, v if b is None else v + b


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
#
# Each candidate's codes are fitted by weighted least squares. An integer grid scores the fitted (s, b) by
# the error of re-rounding onto it; a level table (IQ4, Q1_0), where each rounding is a table lookup, by the
# fit's error on the candidate's own codes, which the fit's sums already give: at the least-squares optimum
# Σ w (x - value)² = Σ w x² - s Σ w c x - b Σ w x (ggml's IQ4 search compares (Σ w c x)² / Σ w c², the same).
# The winner then takes REFINE_STEPS of alternating re-rounding and refitting, each of which can only lower
# its error. Measured against scoring by re-rounding without the refinement (the search before), on Gaussian
# and Gemma 3 270M weights: IQ4_XS 1.7x faster with 0.1-0.4 % lower weighted error; the integer grids 1.0-1.4x
# faster with 0.6-7 % lower (Q2_K 2.6 %; scoring its candidates by their own codes instead was 0.2-0.5 %
# worse than before).
# The refinement serves round-to-nearest (``grids.searched_blocks``). GPTQ's grids skip it (``refine=0``): on
# the Gemma 3 270M's q3_k_m (the default calibration, 64 x 512; llama.cpp's KLD, 20 x 512) the refined grids
# scored WikiText 0.0733 against 0.0710 unrefined, French 0.0895 against 0.0898; the search before them
# 0.0706 / 0.0900. A grid fitted tighter to W leaves GPTQ's moved columns less room.

REFINE_STEPS = 2


def _fit_sym(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, wxx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Least-squares s of x ~ s c per group -> s, b (zeros), their error, whether they are valid (some
    w c² > 0); [N] each: the same fields as ``_fit_asym``'s."""
    wc = w * c
    num, den = (wc * x).sum(-1), (wc * c).sum(-1)
    s = num / den.clamp_min(1e-30)
    return s, torch.zeros_like(s), wxx - s * num, den > 0


def _fit_asym(
    x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, sums: tuple, b_le_zero: bool
) -> tuple[torch.Tensor, ...]:
    """Least-squares (s, b) of x ~ s c + b per group (b <= 0 where ``b_le_zero``: else refit s with b = 0);
    ``sums`` = (Σ w, Σ w x, Σ w x²) [N] -> s, b, their error, whether they are valid (s > 0)."""
    sw, swx, wxx = sums
    wc = w * c
    swc, swcc, swcx = wc.sum(-1), (wc * c).sum(-1), (wc * x).sum(-1)
    det = sw * swcc - swc * swc
    ok = det > 0
    det = torch.where(ok, det, torch.ones_like(det))
    s, b = (sw * swcx - swc * swx) / det, (swcc * swx - swc * swcx) / det
    if b_le_zero:  # the K types store b as a min that is subtracted
        pos = b > 0
        s, b = torch.where(pos, swcx / swcc.clamp_min(1e-30), s), torch.where(pos, torch.zeros_like(b), b)
    return s, b, wxx - s * swcx - b * swx, ok & (s > 0)


def _rounded_error(
    x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None, lay: Layout
) -> torch.Tensor:
    """Σ w (x - (s c + b))² per group [N], c the code nearest (x - b) / s (b None: 0)."""
    c = _level_values(x, s, b, lay)
    v = s[:, None] * c if b is None else torch.addcmul(b[:, None], s[:, None], c)
    return (w * (x - v).square()).sum(-1)


def _keep_better(best: list[torch.Tensor], cand: list[torch.Tensor], ok: torch.Tensor) -> list[torch.Tensor]:
    """best / cand = [s, b, error]: per group, the candidate where it is valid and lower."""
    better = ok & (cand[2] < best[2])
    return [torch.where(better, c, o) for c, o in zip(cand, best, strict=True)]


def _refine(
    x: torch.Tensor, w: torch.Tensor, best: list[torch.Tensor], lay: Layout, sums: tuple, steps: int
) -> list[torch.Tensor]:
    """``steps`` of rounding onto the best (s, b) and refitting on those codes (Lloyd's iteration: the
    re-rounded error is at most the fit's, the refit's at most the rounded one's)."""
    for _ in range(steps):
        s = best[0]
        if lay.sym:
            *cand, ok = _fit_sym(x, w, _level_values(x, s, None, lay), sums[2])
        else:
            *cand, ok = _fit_asym(x, w, _level_values(x, s, best[1], lay), sums, lay.super_block)
        better = ok & (s != 0)
        best = [torch.where(better, n, o) for n, o in zip(cand, best, strict=True)]
    return best


def _level_values(x: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None, lay: Layout) -> torch.Tensor:
    """What s multiplies for x [N, g] rounded to nearest onto (s, b) [N] (b None: 0): the code, or its level."""
    t = x if b is None else x - b[:, None]
    return _nearest_values(t / torch.where(s == 0, torch.ones_like(s), s)[:, None], lay)


def _nearest_values(t: torch.Tensor, lay: Layout) -> torch.Tensor:
    """The code nearest t (clamped to the layout's range), or for a level table the level nearest t."""
    if lay.levels is not None:
        return _nearest_levels(t, lay.levels)
    return nearest_codes(t, lay.lo, lay.hi, None)


def _search_sym(x: torch.Tensor, w: torch.Tensor, lay: Layout, refine: int) -> torch.Tensor:
    """Per group the scale s minimising Σ w (x - s q)², q the code (or a level type's level) nearest x / s.
    Candidates map the signed largest-magnitude value m onto codes near the negative end (m on that end
    itself, the reference quantizers' choice, is the first) and, where the positive side reaches
    further (Q2_0's -1..2) or for level tables, near the positive end too.
    x, w [N, g] -> s [N] (0 for all-zero groups)."""
    m = torch.from_numpy(signed_absmax(x.numpy(), 1))  # [N]
    zero_b = torch.zeros_like(m)
    wxx = (w * x * x).sum(-1)
    safe_m = torch.where(m == 0, torch.ones_like(m), m)
    if lay.levels is not None:
        ends, unit = (lay.levels[0], lay.levels[-1]), 1.0  # levels are integers ~ 10 apart
    else:
        ends, unit = ((lay.lo, lay.hi) if lay.hi > -lay.lo else (lay.lo,)), 0.1
    s0 = m / ends[0]  # the reference quantizers' scale: m exactly on the first end, nothing clipped
    best = [s0, zero_b, _rounded_error(x, w, s0, None, lay)]
    for end in ends:
        for t in range(-SEARCH_STEPS, SEARCH_STEPS + 1):
            target = end + unit * t * (1 if end > 0 else -1)  # where m lands
            s, b, err, ok = _fit_sym(x, w, _nearest_values(x * (target / safe_m)[:, None], lay), wxx)
            if lay.levels is None:
                err = _rounded_error(x, w, s, None, lay)
            best = _keep_better(best, [s, b, err], ok)
    best = _refine(x, w, best, lay, (None, None, wxx), refine)
    return torch.where(m == 0, zero_b, best[0])


def _nearest_levels(t: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """The level nearest t, as ``level_of(nearest_codes(t))``: one table lookup on CPU."""
    if t.device.type == "cpu" and t.dtype == torch.float32:
        return _nearest_by_table(t, levels, values=True)
    return level_of(nearest_codes(t, 0, len(levels) - 1, levels), levels)


def _search_asym(x: torch.Tensor, w: torch.Tensor, lay: Layout, refine: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (s >= 0, b) minimising Σ w (x - (s c + b))², c = clamp(round((x - b) / s), 0, hi).
    Candidates stretch the [min, max] range (the min-max grid itself is the first); K types store the offset as a
    non-negative min that is subtracted, so there b <= 0. x, w [N, g] -> s, b [N]."""
    nmax = lay.hi
    lo, hi = x.amin(-1), x.amax(-1)
    if lay.super_block:
        lo = lo.clamp(max=0.0)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    wx = w * x
    sums = (w.sum(-1), wx.sum(-1), (wx * x).sum(-1))
    s0 = (hi - lo) / nmax  # the min-max grid: nothing clipped
    best = [s0, lo, _rounded_error(x, w, s0, lo, lay)]
    for t in range(-SEARCH_STEPS, SEARCH_STEPS + 1):
        c = torch.round((x - lo[:, None]) * ((nmax + 0.1 * t) / span)[:, None]).clamp(0, nmax)
        s, b, _, ok = _fit_asym(x, w, c, sums, lay.super_block)
        best = _keep_better(best, [s, b, _rounded_error(x, w, s, b, lay)], ok)
    best = _refine(x, w, best, lay, sums, refine)
    flat = hi <= lo
    return torch.where(flat, torch.zeros_like(best[0]), best[0]), torch.where(flat, lo, best[1])


def _search(x: torch.Tensor, w: torch.Tensor, lay: Layout, refine: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (s, b) for the layout's kind of grid; x, w [N, g] -> s, b [N]."""
    if lay.sym or lay.levels is not None:
        return _search_sym(x, w, lay, refine), torch.zeros(x.shape[0])
    return _search_asym(x, w, lay, refine)


def search_in_chunks(x: torch.Tensor, w: torch.Tensor, lay: Layout, refine: int = REFINE_STEPS):
    """``_search`` over SEARCH_CHUNK groups at a time, the chunks spread over torch's threads (each chunk
    single-threaded). Every group is searched alone, so the scales are the same bits as in one pass; a chunk
    stays in cache across the search's dozens of passes, where a 9B MLP weight (51M values) went to memory on
    every pass: 47 s for IQ4_XS's grid of one 14336 x 3584 weight on 2 threads before."""
    n = SEARCH_CHUNK
    parts = [(x[a : a + n], w[a : a + n]) for a in range(0, x.shape[0], n)]
    workers = max(1, min(torch.get_num_threads(), len(parts)))
    if workers == 1:
        out = [_search(xp, wp, lay, refine) for xp, wp in parts]
    else:
        with torch_threads(1), ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(lambda p: _search(*p, lay, refine), parts))
    return torch.cat([s for s, _ in out]), torch.cat([b for _, b in out])
