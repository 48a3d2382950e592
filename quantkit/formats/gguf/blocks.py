"""ggml block formats: quantize float rows to the bytes ggml stores, and map integer codes onto blocks.

Q8_0 and Q4_0 are quantkit's own torch quantizers (vectorised over blocks,
byte-identical to ggml's `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`, all-zero blocks included);
Q4_1, Q5_0 and F32/F16/BF16 go through gguf-py; Q4_K and Q6_K come from `quantkit.formats.gguf.kquants`.
Shapes: x float32 [R, n] (R rows, n along ne0, the HF `in` dimension) -> uint8 [R, n / block * type_bytes].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from quantkit.formats.gguf.kquants import Scratch, quantize_q4_k, quantize_q6_k

GGUF_PY_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q4_1, QT.Q5_0, QT.Q5_1)
# no reference quantizer here: quantkit's own grid search (block_grids) with unit weights
GRID_ONLY_TYPES = (QT.Q3_K, QT.Q5_K)
K_QUANTIZERS = {QT.Q4_K: quantize_q4_k, QT.Q6_K: quantize_q6_k}
CHUNK_BLOCKS = 1024  # K-quant super-blocks per numpy pass (256K weights): fastest of 256-2048 here


def block_size(qtype: QT) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: QT, n: int) -> int:
    """Bytes ggml uses for one row of n elements."""
    blk, size = GGML_QUANT_SIZES[qtype]
    return n // blk * size


def check_rows(x: np.ndarray, qtype: QT) -> None:
    if x.ndim != 2:
        raise ValueError(f"expected 2-D rows [R, n], got shape {x.shape}")
    if x.shape[1] % (blk := block_size(qtype)):
        raise ValueError(f"row length {x.shape[1]} is not a multiple of {qtype.name}'s block {blk}")


class NonFiniteError(ValueError):
    """The weights given to a quantizer hold NaN or inf."""


def _finite(a: np.ndarray) -> bool:
    """Whether float32 ``a`` holds no NaN or inf: its sum is finite exactly then, unless finite values
    overflow it, and only such a sum is checked element by element."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.add.reduce(a, axis=None))) or bool(np.isfinite(a).all())


def _quantize_k(x: np.ndarray | torch.Tensor, qtype: QT) -> np.ndarray:
    """K-quant rows chunk by chunk (a torch tensor of any float dtype is converted to float32 per chunk);
    raises NonFiniteError on NaN or inf."""
    R, n = x.shape
    blocks = x.reshape(-1, 256)  # [R * n/256, 256]: super-blocks in row order
    out = np.empty((blocks.shape[0], GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    ws = Scratch()  # this call's buffers, reused by every chunk
    f32 = torch.empty(min(CHUNK_BLOCKS, blocks.shape[0]), 256) if isinstance(x, torch.Tensor) else None
    for s in range(0, blocks.shape[0], CHUNK_BLOCKS):
        chunk = blocks[s : s + CHUNK_BLOCKS]
        chunk = f32[: chunk.shape[0]].copy_(chunk).numpy() if f32 is not None else chunk
        if not _finite(chunk):
            raise NonFiniteError("NaN or inf in the weights")
        out[s : s + CHUNK_BLOCKS] = K_QUANTIZERS[qtype](chunk, ws)
    return out.reshape(R, row_bytes(qtype, n))


# ------------------------------------------------------------------ Q8_0 / Q4_0 in torch


# roundf(v) = trunc(v + copysign(H, v)) with H the float32 just below 0.5: an exact tie v = k + 0.5 reaches
# k + 1 (the sum rounds up by ties-to-even), anything below a tie stays under k + 1.
_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))


@dataclass
class _Scratch:
    """Buffers one chunk of B blocks reuses: a fresh multi-MB tensor per op costs its page faults again."""

    x: torch.Tensor  # float32 [B, 32]: the blocks, overwritten by the quantizer
    t: torch.Tensor  # float32 [B, 32]
    q: torch.Tensor  # int8 [B, 32]

    @classmethod
    def of(cls, B: int) -> _Scratch:
        return cls(torch.empty(B, 32), torch.empty(B, 32), torch.empty(B, 32, dtype=torch.int8))

    def view(self, B: int) -> _Scratch:
        return _Scratch(self.x[:B], self.t[:B], self.q[:B])


