"""IQ4_NL and IQ4_XS in numpy, byte for byte what llama-quantize writes without an importance matrix: libggml's
``quantize_iq4_nl`` / ``quantize_iq4_xs`` (``quantize_row_iq4_nl_impl`` with weights x^2 and ntry = 7;
``quantize_row_iq4_xs_ref`` is the same call, ``quantize_row_iq4_nl_ref`` is not: it skips the search, and
llama-quantize never runs it).

Each 32-run's scale d is searched over 15 trial scales, its elements rounded to the nearest of the 16
non-linear levels (``best_index``, ggml's ``best_index_int8``), and d refitted by weighted least squares.
IQ4_NL stores fp16(d) per run; IQ4_XS stores per 256 an fp16 d = -max/32 and 6-bit run scales
l = nearest(d_run / d) in -32..31, and re-rounds every run onto d * l. Arrays are [32, S] with a run's
elements on axis 0, as in ``quantkit.formats.gguf.ggml_float``, whose C-order float32 arithmetic they use.
"""

from __future__ import annotations

import numpy as np

from quantkit.formats.gguf.ggml_float import F32, GROUP_MAX_EPS, Scratch, columns, dot, nearest_int, signed_absmax
from quantkit.formats.gguf.layouts import IQ4_LEVELS, pack_iq4_nl, pack_iq4_xs

LEVELS = np.array(IQ4_LEVELS, dtype=F32)
NTRY = 7  # what quantize_iq4_nl / quantize_iq4_xs pass
_HALF_STEPS = 256  # floor(2x) is clipped to +-256, beyond every doubled midpoint (-231 .. 202)
# for j = floor(2x) + _HALF_STEPS: how many midpoints between consecutive levels lie at or below x
_BELOW = np.searchsorted(LEVELS[:-1] + LEVELS[1:], np.arange(-_HALF_STEPS, _HALF_STEPS + 1), side="right")


def best_index(x: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8(16, kvalues_iq4nl, x) for float32 x [...] -> int64 level indices [...].

    C takes the bracketing pair a <= x < b and the lower one only if x - a < b - x in float32. Near a
    midpoint (a + b) / 2 both differences are exact (|x| >= 4.5 there and they are below 24), so that is
    x < (a + b) / 2, and the index is the number of midpoints at or below x: a table lookup on floor(2x),
    the midpoints being halves (8x faster than np.searchsorted: measured). NaN gets 15, as in C."""
    f = np.multiply(x, F32(2))  # exact
    np.floor(f, out=f)
    np.clip(f, -_HALF_STEPS, _HALF_STEPS, out=f)
    np.nan_to_num(f, copy=False, nan=_HALF_STEPS)
    return _BELOW[f.astype(np.intp) + _HALF_STEPS]


def _sums(xs: np.ndarray, w: np.ndarray, iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels q of iscale * x, then sum w*q*x and sum w*q*q per run ([32, S] -> [S], [S])."""
    q = LEVELS[best_index(iscale * xs)]
    return dot(w, q, xs), dot(w, q, q)


def search_scales(xs: np.ndarray, ws: Scratch, w: np.ndarray | None = None) -> np.ndarray:
    """quantize_row_iq4_nl_impl's per-run scale search (weights ``w``, default x^2; ntry 7): xs [32, S] -> d [S],
    0 where the run's largest |x| is below GROUP_MAX_EPS."""
    if w is None:
        w = np.multiply(xs, xs, out=ws.get("w", xs.shape))
    big = signed_absmax(xs, 0)  # C's max: the first element of largest magnitude, with its sign
    zero = np.abs(big) < GROUP_MAX_EPS
    big = np.where(zero, F32(1), big)
    first = LEVELS[0]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = -big / first
        sumqx, sumq2 = _sums(xs, w, F32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
        best = d * sumqx
        for itry in range(-NTRY, NTRY + 1):
            sumqx, sumq2 = _sums(xs, w, (F32(itry) + first) / big)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            np.copyto(d, sumqx / sumq2, where=better)
            np.copyto(best, d * sumqx, where=better)
    return np.where(zero, F32(0), d)


def _inverse(d: np.ndarray) -> np.ndarray:
    """C's `d ? 1/d : 0`."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def importance_weights(x: np.ndarray, qw: np.ndarray, ws: Scratch, run: int = 32, spread: float = 2.0) -> np.ndarray:
    """quantize_row_iq4_nl_impl's weights with an importance matrix: x, qw float32 [B, b] (b = 32 for IQ4_NL,
    256 for IQ4_XS) -> [run, b/run * B], qw * sqrt(sigma2 + x^2) with sigma2 = sum(x^2) * (spread / b) per
    block (the IQ2_XXS / IQ2_XS search: spread 1, runs of 32 / 16)."""
    b = x.shape[1]
    xt = ws.get("xt", (b, x.shape[0]))
    np.copyto(xt, x.T)
    sigma2 = dot(xt, xt) * F32(spread / b)  # [B]; C sums the block in element order
    xs, qs = columns(x, run, ws), columns(qw, run, ws, "qw")
    w = ws.get("w", xs.shape)
    np.sqrt(np.add(np.multiply(xs, xs, out=w), np.repeat(sigma2, b // run), out=w), out=w)
    return np.multiply(qs, w, out=w)


def quantize_iq4_nl(x: np.ndarray, ws: Scratch | None = None, qw: np.ndarray | None = None) -> np.ndarray:
    """float32 [B, 32] blocks -> uint8 [B, 18] IQ4_NL blocks: d = fp16(searched d), levels of x / d (float32 d).
    ``qw`` [B, 32]: the importance, where llama-quantize has one."""
    ws = ws or Scratch()
    w = None if qw is None else importance_weights(x, qw, ws)
    d = search_scales(columns(x, 32, ws), ws, w)  # [B]
    codes = best_index(_inverse(d)[:, None] * x)
    return pack_iq4_nl(d.astype(np.float16), codes)


def quantize_iq4_xs(x: np.ndarray, ws: Scratch | None = None, qw: np.ndarray | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 136] IQ4_XS blocks (``qw`` [B, 256]: the importance)."""
    ws = ws or Scratch()
    B = x.shape[0]
    w = None if qw is None else importance_weights(x, qw, ws)
    scales = search_scales(columns(x, 32, ws), ws, w).reshape(B, 8)
    d = -signed_absmax(scales, 1) / F32(32)  # [B]; C keeps float32 d for what follows, stores fp16(d)
    sc = nearest_int(_inverse(d)[:, None] * scales, -32, 31)  # [B, 8]
    dl = d[:, None] * sc
    codes = best_index(_inverse(dl)[:, :, None] * x.reshape(B, 8, 32)).reshape(B, 256)
    return pack_iq4_xs(d.astype(np.float16), sc.astype(np.int8), codes)
