"""The K-quant quantizers in numpy, byte for byte ggml's `quantize_row_q{3,4,5,6}_K_ref` (what llama-quantize
runs without an importance matrix), and the ggml arithmetic they share.

gguf-py can dequantize these types but has no quantizer for them. Each quantizer finds the block fields;
`quantkit.formats.gguf.layouts` packs them into bytes.

Byte equality with libggml needs float32 arithmetic in C order. Both quantizers therefore lay a
sub-block's elements out along axis 0 -- arrays are [n, S] for S sub-blocks of n elements -- and every sum
runs as a loop over axis 0, vectorised over all S sub-blocks at once. Each product is formed in the C
order too, e.g. `(w * l) * x`. Rounding is ggml's `nearest_int`, round half to even.

Speed: each trial of the scale searches is a handful of passes over [n, S] buffers that a `Scratch` keeps
from chunk to chunk (a fresh multi-MB array per pass costs its page faults every time), and each
sum of products is one `einsum` pass (`_dot`) instead of a product pass plus a sum pass.
"""

from __future__ import annotations

import math

import numpy as np

from quantkit.formats.gguf.layouts import pack_q3_k, pack_q4_k, pack_q5_k, pack_q6_k

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml's threshold for an all-zero group
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits


class Scratch:
    """Named buffers (float32 unless told), grown on demand and reused: one per thread (a job's chunks share
    it). A fresh multi-MB array per pass costs its page faults every time."""

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type = F32) -> np.ndarray:
        size = math.prod(shape)
        buf = self._flat.get(name)
        if buf is None or buf.size < size:
            buf = self._flat[name] = _aligned(size, np.dtype(dtype))
        return buf[:size].reshape(shape)


def _aligned(size: int, dtype: np.dtype) -> np.ndarray:
    """np.empty(size, dtype) starting on a 64-byte boundary, as torch allocates (numpy's 16-byte alignment
    made torch's in-place ops on these buffers ~30 % slower: measured)."""
    raw = np.empty(size * dtype.itemsize + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + size * dtype.itemsize].view(dtype)


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


def nearest_int(v: np.ndarray, lo: int | None, hi: int | None, out: np.ndarray | None = None) -> np.ndarray:
    """ggml's `nearest_int` bit for bit, clamped to [lo, hi] (None: not clamped): float32 [...] -> float32 [...]
    (into ``out``, which may be v itself). Like C, it adds 1.5 * 2**23 and keeps the low 23 mantissa bits:
    round half to even below 2**22 and C's very result above it or for inf and NaN (a subnormal super-scale
    makes such values), where np.rint would disagree."""
    out = np.add(v, _MAGIC, out=out, dtype=F32)
    i = out.view(np.int32)
    np.bitwise_and(i, 0x7FFFFF, out=i)
    np.subtract(i, 0x400000, out=i)
    if lo is not None:
        np.clip(i, lo, hi, out=i)
    np.copyto(out, i, casting="unsafe")
    return out


def signed_absmax(x: np.ndarray, axis: int, lo: np.ndarray | None = None, hi: np.ndarray | None = None) -> np.ndarray:
    """2-D x -> per row (axis 1) or column (axis 0) the first element of largest magnitude, with its sign (C's
    strict '>' scan); +0.0 for all-zero ones. ``lo``, ``hi``: their min and max when the caller has them.
    Only rows holding both +a and -a need the scan's order."""
    hi = x.max(axis=axis) if hi is None else hi
    lo = x.min(axis=axis) if lo is None else lo
    m = np.where(hi > -lo, hi, lo)
    tie = np.flatnonzero(hi == -lo)
    if tie.size:
        sub = np.take(x, tie, axis=1 - axis)
        i = np.expand_dims(np.abs(sub).argmax(axis=axis), axis)  # the first index of the maximum
        first = np.take_along_axis(sub, i, axis=axis).reshape(-1)
        m.reshape(-1)[tie] = np.where(first != 0, first, F32(0))
    return m