def _store_fp16(out: torch.Tensor, d: torch.Tensor) -> None:
    """float32 [B, 1] -> out uint8 [B, 2]: IEEE half, round to nearest even, little-endian (x86 / arm64)."""
    out.copy_(d.to(torch.float16).view(torch.uint8))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d == 0 (ggml's `id = d ? 1.0f/d : 0.0f`)."""
    return (1.0 / d).masked_fill_(d == 0, 0.0)


def quantize_q8_0_torch(s: _Scratch, lo: torch.Tensor, hi: torch.Tensor, out: torch.Tensor) -> None:
    """Blocks s.x (lo, hi [B, 1]: their min and max) -> out uint8 [B, 34]: d = amax/127 (fp32), id = 1/d,
    code = roundf(x*id) (halves away from zero), d stored as fp16. Overwrites s."""
    amax = torch.maximum(hi, lo.neg()).abs_()  # max |x|; abs_: +0.0 for an all-zero block, as C's fabsf
    d = amax / torch.full_like(amax, 127.0)  # a true division (ATen may turn "/ scalar" into "* (1/127)")
    v = s.x.mul_(_inverse(d))
    v += torch.sign(v, out=s.t).mul_(_BELOW_HALF)
    s.q.copy_(v)  # the cast truncates
    _store_fp16(out[:, :2], d)
    out[:, 2:].copy_(s.q.view(torch.uint8))


def _signed_absmax(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[B, 32] -> [B, 1]: the first element of largest magnitude, with its sign; +0.0 for all-zero blocks."""
    m = torch.where(hi > -lo, hi, lo)
    tie = (hi == -lo).view(-1).nonzero().view(-1)  # +a and -a both present (or all zeros): which comes first
    if tie.numel():
        sub = x.index_select(0, tie)
        a = sub.abs()
        i = a.argmax(dim=1, keepdim=True)  # the first index of the maximum
        m[tie] = torch.where(a.gather(1, i) > 0, sub.gather(1, i), 0.0)
    return m


def quantize_q4_0_torch(s: _Scratch, lo: torch.Tensor, hi: torch.Tensor, out: torch.Tensor) -> None:
    """Blocks s.x (lo, hi [B, 1]: their min and max) -> out uint8 [B, 18]: m = the signed element of
    largest magnitude (the first on ties; +0 when the block is all zeros), d = m / -8, id = 1/d,
    code = min(15, trunc(x*id + 8.5)); byte j holds element j (low nibble) and element j + 16 (high).
    Overwrites s."""
    d = _signed_absmax(s.x, lo, hi) / -8.0  # an all-zero block stores d = -0.0, as C does
    # C casts to int8_t (truncation; on x86 inf/NaN from a tiny subnormal d become 0), then takes min(15, .)
    s.q.copy_(s.x.mul_(_inverse(d)).add_(8.5))
    q64 = s.q.clamp_(max=15).view(torch.int64)  # [B, 4]: elements 0-7, 8-15 | 16-23, 24-31, 0..15 each
    _store_fp16(out[:, :2], d)
    out[:, 2:].copy_((q64[:, :2] | (q64[:, 2:] << 4)).view(torch.uint8))  # [B, 16]


TORCH_QUANTIZERS = {QT.Q8_0: quantize_q8_0_torch, QT.Q4_0: quantize_q4_0_torch}
TORCH_CHUNK_BLOCKS = 16384  # 512K weights per torch pass: fastest of 1K-64K blocks (per-op overhead vs. cache)


def _all_finite(lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """Whether blocks with these mins and maxes hold no NaN or inf: a block's min or max is NaN or infinite
    exactly then. One sum decides the common case; only a sum that overflows looks element by element."""
    if math.isfinite(float(lo.sum()) + float(hi.sum())):
        return True
    return bool(torch.isfinite(lo).all() & torch.isfinite(hi).all())


def quantize_rows_torch(x: torch.Tensor, qtype: QT) -> torch.Tensor:
    """float [R, n] (float32, bf16 or fp16: converted chunk by chunk) -> uint8 [R, row_bytes], for Q8_0 / Q4_0
    (torch) and the K-quants (numpy). Raises NonFiniteError on NaN or inf: Q8_0 / Q4_0 see them in each
    block's min and max, which both need (so no separate pass checks the input), the K-quants in a sum."""
    if qtype in K_QUANTIZERS:
        return torch.from_numpy(_quantize_k(x, qtype))
    R, n = x.shape
    blocks = x.reshape(-1, 32)  # [R * n/32, 32]
    out = torch.empty((blocks.shape[0], GGML_QUANT_SIZES[qtype][1]), dtype=torch.uint8)
    fn, scratch = TORCH_QUANTIZERS[qtype], _Scratch.of(min(TORCH_CHUNK_BLOCKS, blocks.shape[0]))
    for s in range(0, blocks.shape[0], TORCH_CHUNK_BLOCKS):
        src = blocks[s : s + TORCH_CHUNK_BLOCKS]
        buf = scratch.view(src.shape[0])
        buf.x.copy_(src)
        # amax and amin separately: aminmax over a 32-wide row is ~5x slower than the two
        hi, lo = buf.x.amax(dim=1, keepdim=True), buf.x.amin(dim=1, keepdim=True)
        if not _all_finite(lo, hi):
            raise NonFiniteError("NaN or inf in the weights")
        fn(buf, lo, hi, out[s : s + src.shape[0]])
    return out.reshape(R, row_bytes(qtype, n))


def quantize_rows(x: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 [R, n] (n a multiple of the block size) -> uint8 [R, n/block*type_bytes], as ggml stores it."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_rows(x, qtype)
    if qtype in K_QUANTIZERS:
        return _quantize_k(x, qtype)
    if qtype in TORCH_QUANTIZERS:
        return quantize_rows_torch(torch.from_numpy(x), qtype).numpy()
    if qtype in GRID_ONLY_TYPES:
        from quantkit.formats.gguf.grids import choose_grid, rtn_on_grid

        w = torch.from_numpy(x)
        return rtn_on_grid(w, choose_grid(w, qtype)).blocks()
    if qtype not in GGUF_PY_TYPES:
        raise NotImplementedError(f"no quantizer for {qtype.name}")
    out = np.ascontiguousarray(gq.quantize(x, qtype))
    return out.view(np.uint8).reshape(x.shape[0], row_bytes(qtype, x.shape[1]))


def dequantize_rows(data: np.ndarray, qtype: QT) -> np.ndarray:
    """uint8 [R, row_bytes] -> float32 [R, n] (gguf-py's dequantizer, any type it knows)."""
    if data.dtype != np.uint8:
        raise TypeError(f"expected the raw uint8 bytes of {qtype.name} rows, got {data.dtype}")
    return gq.dequantize(np.ascontiguousarray(data), qtype).astype(np.float32, copy=False)


# ------------------------------------------------------------- integer codes -> blocks


def _blocks_of(codes: np.ndarray, *scales: np.ndarray) -> tuple[np.ndarray, ...]:
    """codes [R, n] and per-32-run params [R, n/32] -> codes [R*n/32, 32] and params [R*n/32, 1]."""
    R, n = codes.shape
    if n % 32:
        raise ValueError(f"row length {n} is not a multiple of 32")
    for s in scales:
        if s.shape != (R, n // 32):
            raise ValueError(f"expected one parameter per 32-run, shape {(R, n // 32)}, got {s.shape}")
    return (codes.reshape(-1, 32), *(np.asarray(s).reshape(-1, 1) for s in scales))


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """[B, 1] -> uint8 [B, 2]: little-endian IEEE half (values are rounded to fp16 here)."""
    return np.ascontiguousarray(v.astype("<f2")).view(np.uint8)


def _pack_nibbles(u: np.ndarray) -> np.ndarray:
    """uint8 [B, 32] in 0..15 -> uint8 [B, 16]: byte j = element j (low) | element j+16 (high)."""
    return u[:, :16] | (u[:, 16:] << 4)


def _check_range(codes: np.ndarray, lo: int, hi: int) -> None:
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"codes must lie in [{lo}, {hi}], got [{codes.min()}, {codes.max()}]")


def q4_0_from_codes(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Symmetric 4-bit codes int [R, n] in [-8, 7], scale [R, n/32] -> Q4_0 uint8 [R, n/32*18].

    d = fp16(scale), nibble = code + 8: lossless, dequant == code * fp16(scale) exactly.
    A group of 128 is four runs: repeat its scale 4x along the last axis.
    """
    _check_range(codes, -8, 7)
    c, s = _blocks_of(codes, scale)
    u = (c.astype(np.int16) + 8).astype(np.uint8)
    out = np.concatenate([_fp16_bytes(s), _pack_nibbles(u)], axis=1)
    return out.reshape(codes.shape[0], -1)


def q8_0_from_codes(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Symmetric 8-bit codes int [R, n] in [-128, 127], scale [R, n/32] -> Q8_0 uint8 [R, n/32*34].

    d = fp16(scale), qs = code: dequant == code * fp16(scale) exactly.
    """
    _check_range(codes, -128, 127)
    c, s = _blocks_of(codes, scale)
    out = np.concatenate([_fp16_bytes(s), c.astype(np.int8).view(np.uint8)], axis=1)
    return out.reshape(codes.shape[0], -1)


def q4_1_from_codes(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Asymmetric codes u [R, n] in [0, 15] with value scale*(u - zero); scale, zero [R, n/32] -> Q4_1.

    d = fp16(scale), m = fp16(-scale*zero) (product in float32; m's rounding is the only loss), nibble = u.
    """
    _check_range(codes, 0, 15)
    c, s, z = _blocks_of(codes, scale, zero)
    d = s.astype(np.float16)
    m = -(d.astype(np.float32) * z.astype(np.float32))
    out = np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _pack_nibbles(c.astype(np.uint8))], axis=1)
    return out.reshape(codes.shape[0], -1)
