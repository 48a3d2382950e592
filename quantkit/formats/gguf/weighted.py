"""Quantizers with an importance matrix, byte for byte what llama-quantize --imatrix writes: libggml's
``quantize_<type>(src, dst, nrows, n_per_row, quant_weights)`` for the legacy and K types (IQ4_NL / IQ4_XS
and Q6_K take their weights in ``iquants`` / ``kquants_sym``; Q8_0 and the floats ignore an importance matrix).

The importance ``qw`` of a weight is one value per input column (llama.cpp's in_sum2 / counts). Each element's
weight in the searches is qw * sqrt(sigma2 + x^2), sigma2 being the mean of x^2 over the row (legacy types),
over the super-block (Q2_K) or twice that (Q3_K, Q4_K, Q5_K). The searches are ``weighted_search``'s.
Shapes: blocks x, qw float32 [B, block] -> uint8 [B, type_bytes]; ``sigma2`` [B] where the caller has it.
"""

from __future__ import annotations

import numpy as np

from quantkit.formats.gguf.ggml_float import F32, Scratch, columns, csum, dot, nearest_int
from quantkit.formats.gguf.kquants_sym import quantize_q6_k
from quantkit.formats.gguf.layouts import (
    pack_q2_k,
    pack_q3_k,
    pack_q4_0,
    pack_q4_1,
    pack_q4_k,
    pack_q5_0,
    pack_q5_1,
    pack_q5_k,
    pack_scale_min_k4,
)
from quantkit.formats.gguf.weighted_search import make_qkx3, make_qp, make_qx, qx_codes


def sum_squares(x: np.ndarray, ws: Scratch) -> np.ndarray:
    """float32 [B, b] -> [B]: each row's sum of x^2 in element order, as C's loop."""
    xt = ws.get("xt", (x.shape[1], x.shape[0]))
    np.copyto(xt, x.T)
    return dot(xt, xt)


def weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray, n: int, ws: Scratch) -> np.ndarray:
    """x, qw [B, b], sigma2 [B] -> the columns [n, b/n * B] of qw * sqrt(sigma2 + x^2)."""
    xs, qs = columns(x, n, ws), columns(qw, n, ws, "qw")
    w = ws.get("w", xs.shape)
    np.sqrt(np.add(np.multiply(xs, xs, out=w), np.repeat(sigma2, x.shape[1] // n), out=w), out=w)
    return np.multiply(qs, w, out=w)


# ------------------------------------------------------------------------------------------ legacy types


def _legacy(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray, ws: Scratch, nmax: int, with_min: bool) -> tuple:
    """quantize_row_q{4,5}_{0,1}_impl on 32-blocks: make_qx_quants (symmetric) or make_qkx3_quants
    (rmin -0.9, rdelta 0.05, 36 steps) -> (d [B], m [B] or None, codes [B, 32])."""
    w = weights(x, qw, sigma2, 32, ws)
    xs = columns(x, 32, ws)
    if with_min:
        d, the_min, L = make_qkx3(xs, w, nmax, ws)
        return d, -the_min, L.T
    d, best_is, zero = make_qx(xs, w, nmax, ws)
    return d, None, qx_codes(xs, best_is, zero, nmax).T


def quantize_q4_0(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray, ws: Scratch) -> np.ndarray:
    d, _, c = _legacy(x, qw, sigma2, ws, 8, False)
    return pack_q4_0(d, c)


def quantize_q5_0(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray, ws: Scratch) -> np.ndarray:
    d, _, c = _legacy(x, qw, sigma2, ws, 16, False)
    return pack_q5_0(d, c)


def quantize_q4_1(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray, ws: Scratch) -> np.ndarray:
    d, m, u = _legacy(x, qw, sigma2, ws, 15, True)
    return pack_q4_1(d, m, u)


def quantize_q5_1(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray, ws: Scratch) -> np.ndarray:
    d, m, u = _legacy(x, qw, sigma2, ws, 31, True)
    return pack_q5_1(d, m, u)


# --------------------------------------------------------------------------------------------- K types


def _requantize(x: np.ndarray, d: np.ndarray, dm: np.ndarray | None, L: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Codes [B, per, n] of x [B, 256] on the stored sub-block scales d (and mins dm) [B, per]: nearest((x +
    dm) / d) clamped; sub-blocks with d == 0 keep the search's codes L [B, per, n] (C skips them)."""
    B, per = d.shape
    xb = x.reshape(B, per, -1)
    num = xb if dm is None else xb + dm[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = nearest_int(num / d[:, :, None], lo, hi)
    return np.where((d == 0)[:, :, None], L, q)


def scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's get_scale_min_k4 for j = 0..7: 12 bytes [B, 12] -> sc, m float32 [B, 8]."""
    q = packed.astype(np.int32)
    lo_sc, lo_m = q[:, 0:4] & 63, q[:, 4:8] & 63
    hi_sc = (q[:, 8:12] & 15) | ((q[:, 0:4] >> 6) << 4)
    hi_m = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return np.concatenate([lo_sc, hi_sc], 1).astype(F32), np.concatenate([lo_m, hi_m], 1).astype(F32)


def _q45_k(x: np.ndarray, qw: np.ndarray, ws: Scratch, nmax: int) -> tuple:
    """quantize_row_q{4,5}_K_impl: 8 sub-blocks of 32 by make_qkx3_quants, their scales and mins by
    make_qp_quants(63) weighted by the sub-blocks' weight sums."""
    B = x.shape[0]
    w = weights(x, qw, F32(2) * sum_squares(x, ws) / F32(256), 32, ws)
    sw = csum(w).reshape(B, 8).T  # [8, B]
    scale, the_min, L = make_qkx3(columns(x, 32, ws), w, nmax, ws)
    d, ls = make_qp(scale.reshape(B, 8).T, sw, 63)
    dmin, lm = make_qp(the_min.reshape(B, 8).T, sw, 63)
    if nmax == 31:  # Q5_K: MIN(63, .) on C's uint8 values; Q4_K stores them as they are
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    ls, lm = ls.T.astype(np.uint8), lm.T.astype(np.uint8)  # [B, 8]
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    sc, m = scale_min_k4(pack_scale_min_k4(ls, lm))  # what the stored bytes say
    dd = d16.astype(F32)[:, None] * sc
    dm = dmin16.astype(F32)[:, None] * m
    q = _requantize(x, dd, dm, L.T.reshape(B, 8, 32), 0, nmax)
    return d16, dmin16, ls, lm, q.reshape(B, 256)


def quantize_q4_k(x: np.ndarray, qw: np.ndarray, ws: Scratch) -> np.ndarray:
    return pack_q4_k(*_q45_k(x, qw, ws, 15))


def quantize_q5_k(x: np.ndarray, qw: np.ndarray, ws: Scratch) -> np.ndarray:
    return pack_q5_k(*_q45_k(x, qw, ws, 31))


def quantize_q2_k(x: np.ndarray, qw: np.ndarray, ws: Scratch) -> np.ndarray:
    """quantize_row_q2_K_impl: 16 sub-blocks of 16 by make_qkx3_quants(3), scales and mins by
    make_qp_quants(15), one byte each (scale | min << 4)."""
    B = x.shape[0]
    w = weights(x, qw, sum_squares(x, ws) / F32(256), 16, ws)
    sw = csum(w).reshape(B, 16).T  # [16, B]
    scale, the_min, L = make_qkx3(columns(x, 16, ws), w, 3, ws)
    d, ls = make_qp(scale.reshape(B, 16).T, sw, 15)
    dmin, lm = make_qp(the_min.reshape(B, 16).T, sw, 15)
    byte = (ls.T.astype(np.int64) | (lm.T.astype(np.int64) << 4)) & 0xFF  # C's uint8 store
    sc, mn = byte & 15, byte >> 4
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    dd = d16.astype(F32)[:, None] * sc.astype(F32)
    dm = dmin16.astype(F32)[:, None] * mn.astype(F32)
    q = _requantize(x, dd, dm, L.T.reshape(B, 16, 16), 0, 3)
    return pack_q2_k(d16, dmin16, sc, mn, q.reshape(B, 256))


def quantize_q3_k(x: np.ndarray, qw: np.ndarray, ws: Scratch) -> np.ndarray:
    """quantize_row_q3_K_impl: 16 sub-blocks of 16 by make_qx_quants(4), their scales by make_qx_quants(32)
    weighted by the sub-blocks' weight sums (6-bit, -32..31)."""
    B = x.shape[0]
    w = weights(x, qw, F32(2) * sum_squares(x, ws) / F32(256), 16, ws)
    sw = csum(w).reshape(B, 16).T  # [16, B]
    xs = columns(x, 16, ws)
    scale, best_is, zero = make_qx(xs, w, 4, ws)
    L = qx_codes(xs, best_is, zero, 4)  # [16, 16B]
    sc_cols = np.ascontiguousarray(scale.reshape(B, 16).T)
    d, bis, bz = make_qx(sc_cols, sw, 32, ws)
    sc = qx_codes(sc_cols, bis, bz, 32).T  # [B, 16] in -32..31
    d16 = d.astype(np.float16)
    q = _requantize(x, d16.astype(F32)[:, None] * sc, None, L.T.reshape(B, 16, 16), -4, 3)
    return pack_q3_k(d16, sc.astype(np.int8), q.reshape(B, 256))


def quantize_q6_k_w(x: np.ndarray, qw: np.ndarray, ws: Scratch) -> np.ndarray:
    """quantize_row_q6_K_impl: the reference path with the importance as make_qx_quants' weights."""
    return quantize_q6_k(x, ws, qw)