def _columns(x: np.ndarray, n: int, ws: Scratch) -> np.ndarray:
    """float32 [B, 256] -> [n, 256B/n]: each n-element sub-block becomes a column (a scratch copy)."""
    xs = ws.get("xs", (n, x.size // n))
    np.copyto(xs, x.reshape(-1, n).T)
    return xs


# --------------------------------------------------------------------------------------- Q4_K, Q5_K


def _qkx2(x: np.ndarray, w: np.ndarray, ws: Scratch, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """ggml make_qkx2_quants(nmax, rmin, rdelta=0.1, nstep, squared error).

    x, w: [32, S] -> scale [S], min [S] (>= 0; value = scale*L - min), and what the codes L (0..nmax) are
    recomputed from where a caller needs them: the best trial's inverse scale and offset [S], and the
    flat sub-blocks (all codes 0). Fits x ~ a*L + b by weighted least squares for nstep + 1 trial inverse
    scales and keeps the best.
    """
    lo = np.minimum(x.min(axis=0), 0)  # [S]
    hi = x.max(axis=0)
    flat = hi == lo  # all codes 0, scale 0, min -lo
    lo = np.where(flat, hi - 1, lo)  # keeps hi - lo non-zero; flat results are overwritten at the end
    sum_w, sum_x = _csum(w), _dot(w, x)

    la, tmp = ws.get("la", x.shape), ws.get("tmp", x.shape)  # [32, S] scratch

    def codes(iscale: np.ndarray, lo: np.ndarray) -> np.ndarray:
        return nearest_int(np.multiply(iscale, np.subtract(x, lo, out=la), out=la), 0, nmax, out=la)

    def error(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # sum w * (a*L + b - x)^2
        diff = np.subtract(np.add(np.multiply(a, la, out=tmp), b, out=tmp), x, out=tmp)
        return _dot(w, np.multiply(diff, diff, out=tmp))

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


def _to_6bit(v: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """min(63, (uint8) nearest_int(inv*v)); the uint8 cast wraps as in C. [B, 8] -> uint8 [B, 8]."""
    q = nearest_int(inv[:, None] * v, None, None).astype(np.int64) & 0xFF
    return np.minimum(q, 63).astype(np.uint8)


def _scale_min_fields(x: np.ndarray, ws: Scratch, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: float32 [B, 256] -> d, dmin fp16 [B], 6-bit sc, mn uint8 [B, 8], codes float32 [B, 256]
    in 0..nmax: 32-element sub-blocks searched by make_qkx2_quants, then re-quantized with the stored scales."""
    B = x.shape[0]
    xs = _columns(x, 32, ws)  # [32, 8B]: sub-block elements on axis 0
    av_x = np.sqrt(_dot(xs, xs) / F32(32))  # [8B]
    w = np.abs(xs, out=ws.get("w", xs.shape))
    w += av_x  # importance weights sqrt(mean x^2) + |x|
    scale, mn, best_is, best_lo, flat = _qkx2(xs, w, ws, nmax, rmin, nstep)
    scale, mn = scale.reshape(B, 8), mn.reshape(B, 8)

    max_scale = np.maximum(scale.max(axis=1), 0)  # [B]
    max_min = np.maximum(mn.max(axis=1), 0)
    with np.errstate(divide="ignore", over="ignore"):
        ls = _to_6bit(scale, np.where(max_scale > 0, F32(63) / max_scale, F32(0)))  # [B, 8]
        lm = _to_6bit(mn, np.where(max_min > 0, F32(63) / max_min, F32(0)))
    d16 = (max_scale / F32(63)).astype(np.float16)
    dmin16 = (max_min / F32(63)).astype(np.float16)

    # re-quantize with the stored (fp16-rounded, 6-bit) scales
    d = (d16.astype(F32)[:, None] * ls.astype(F32))[:, :, None]  # [B, 8, 1]
    dm = (dmin16.astype(F32)[:, None] * lm.astype(F32))[:, :, None]
    q = ws.get("q", (B, 8, 32))
    with np.errstate(divide="ignore", invalid="ignore"):
        nearest_int(np.divide(np.add(x.reshape(B, 8, 32), dm, out=q), d, out=q), 0, nmax, out=q)
    # sub-blocks with d = 0 keep the search's codes (C skips them)
    keep = np.flatnonzero(d.reshape(-1) == 0)
    if keep.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            L = nearest_int(best_is[keep] * (xs[:, keep] - best_lo[keep]), 0, nmax)
        q.reshape(-1, 32)[keep] = np.where(flat[keep], F32(0), L).T
    return d16, dmin16, ls, lm, q.reshape(x.shape)


def quantize_q4_k(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 144] Q4_K blocks (make_qkx2_quants(15, rmin=-1, nstep=20))."""
    return pack_q4_k(*_scale_min_fields(x, ws or Scratch(), 15, -1.0, 20))


def quantize_q5_k(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 176] Q5_K blocks (make_qkx2_quants(31, rmin=-0.5, nstep=15))."""
    return pack_q5_k(*_scale_min_fields(x, ws or Scratch(), 31, -0.5, 15))


# ---------------------------------------------------------------------------------------------- Q6_K


def _qx(x: np.ndarray, ws: Scratch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml make_qx_quants(nmax=32, rmse_type=1): weights x^2, 19 trial scales -32.9/m .. -31.1/m.

    x: [16, S] -> signed scale [S] (value = scale*c), the best trial's inverse scale [S] (the codes are
    c = clamp(nearest(iscale*x), -32, 31), recomputed by the caller where it needs them) and the all-zero
    columns (stored codes 0, i.e. c = -32).
    """
    m = signed_absmax(x, 0)
    zero = np.abs(m) < GROUP_MAX_EPS
    m = np.where(zero, F32(1), m)
    w = np.multiply(x, x, out=ws.get("w", x.shape))
    wx = np.multiply(w, x, out=ws.get("wx", x.shape))  # the first product of C's left-to-right w*x*l
    l = ws.get("l", x.shape)  # noqa: E741  [16, S]

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # sum w*x*l, sum w*l*l
        nearest_int(np.multiply(iscale, x, out=l), -32, 31, out=l)
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


def quantize_q6_k(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 210] Q6_K blocks."""
    ws = ws or Scratch()
    B = x.shape[0]
    xs = _columns(x, 16, ws)  # [16, 16B]
    scale, best_is, zero_sub = _qx(xs, ws)
    scale = scale.reshape(B, 16)

    big = signed_absmax(scale, 1)  # [B]
    zero = np.abs(big) < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(zero, F32(1), big)
    d16 = (F32(1) / iscale).astype(np.float16)
    sc = nearest_int(iscale[:, None] * scale, -128, 127).astype(np.int8)  # [B, 16]; C: MIN(127, .)

    d = (d16.astype(F32)[:, None] * sc.astype(F32))[:, :, None]  # [B, 16, 1]
    q = ws.get("q", (B, 16, 16))
    with np.errstate(divide="ignore", invalid="ignore"):
        nearest_int(np.divide(x.reshape(B, 16, 16), d, out=q), -32, 31, out=q)
    # sub-blocks with d = 0 keep the search's codes (C skips them)
    keep = np.flatnonzero(d.reshape(-1) == 0)
    if keep.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            L = nearest_int(best_is[keep] * xs[:, keep], -32, 31)
        q.reshape(-1, 16)[keep] = np.where(zero_sub[keep], F32(-32), L).T
    out = pack_q6_k(d16, sc, q.reshape(x.shape))
    out[zero] = 0  # C zeroes a super-block whose sub-block scales are all ~0
    return out


# ---------------------------------------------------------------------------------------------- Q3_K


def _q3(x: np.ndarray, ws: Scratch) -> tuple[np.ndarray, np.ndarray]:
    """ggml make_q3_quants(nmax=4, do_rmse=true): weights x^2; codes from the signed largest value, then up
    to 5 passes that move one code at a time (in element order) while the weighted fit improves.

    x: [16, S] -> scale [S] (value = scale*c) and codes c float32 [16, S] in -4..3 (stored 0, c = -4, for
    all-zero columns). A pass that changes nothing in a column leaves it as it was, so columns that C
    stopped early take the remaining passes unchanged.
    """
    m = signed_absmax(x, 0)
    zero = np.abs(m) < GROUP_MAX_EPS
    m = np.where(zero, F32(1), m)
    w = np.multiply(x, x, out=ws.get("w", x.shape))
    wx = np.multiply(w, x, out=ws.get("wx", x.shape))  # C's w*x[i]*l multiplies left to right
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L = nearest_int((F32(-4) / m) * x, -4, 3)  # [16, S]
        sumlx, suml2 = _dot(wx, L), _dot(w, L, L)
        for _ in range(5):
            changed = False
            for i in range(16):
                slx = sumlx - wx[i] * L[i]
                sl2 = suml2 - (w[i] * L[i]) * L[i]
                new = nearest_int((x[i] * sl2) / slx, -4, 3)
                slx_new = slx + wx[i] * new
                sl2_new = sl2 + (w[i] * new) * new
                take = (slx > 0) & (new != L[i]) & (sl2_new > 0)
                take &= (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new
                if take.any():
                    changed = True
                    np.copyto(L[i], new, where=take)
                    np.copyto(sumlx, slx_new, where=take)
                    np.copyto(suml2, sl2_new, where=take)
            if not changed:
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, F32(-4), L)


def quantize_q3_k(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 110] Q3_K blocks: 16-element sub-blocks searched by
    make_q3_quants, their scales quantized to -32..31 against the signed largest one, codes re-quantized."""
    ws = ws or Scratch()
    B = x.shape[0]
    xs = _columns(x, 16, ws)  # [16, 16B]
    scale, L = _q3(xs, ws)
    scale = scale.reshape(B, 16)
    big = signed_absmax(scale, 1)  # [B]
    some = big != 0  # C: if (max_scale); otherwise every stored scale byte is 0 (sc = -32) and d = 0
    iscale = F32(-32) / np.where(some, big, F32(1))
    sc = np.where(some[:, None], nearest_int(iscale[:, None] * scale, -32, 31), F32(-32))  # [B, 16]
    d16 = np.where(some, F32(1) / iscale, F32(0)).astype(np.float16)

    d = (d16.astype(F32)[:, None] * sc)[:, :, None]  # [B, 16, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = nearest_int(x.reshape(B, 16, 16) / d, -4, 3)
    keep = np.flatnonzero(d.reshape(-1) == 0)  # C skips these sub-blocks: the search's codes stay
    q.reshape(-1, 16)[keep] = L[:, keep].T
    return pack_q3_k(d16, sc.astype(np.int8), q.reshape(x.shape))
