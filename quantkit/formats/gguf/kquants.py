"""The K-quants with sub-block mins in numpy, byte for byte ggml's `quantize_row_q{2,4,5}_K_ref` (what
llama-quantize runs without an importance matrix): sub-blocks fitted as scale * L - min by
`make_qkx2_quants`, then their scales and mins quantized against the super-block's largest.

gguf-py can dequantize these types but has no quantizer for them. Each quantizer finds the block fields;
`quantkit.formats.gguf.layouts` packs them into bytes. The float32 C-order arithmetic is
`quantkit.formats.gguf.ggml_float`'s.
"""

from __future__ import annotations

import numpy as np

from quantkit.formats.gguf.ggml_float import F32, Scratch, columns, csum, dot, nearest_int
from quantkit.formats.gguf.layouts import pack_q2_k, pack_q4_k, pack_q5_k

# --------------------------------------------------------------------------------- Q2_K, Q4_K, Q5_K


def _qkx2(x: np.ndarray, w: np.ndarray, ws: Scratch, nmax: int, rmin: float, nstep: int, mad: bool) -> tuple:
    """ggml make_qkx2_quants(nmax, rmin, rdelta=0.1, nstep, use_mad): error sum w*|diff| or sum w*diff^2.

    x, w: [n, S] -> scale [S], min [S] (>= 0; value = scale*L - min), and what the codes L (0..nmax) are
    recomputed from where a caller needs them: the best trial's inverse scale and offset [S], and the
    flat sub-blocks (all codes 0). Fits x ~ a*L + b by weighted least squares for nstep + 1 trial inverse
    scales and keeps the best.
    """
    lo = np.minimum(x.min(axis=0), 0)  # [S]
    hi = x.max(axis=0)
    flat = hi == lo  # all codes 0, scale 0, min -lo
    lo = np.where(flat, hi - 1, lo)  # keeps hi - lo non-zero; flat results are overwritten at the end
    sum_w, sum_x = csum(w), dot(w, x)

    la, tmp = ws.get("la", x.shape), ws.get("tmp", x.shape)  # [32, S] scratch

    def codes(iscale: np.ndarray, lo: np.ndarray) -> np.ndarray:
        return nearest_int(np.multiply(iscale, np.subtract(x, lo, out=la), out=la), 0, nmax, out=la)

    def error(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # sum w * |a*L + b - x| or w * (a*L + b - x)^2
        diff = np.subtract(np.add(np.multiply(a, la, out=tmp), b, out=tmp), x, out=tmp)
        return dot(w, np.abs(diff, out=tmp) if mad else np.multiply(diff, diff, out=tmp))

    # float32 subnormal sub-blocks overflow 1 / (hi - lo) to inf, as in C
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (hi - lo)
        scale = F32(1) / iscale
        codes(iscale, lo)
        best = error(scale, lo)
        # the codes of the best step are recomputed by the caller, only where it needs them
        best_is, best_lo = iscale, lo.copy()
        for step in range(nstep + 1):
            # as in C, later steps measure from the best min found so far
            iscale = (F32(rmin) + F32(0.1) * F32(step) + F32(nmax)) / (hi - lo)
            codes(iscale, lo)
            sum_l, sum_l2, sum_xl = dot(w, la), dot(w, la, la), dot(w, la, x)  # C: w*l, w*l*l, w*l*x
            D = sum_w * sum_l2 - sum_l * sum_l
            a = (sum_w * sum_xl - sum_x * sum_l) / D
            b = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = b > 0  # the min may not be positive: refit the scale with b = 0
            a = np.where(clamp, sum_xl / sum_l2, a)
            b = np.where(clamp, F32(0), b)
            err = error(a, b)
            better = (D > 0) & (err < best)
            np.copyto(best_is, iscale, where=better)
            np.copyto(best_lo, lo, where=better)
            np.copyto(best, err, where=better)
            np.copyto(scale, a, where=better)
            np.copyto(lo, b, where=better)
    scale = np.where(flat, F32(0), scale)
    lo = np.where(flat, np.minimum(hi, 0), lo)
    return scale, -lo, best_is, best_lo, flat


def _sub_scales(v: np.ndarray, top: np.ndarray, qmax: int) -> np.ndarray:
    """Sub-block scales (or mins) v [B, per] against their largest ``top`` [B] (0: all codes 0) as C stores
    them: the unclamped nearest_int(qmax / top * v), int64 [B, per]; the caller wraps it to C's uint8."""
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(top > 0, F32(qmax) / top, F32(0))
    return nearest_int(inv[:, None] * v, None, None).astype(np.int64)


def _scale_min_fields(x: np.ndarray, ws: Scratch, kind: str, nmax: int, rmin: float, nstep: int) -> tuple:
    """float32 [B, 256] -> d, dmin fp16 [B], sub-block scales sc and mins mn uint8 [B, per], codes float32
    [B, 256] in 0..nmax: sub-blocks searched by make_qkx2_quants, then re-quantized with the stored scales.

    kind "q4_k" (also Q5_K): 8 sub-blocks of 32, weights sqrt(mean x^2) + |x|, squared error, 6-bit scales
    and mins (min(63, uint8)). "q2_k": 16 sub-blocks of 16, weights |x|, absolute error, 4-bit scales and
    mins sharing a byte (scale | min << 4, each wrapping as C's uint8 does)."""
    B = x.shape[0]
    n, qmax = (16, 15) if kind == "q2_k" else (32, 63)
    per = 256 // n
    xs = columns(x, n, ws)  # [n, per*B]: sub-block elements on axis 0
    w = ws.get("w", xs.shape)
    if kind == "q2_k":
        np.abs(xs, out=w)
    else:
        av_x = np.sqrt(dot(xs, xs) / F32(32))  # [8B]
        np.add(np.abs(xs, out=w), av_x, out=w)  # importance weights sqrt(mean x^2) + |x|
    scale, mn, best_is, best_lo, flat = _qkx2(xs, w, ws, nmax, rmin, nstep, mad=kind == "q2_k")
    scale, mn = scale.reshape(B, per), mn.reshape(B, per)

    max_scale = np.maximum(scale.max(axis=1), 0)  # [B]
    max_min = np.maximum(mn.max(axis=1), 0)
    ls, lm = _sub_scales(scale, max_scale, qmax), _sub_scales(mn, max_min, qmax)
    if kind == "q2_k":  # one byte: (uint8) ls | (uint8) (lm << 4)
        byte = (ls & 0xFF) | ((lm << 4) & 0xFF)
        ls, lm = byte & 15, byte >> 4
    else:
        ls, lm = np.minimum(ls & 0xFF, 63), np.minimum(lm & 0xFF, 63)
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    d16 = (max_scale / F32(qmax)).astype(np.float16)
    dmin16 = (max_min / F32(qmax)).astype(np.float16)

    # re-quantize with the stored (fp16-rounded, quantized) scales
    d = (d16.astype(F32)[:, None] * ls.astype(F32))[:, :, None]  # [B, per, 1]
    dm = (dmin16.astype(F32)[:, None] * lm.astype(F32))[:, :, None]
    q = ws.get("q", (B, per, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        nearest_int(np.divide(np.add(x.reshape(B, per, n), dm, out=q), d, out=q), 0, nmax, out=q)
    # sub-blocks with d = 0 keep the search's codes (C skips them)
    keep = np.flatnonzero(d.reshape(-1) == 0)
    if keep.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            L = nearest_int(best_is[keep] * (xs[:, keep] - best_lo[keep]), 0, nmax)
        q.reshape(-1, n)[keep] = np.where(flat[keep], F32(0), L).T
    return d16, dmin16, ls, lm, q.reshape(x.shape)


def quantize_q4_k(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 144] Q4_K blocks (make_qkx2_quants(15, rmin=-1, nstep=20))."""
    return pack_q4_k(*_scale_min_fields(x, ws or Scratch(), "q4_k", 15, -1.0, 20))


def quantize_q5_k(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 176] Q5_K blocks (make_qkx2_quants(31, rmin=-0.5, nstep=15))."""
    return pack_q5_k(*_scale_min_fields(x, ws or Scratch(), "q4_k", 31, -0.5, 15))


def quantize_q2_k(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 84] Q2_K blocks (make_qkx2_quants(3, rmin=-0.5, nstep=15,
    use_mad) on 16-element sub-blocks)."""
    return pack_q2_k(*_scale_min_fields(x, ws or Scratch(), "q2_k", 3, -0.5, 15))
