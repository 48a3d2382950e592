"""Q1_0 and Q2_0, the 1- and 2-bit block types of the pinned llama.cpp: their reference quantizers (byte-identical
to ggml's ``quantize_row_q1_0_ref`` / ``quantize_row_q2_0_ref``) and their decoders (gguf-py has none: it knows
Q1_0's size but not Q2_0 at all, see ``ggml_types``). llama-quantize's ``quantize_q1_0`` / ``quantize_q2_0``
ignore an importance matrix (they call the reference row by row), so these are also the --imatrix bytes.

| type | block | stored               | value                          |
|------|-------|----------------------|--------------------------------|
| Q1_0 | 128   | fp16 d = mean abs(x) | +d where x >= 0, else -d       |
| Q2_0 | 64    | fp16 d = max abs(x)  | d * c, c = roundf(x / d) in -1..2 (the reference never writes 2) |

The block bytes are written by ``layouts.pack_q1_0`` / ``pack_q2_0``.
Shapes: blocks x float32 [B, block] -> uint8 [B, 18]; rows uint8 [R, row_bytes] -> float32 [R, n].
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from quantkit.formats.gguf.ggml_float import F32, Scratch, csum, roundf
from quantkit.formats.gguf.layouts import pack_q1_0, pack_q2_0


def quantize_q1_0(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """[B, 128] -> [B, 18]: d = (sum of abs(x), added left to right in float32) / 128, bit j = x_j >= 0."""
    d = csum(np.ascontiguousarray(np.abs(x).T)) / F32(128)  # [B]: C's loop, in index order
    return pack_q1_0(d, (x >= 0).astype(np.int8))


def quantize_q2_0(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """[B, 64] -> [B, 18]: d = max abs(x), id = 1/d (0 for an all-zero block), q = clamp(int(roundf(x*id)), -1, 2)."""
    d = np.abs(x).max(axis=1, keepdims=True)  # [B, 1]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.where(d > 0, F32(1) / d, F32(0)).astype(F32)  # inf for a subnormal d, as in C
        v = roundf(x * inv)
    # C's (int) of inf or NaN (x * inf) is INT_MIN on x86, clamped to code -1
    codes = np.clip(np.where(np.isfinite(v), v, F32(-(2**31))), -1, 2).astype(np.int8)
    return pack_q2_0(d, codes)


def dequantize_q1_0(blocks: np.ndarray) -> np.ndarray:
    """uint8 [B, 18] -> float32 [B, 128]: bit j of byte l (weight 8 l + j) set: +d, else -d."""
    d = blocks[:, :2].copy().view("<f2").astype(F32)  # [B, 1]
    bits = np.unpackbits(blocks[:, 2:], axis=1, bitorder="little")  # [B, 128]
    return np.where(bits == 1, d, -d)


def dequantize_q2_0(blocks: np.ndarray) -> np.ndarray:
    """uint8 [B, 18] -> float32 [B, 64]: bits 2j, 2j + 1 of byte l hold u of weight 4 l + j; value (u - 1) * d."""
    d = blocks[:, :2].copy().view("<f2").astype(F32)  # [B, 1]
    u = (blocks[:, 2:, None] >> np.arange(0, 8, 2, dtype=np.uint8)) & 3  # [B, 16, 4]
    with np.errstate(invalid="ignore"):  # 0 * inf (d past fp16's range) is NaN, as in C
        return (u.reshape(-1, 64).astype(F32) - F32(1)) * d


QUANTIZERS = {QT.Q1_0: quantize_q1_0, QT.Q2_0: quantize_q2_0}
DEQUANTIZERS = {QT.Q1_0: dequantize_q1_0, QT.Q2_0: dequantize_q2_0}


def dequantize_lowbit(data: np.ndarray, qtype: QT) -> np.ndarray:
    """uint8 [R, row_bytes] (or any shape holding whole blocks) -> float32 [R, n]."""
    blk, size = GGML_QUANT_SIZES[qtype]
    rows = data.reshape(-1, data.shape[-1]) if data.ndim else data.reshape(1, -1)
    out = DEQUANTIZERS[qtype](np.ascontiguousarray(rows).reshape(-1, size))
    return out.reshape(*data.shape[:-1], data.shape[-1] // size * blk)
