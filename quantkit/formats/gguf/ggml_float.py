"""ggml's float32 arithmetic in numpy, bit for bit: the rounding, scans and C-order sums its reference
quantizers (``quantize_row_*_ref``) are built from, shared by quantkit's encoders of the K and IQ4 types.

Byte equality with libggml needs float32 arithmetic in C order. The quantizers therefore lay a sub-block's
elements out along axis 0 -- arrays are [n, S] for S sub-blocks of n elements -- and every sum runs as a
loop over axis 0, vectorised over all S sub-blocks at once. Each product is formed in the C order too,
e.g. `(w * l) * x`. Rounding is ggml's `nearest_int`, round half to even.

Speed: each trial of the scale searches is a handful of passes over [n, S] buffers that a `Scratch` keeps
from chunk to chunk (a fresh multi-MB array per pass costs its page faults every time), and each
sum of products is one `einsum` pass (`dot`) instead of a product pass plus a sum pass.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml's threshold for an all-zero group
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits
# C's roundf(v) = trunc(v + copysign(BELOW_HALF, v)), BELOW_HALF the float32 just below 0.5: an exact tie
# v = k + 0.5 reaches k + 1 (the sum rounds up by ties-to-even), anything below a tie stays under k + 1
BELOW_HALF = np.nextafter(F32(0.5), F32(0))


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


def csum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in index order, in float32: a C `for` loop, vectorised over the other axes.

    numpy reduces a C-contiguous array over its outer axis by adding row after row into one accumulator
    (pairwise summation applies only along the inner, contiguous axis), which is exactly this loop; the
    byte-equality tests against libggml would catch any other order."""
    return np.add.reduce(a, axis=0)


def dot(*factors: np.ndarray) -> np.ndarray:
    """sum over axis 0 of the product of [n, S] factors: for each column, a C loop `s += (a*b)*c` in index
    order, float32 products multiplied left to right -- einsum's sum-of-products loop does exactly that
    in one pass (the byte-equality tests against libggml check it)."""
    spec = ",".join("ij" for _ in factors) + "->j"
    return np.einsum(spec, *factors)


def roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf on float32 [...] (halves away from zero; numpy's round is half to even)."""
    return np.trunc(v + np.copysign(BELOW_HALF, v))


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


def columns(x: np.ndarray, n: int, ws: Scratch, name: str = "xs") -> np.ndarray:
    """float32 [B, 256] -> [n, 256B/n]: each n-element sub-block becomes a column (a scratch copy, ``name``)."""
    xs = ws.get(name, (n, x.size // n))
    np.copyto(xs, x.reshape(-1, n).T)
    return xs
