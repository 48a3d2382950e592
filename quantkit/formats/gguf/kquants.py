"""Q4_K and Q6_K quantizers in numpy, following ggml's `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref`.

gguf-py can dequantize these types but has no quantizer for them.

Byte equality with libggml needs float32 arithmetic in C order. Both quantizers therefore lay a
sub-block's elements out along axis 0 -- arrays are [n, S] for S sub-blocks of n elements -- and every sum
runs as a loop over axis 0, vectorised over all S sub-blocks at once. Each product is formed in the C
order too, e.g. `(w * l) * x`. Rounding is ggml's `nearest_int`, round half to even.

Speed: each trial of the scale searches is a handful of passes over [n, S] buffers that a `Scratch` keeps
from chunk to chunk (a fresh multi-MB array per pass costs its page faults every time), and each
sum of products is one `einsum` pass (`_dot`) instead of a product pass plus a sum pass.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # elements per super-block
Q4_K_BYTES = 2 + 2 + 12 + QK_K // 2  # d | dmin | scales[12] | qs[128]
Q6_K_BYTES = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2  # ql[128] | qh[64] | scales[16] | d

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml's threshold for an all-zero group


class Scratch:
    """Named float32 buffers, grown on demand and reused: one per thread (a job's chunks share it)."""

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        buf = self._flat.get(name)
        if buf is None or buf.size < size:
            buf = self._flat[name] = np.empty(size, dtype=F32)
        return buf[:size].reshape(shape)


def _csum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in index order, in float32: a C `for` loop, vectorised over the other axes.

    numpy reduces a C-contiguous array over its outer axis by adding row after row into one accumulator
    (pairwise summation applies only along the inner, contiguous axis), which is exactly this loop; the
    byte-equality tests against libggml would catch any other order."""
    return np.add.reduce(a, axis=0)


def _dot(*factors: np.ndarray) -> np.ndarray:
    """sum over axis 0 of the product of [n, S] factors: for each column, a C loop `s += (a*b)*c` in index
    order, float32 products multiplied left to right -- einsum's sum-of-products loop does exactly that
    in one pass (the byte-equality tests against libggml check it)."""
    spec = ",".join("ij" for _ in factors) + "->j"
    return np.einsum(spec, *factors)


def _nearest(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """ggml `nearest_int` (round half to even) clamped to [lo, hi], in place on the float32 temporary v."""
    return np.clip(np.rint(v, out=v), lo, hi, out=v)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 [B] -> uint8 [B, 2]: little-endian IEEE half, round to nearest even."""
    return v.astype(np.float16).astype("<f2").view(np.uint8).reshape(-1, 2)


def _columns(x: np.ndarray, n: int, ws: Scratch) -> np.ndarray:
    """float32 [B, 256] -> [n, 256B/n]: each n-element sub-block becomes a column (a scratch copy)."""
    xs = ws.get("xs", (n, x.size // n))
    np.copyto(xs, x.reshape(-1, n).T)
    return xs


# ---------------------------------------------------------------------------------------------- Q4_K


def _qkx2(x: np.ndarray, w: np.ndarray, ws: Scratch) -> tuple[np.ndarray, ...]:
    """ggml make_qkx2_quants(nmax=15, rmin=-1, rdelta=0.1, nstep=20, squared error).

    x, w: [32, S] -> scale [S], min [S] (>= 0; value = scale*L - min), and what the codes L (0..15) are
    recomputed from where a caller needs them: the best trial's inverse scale and offset [S], and the
    flat sub-blocks (all codes 0). Fits x ~ a*L + b by weighted least squares for 21 trial inverse scales
    and keeps the best.
    """
    lo = np.minimum(x.min(axis=0), 0)  # [S]
    hi = x.max(axis=0)
    flat = hi == lo  # all codes 0, scale 0, min -lo
    lo = np.where(flat, hi - 1, lo)  # keeps hi - lo non-zero; flat results are overwritten at the end
    sum_w, sum_x = _csum(w), _dot(w, x)

    la, tmp = ws.get("la", x.shape), ws.get("tmp", x.shape)  # [32, S] scratch

    def codes(iscale: np.ndarray, lo: np.ndarray) -> np.ndarray:
        return _nearest(np.multiply(iscale, np.subtract(x, lo, out=la), out=la), 0, 15)

    def error(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # sum w * (a*L + b - x)^2
        diff = np.subtract(np.add(np.multiply(a, la, out=tmp), b, out=tmp), x, out=tmp)
        return _dot(w, np.multiply(diff, diff, out=tmp))

    iscale = F32(15) / (hi - lo)
    scale = F32(1) / iscale
    codes(iscale, lo)
    best = error(scale, lo)
    # the codes of the best step are recomputed by the caller, only where it needs them
    best_is, best_lo = iscale, lo.copy()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(21):
            # as in C, later steps measure from the best min found so far
            iscale = (F32(-1) + F32(0.1) * F32(step) + F32(15)) / (hi - lo)
            codes(iscale, lo)
            sum_l, sum_l2, sum_xl = _dot(w, la), _dot(w, la, la), _dot(w, la, x)  # C: w*l, w*l*l, w*l*x
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


def _pack_q4_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins, uint8 [B, 8] each -> uint8 [B, 12]."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return np.concatenate(
        [lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 15) | ((hi_m & 15) << 4)], axis=1
    )


def _to_6bit(v: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """min(63, (uint8) nearest_int(inv*v)); the uint8 cast wraps as in C. [B, 8] -> uint8 [B, 8]."""
    q = np.rint(inv[:, None] * v).astype(np.int64) & 0xFF
    return np.minimum(q, 63).astype(np.uint8)


def quantize_q4_k(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 144] Q4_K blocks."""
    ws = ws or Scratch()
    B = x.shape[0]
    xs = _columns(x, 32, ws)  # [32, 8B]: sub-block elements on axis 0
    av_x = np.sqrt(_dot(xs, xs) / F32(32))  # [8B]
    w = np.abs(xs, out=ws.get("w", xs.shape))
    w += av_x  # importance weights sqrt(mean x^2) + |x|
    scale, mn, best_is, best_lo, flat = _qkx2(xs, w, ws)
    scale, mn = scale.reshape(B, 8), mn.reshape(B, 8)

    max_scale = np.maximum(scale.max(axis=1), 0)  # [B]
    max_min = np.maximum(mn.max(axis=1), 0)
    with np.errstate(divide="ignore"):
        ls = _to_6bit(scale, np.where(max_scale > 0, F32(63) / max_scale, F32(0)))  # [B, 8]
        lm = _to_6bit(mn, np.where(max_min > 0, F32(63) / max_min, F32(0)))
    d16 = (max_scale / F32(63)).astype(np.float16)
    dmin16 = (max_min / F32(63)).astype(np.float16)

    # re-quantize with the stored (fp16-rounded, 6-bit) scales
    d = (d16.astype(F32)[:, None] * ls.astype(F32))[:, :, None]  # [B, 8, 1]
    dm = (dmin16.astype(F32)[:, None] * lm.astype(F32))[:, :, None]
    q = ws.get("q", (B, 8, 32))
    with np.errstate(divide="ignore", invalid="ignore"):
        _nearest(np.divide(np.add(x.reshape(B, 8, 32), dm, out=q), d, out=q), 0, 15)
    # sub-blocks with d = 0 keep the search's codes (C skips them)
    keep = np.flatnonzero(d.reshape(-1) == 0)
    if keep.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            L = _nearest(best_is[keep] * (xs[:, keep] - best_lo[keep]), 0, 15)
        q.reshape(-1, 32)[keep] = np.where(flat[keep], F32(0), L).T
    qs = q.astype(np.uint8).reshape(B, 4, 2, 32)  # chunk of 64 = sub-blocks 2c (low nibble), 2c+1 (high)
    qs = (qs[:, :, 0] | (qs[:, :, 1] << 4)).reshape(B, 128)
    return np.concatenate([_fp16_bytes(d16), _fp16_bytes(dmin16), _pack_q4_k_scales(ls, lm), qs], axis=1)


# ---------------------------------------------------------------------------------------------- Q6_K


def _signed_absmax(x: np.ndarray, ws: Scratch) -> np.ndarray:
    """[n, S] -> [S]: per column, the first element of largest magnitude, with its sign (C's strict '>'
    scan); 0 for all-zero columns. Only columns holding both +a and -a need the scan's order."""
    amax = np.abs(x, out=ws.get("abs", x.shape)).max(axis=0)
    hi, lo = x.max(axis=0), x.min(axis=0)
    m = np.where(hi == amax, amax, -amax)
    tie = np.flatnonzero((hi == amax) & (lo == -amax) & (amax > 0))
    if tie.size:
        sub = x[:, tie]
        m[tie] = sub[np.abs(sub).argmax(axis=0), np.arange(tie.size)]
    return m


def _qx(x: np.ndarray, ws: Scratch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml make_qx_quants(nmax=32, rmse_type=1): weights x^2, 19 trial scales -32.9/m .. -31.1/m.

    x: [16, S] -> signed scale [S] (value = scale*(L - 32)), the best trial's inverse scale [S] (the codes
    are L = 32 + clamp(nearest(iscale*x), -32, 31), recomputed by the caller where it needs them) and the
    all-zero columns (codes 0).
    """
    m = _signed_absmax(x, ws)
    zero = np.abs(m) < GROUP_MAX_EPS
    m = np.where(zero, F32(1), m)
    w = np.multiply(x, x, out=ws.get("w", x.shape))
    wx = np.multiply(w, x, out=ws.get("wx", x.shape))  # the first product of C's left-to-right w*x*l
    l = ws.get("l", x.shape)  # noqa: E741  [16, S]

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # sum w*x*l, sum w*l*l
        _nearest(np.multiply(iscale, x, out=l), -32, 31)
        return _dot(wx, l), _dot(w, l, l)

    with np.errstate(divide="ignore", invalid="ignore"):
        best_is = F32(-32) / m
        sumlx, suml2 = sums(best_is)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for t in (*range(-9, 0), *range(1, 10)):
            iscale = -(F32(32) + F32(0.1) * F32(t)) / m
            sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            np.copyto(best_is, iscale, where=better)
            np.copyto(scale, sumlx / suml2, where=better)
            np.copyto(best, scale * sumlx, where=better)
    return np.where(zero, F32(0), scale), best_is, zero


def _pack_q6_k_quants(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes uint8 [B, 256] in 0..63 -> ql uint8 [B, 128], qh uint8 [B, 64]."""
    B = q.shape[0]
    q = q.reshape(B, 2, 4, 32)  # half n, quarter k (elements 128n + 32k + l), l
    lo, hi = q & 15, q >> 4
    ql = (lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)).reshape(B, 128)  # [B, 2, 2, 32]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [B, 2, 32]
    return ql, qh.reshape(B, 64)


def quantize_q6_k(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 210] Q6_K blocks."""
    ws = ws or Scratch()
    B = x.shape[0]
    xs = _columns(x, 16, ws)  # [16, 16B]
    scale, best_is, zero_sub = _qx(xs, ws)
    scale = scale.reshape(B, 16)

    imax = np.abs(scale).argmax(axis=1)
    big = scale[np.arange(B), imax]  # [B] signed scale of largest magnitude
    zero = np.abs(big) < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(zero, F32(1), big)
    d16 = (F32(1) / iscale).astype(np.float16)
    sc = np.minimum(np.rint(iscale[:, None] * scale), 127).astype(np.int8)  # [B, 16]

    d = (d16.astype(F32)[:, None] * sc.astype(F32))[:, :, None]  # [B, 16, 1]
    q = ws.get("q", (B, 16, 16))
    with np.errstate(divide="ignore", invalid="ignore"):
        _nearest(np.divide(x.reshape(B, 16, 16), d, out=q), -32, 31)
    q += F32(32)
    # sub-blocks with d = 0 keep the search's codes (C skips them)
    keep = np.flatnonzero(d.reshape(-1) == 0)
    if keep.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            L = _nearest(best_is[keep] * xs[:, keep], -32, 31) + F32(32)
        q.reshape(-1, 16)[keep] = np.where(zero_sub[keep], F32(0), L).T
    ql, qh = _pack_q6_k_quants(q.astype(np.uint8).reshape(B, QK_K))
    out = np.concatenate([ql, qh, sc.view(np.uint8), _fp16_bytes(d16)], axis=1)
    out[zero] = 0
    return out
