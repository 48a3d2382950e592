"""ggml block formats: quantize float rows to the bytes ggml stores (round to nearest, as llama-quantize does
without an importance matrix), and write integer codes into blocks.

Q8_0 and Q4_0 are quantkit's own torch quantizers (vectorised over blocks, byte-identical to ggml's
`quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`, all-zero blocks included); Q4_1, Q5_0, Q5_1 and
F32/F16/BF16 go through gguf-py; the K-quants come from `quantkit.formats.gguf.kquants` / `kquants_sym`, IQ4_NL and
IQ4_XS from `quantkit.formats.gguf.iquants`, IQ3_XXS and IQ3_S from `quantkit.formats.gguf.iquants_codebook`,
IQ2_XXS / IQ2_XS / IQ2_S from `quantkit.formats.gguf.iquants_iq2` (IQ2_XXS / IQ2_XS only with an importance),
Q1_0 and Q2_0 from `quantkit.formats.gguf.lowbit`, IQ1_S (importance only) and IQ1_M from
`quantkit.formats.gguf.iquants_iq1`
(byte-identical to `quantize_row_q*_K_ref`). quantkit's block bytes are written by
`quantkit.formats.gguf.layouts`.
Shapes: x float32 [R, n] (R rows, n along ne0, the HF `in` dimension) -> uint8 [R, n / block * type_bytes].
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq
from torch import Tensor

from quantkit.formats.gguf import weighted as wq
from quantkit.formats.gguf.ggml_float import BELOW_HALF, F32, Scratch, signed_absmax
from quantkit.formats.gguf.iquants import quantize_iq4_nl, quantize_iq4_xs
from quantkit.formats.gguf.iquants_codebook import quantize_codebook, quantize_iq3_s, quantize_iq3_xxs
from quantkit.formats.gguf.iquants_iq1 import quantize_iq1_m, quantize_iq1_s, refuse_without_importance
from quantkit.formats.gguf.iquants_iq2 import quantize_iq2
from quantkit.formats.gguf.kquants import quantize_q2_k, quantize_q4_k, quantize_q5_k
from quantkit.formats.gguf.kquants_sym import quantize_q3_k, quantize_q6_k
from quantkit.formats.gguf.layouts import (
    block_size,
    check_codes,
    pack_q4_0,
    pack_q4_1,
    pack_q8_0,
    row_bytes,
)
from quantkit.formats.gguf.lowbit import DEQUANTIZERS, dequantize_lowbit, quantize_q1_0, quantize_q2_0

GGUF_PY_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q4_1, QT.Q5_0, QT.Q5_1)
# the searching quantizers, in numpy (K-quants and IQ4)
NUMPY_QUANTIZERS = {
    QT.IQ4_NL: quantize_iq4_nl,
    QT.IQ4_XS: quantize_iq4_xs,
    QT.IQ3_XXS: quantize_iq3_xxs,
    QT.IQ3_S: quantize_iq3_s,
    **{t: lambda x, ws, t=t: quantize_iq2(x, t, ws) for t in (QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S)},  # XXS, XS raise
    QT.Q2_K: quantize_q2_k,
    QT.Q3_K: quantize_q3_k,
    QT.Q4_K: quantize_q4_k,
    QT.Q5_K: quantize_q5_k,
    QT.Q6_K: quantize_q6_k,
    QT.Q1_0: quantize_q1_0,
    QT.Q2_0: quantize_q2_0,
    QT.IQ1_S: refuse_without_importance,  # libggml asserts on a missing importance vector
    QT.IQ1_M: lambda x, ws: quantize_iq1_m(x, None, ws),  # weights x^2 (llama-quantize wants an imatrix)
}
# with an importance matrix (llama-quantize --imatrix): blocks x, importance qw [B, block] (, sigma2 [B]: the
# mean x^2 of each block's row, for the legacy types) -> uint8 [B, type_bytes]. Q8_0 and the floats ignore it.
WEIGHTED_ROW = {
    QT.Q4_0: wq.quantize_q4_0,
    QT.Q5_0: wq.quantize_q5_0,
    QT.Q4_1: wq.quantize_q4_1,
    QT.Q5_1: wq.quantize_q5_1,
}
WEIGHTED_BLOCK = {
    QT.Q2_K: wq.quantize_q2_k,
    QT.Q3_K: wq.quantize_q3_k,
    QT.Q4_K: wq.quantize_q4_k,
    QT.Q5_K: wq.quantize_q5_k,
    QT.Q6_K: wq.quantize_q6_k_w,
    QT.IQ4_NL: lambda x, qw, ws: quantize_iq4_nl(x, ws, qw),
    QT.IQ4_XS: lambda x, qw, ws: quantize_iq4_xs(x, ws, qw),
    QT.IQ3_XXS: lambda x, qw, ws: quantize_codebook(x, QT.IQ3_XXS, ws, qw),
    QT.IQ3_S: lambda x, qw, ws: quantize_codebook(x, QT.IQ3_S, ws, qw),
    **{t: lambda x, qw, ws, t=t: quantize_iq2(x, t, ws, qw) for t in (QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S)},
    QT.IQ1_S: quantize_iq1_s,
    QT.IQ1_M: quantize_iq1_m,
}
WEIGHTED = (*WEIGHTED_ROW, *WEIGHTED_BLOCK)
ENCODABLE = (*GGUF_PY_TYPES, *NUMPY_QUANTIZERS, QT.Q8_0, QT.Q4_0)  # the types quantize_rows writes
CHUNK_WEIGHTS = 1024 * 256  # weights per numpy pass (1024 K-quant super-blocks): fastest of 256-2048 here


def check_rows(x: np.ndarray, qtype: QT) -> None:
    if x.ndim != 2:
        raise ValueError(f"expected 2-D rows [R, n], got shape {x.shape}")
    if x.shape[1] % (blk := block_size(qtype)):
        raise ValueError(f"row length {x.shape[1]} is not a multiple of {qtype.name}'s block {blk}")


class NonFiniteError(ValueError):
    """The weights given to a quantizer hold NaN or inf."""


def _all_finite(*arrays: np.ndarray) -> bool:
    """Whether float32 arrays hold no NaN or inf: a sum is finite exactly then, unless finite values overflow
    it, and only such a sum is checked element by element."""
    with np.errstate(over="ignore", invalid="ignore"):
        return all(bool(np.isfinite(np.add.reduce(a, axis=None))) or bool(np.isfinite(a).all()) for a in arrays)


def _quantize_k(x: np.ndarray | torch.Tensor, qtype: QT) -> np.ndarray:
    """K-quant rows chunk by chunk (a torch tensor of any float dtype is converted to float32 per chunk);
    raises NonFiniteError on NaN or inf."""
    R, n = x.shape
    blk, size = GGML_QUANT_SIZES[qtype]
    blocks = x.reshape(-1, blk)  # [R * n/256, 256]: super-blocks in row order
    out = np.empty((blocks.shape[0], size), dtype=np.uint8)
    ws = Scratch()  # this call's buffers, reused by every chunk
    step = CHUNK_WEIGHTS // blk
    for s in range(0, blocks.shape[0], step):
        chunk = blocks[s : s + step]
        if isinstance(chunk, torch.Tensor):
            chunk = torch.from_numpy(ws.get("rows", tuple(chunk.shape))).copy_(chunk).numpy()
        if not _all_finite(chunk):
            raise NonFiniteError("NaN or inf in the weights")
        out[s : s + step] = NUMPY_QUANTIZERS[qtype](chunk, ws)
    return out.reshape(R, row_bytes(qtype, n))


# ------------------------------------------------------------------ Q8_0 / Q4_0 in torch


_BELOW_HALF = float(BELOW_HALF)  # roundf in torch (see ggml_float.roundf)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d == 0 (ggml's `id = d ? 1.0f/d : 0.0f`)."""
    return (1.0 / d).masked_fill_(d == 0, 0.0)


def quantize_q8_0_torch(x: Tensor, lo: Tensor, hi: Tensor, t: Tensor, q: Tensor, out: np.ndarray) -> None:
    """Blocks x float32 [B, 32] (lo, hi [B, 1]: their min and max) -> out uint8 [B, 34]: d = amax/127 (fp32),
    id = 1/d, code = roundf(x*id) (halves away from zero). Overwrites x and the scratch t (float32), q (int8)."""
    amax = torch.maximum(hi, lo.neg()).abs_()  # max |x|; abs_: +0.0 for an all-zero block, as C's fabsf
    d = amax / torch.full_like(amax, 127.0)  # a true division (ATen may turn "/ scalar" into "* (1/127)")
    v = x.mul_(_inverse(d))
    v += torch.sign(v, out=t).mul_(_BELOW_HALF)
    pack_q8_0(d.numpy(), q.copy_(v).numpy(), out=out)  # the cast truncates


def quantize_q4_0_torch(x: Tensor, lo: Tensor, hi: Tensor, t: Tensor, q: Tensor, out: np.ndarray) -> None:
    """Blocks x float32 [B, 32] (lo, hi [B, 1]: their min and max) -> out uint8 [B, 18]: m = the signed element
    of largest magnitude (the first on ties; +0 when the block is all zeros), d = m / -8, id = 1/d,
    stored code = min(15, trunc(x*id + 8.5)). Overwrites x and the scratch q (int8)."""
    m = torch.from_numpy(signed_absmax(x.numpy(), 1, lo.numpy(), hi.numpy()))
    d = m / -8.0  # an all-zero block stores d = -0.0, as C does
    # C casts to int8_t (truncation; on x86 inf/NaN from a tiny subnormal d become 0), then takes min(15, .)
    q.copy_(x.mul_(_inverse(d)).add_(8.5))
    pack_q4_0(d.numpy(), q.clamp_(max=15).sub_(8).numpy(), out=out)


TORCH_QUANTIZERS = {QT.Q8_0: quantize_q8_0_torch, QT.Q4_0: quantize_q4_0_torch}
TORCH_CHUNK_BLOCKS = 16384  # 512K weights per torch pass: fastest of 1K-64K blocks (per-op overhead vs. cache)


def quantize_rows_torch(x: torch.Tensor, qtype: QT) -> torch.Tensor:
    """float [R, n] (float32, bf16 or fp16: converted chunk by chunk) -> uint8 [R, row_bytes], for Q8_0 / Q4_0
    (torch) and the K-quants (numpy). Raises NonFiniteError on NaN or inf: Q8_0 / Q4_0 see them in each
    block's min and max, which both need (so no separate pass checks the input), the K-quants in a sum."""
    if qtype in NUMPY_QUANTIZERS:
        return torch.from_numpy(_quantize_k(x, qtype))
    R, n = x.shape
    blk, size = GGML_QUANT_SIZES[qtype]
    blocks = x.reshape(-1, blk)  # [R * n/32, 32]
    out = np.empty((blocks.shape[0], size), dtype=np.uint8)
    ws, shape = Scratch(), (min(TORCH_CHUNK_BLOCKS, blocks.shape[0]), blk)  # buffers reused by every chunk
    x, t, q = (
        torch.from_numpy(ws.get(k, shape, dt)) for k, dt in (("x", np.float32), ("t", np.float32), ("q", np.int8))
    )
    for s in range(0, blocks.shape[0], TORCH_CHUNK_BLOCKS):
        src = blocks[s : s + TORCH_CHUNK_BLOCKS]
        B = src.shape[0]
        buf = x[:B].copy_(src)
        # amax and amin separately: aminmax over a 32-wide row is ~5x slower than the two
        hi, lo = buf.amax(dim=1, keepdim=True), buf.amin(dim=1, keepdim=True)
        if not _all_finite(lo.numpy(), hi.numpy()):
            raise NonFiniteError("NaN or inf in the weights")
        TORCH_QUANTIZERS[qtype](buf, lo, hi, t[:B], q[:B], out[s : s + B])
    return torch.from_numpy(out.reshape(R, row_bytes(qtype, n)))


def quantize_rows(x: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 [R, n] (n a multiple of the block size) -> uint8 [R, n/block*type_bytes], as ggml stores it."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_rows(x, qtype)
    if qtype in NUMPY_QUANTIZERS:
        return _quantize_k(x, qtype)
    if qtype in TORCH_QUANTIZERS:
        return quantize_rows_torch(torch.from_numpy(x), qtype).numpy()
    if qtype not in GGUF_PY_TYPES:
        raise NotImplementedError(f"no quantizer for {qtype.name}")
    out = np.ascontiguousarray(gq.quantize(x, qtype))
    return out.view(np.uint8).reshape(x.shape[0], row_bytes(qtype, x.shape[1]))


def quantize_rows_weighted(x: np.ndarray | torch.Tensor, qtype: QT, qw: np.ndarray) -> np.ndarray:
    """float [R, n] (any float dtype) and the importance qw float32 [n] -> uint8 [R, row_bytes], as
    llama-quantize --imatrix writes them; types that take no importance go to quantize_rows. Raises
    NonFiniteError on NaN or inf."""
    if qtype not in WEIGHTED:
        return quantize_rows(x.float().numpy() if isinstance(x, torch.Tensor) else x, qtype)
    R, n = x.shape
    if qw.shape != (n,):
        raise ValueError(f"expected one importance value per column, shape ({n},), got {qw.shape}")
    blk = block_size(qtype)
    out = np.empty((R, row_bytes(qtype, n)), dtype=np.uint8)
    ws, step = Scratch(), max(1, CHUNK_WEIGHTS // n)
    qw = np.ascontiguousarray(qw, dtype=np.float32).reshape(-1, blk)
    for s in range(0, R, step):
        chunk = x[s : s + step]
        chunk = np.ascontiguousarray(chunk.float().numpy() if isinstance(chunk, torch.Tensor) else chunk, F32)
        check_rows(chunk, qtype)
        if not _all_finite(chunk):
            raise NonFiniteError("NaN or inf in the weights")
        r = chunk.shape[0]
        blocks, qwb = chunk.reshape(-1, blk), np.tile(qw, (r, 1))  # [r * n/blk, blk]
        if qtype in WEIGHTED_ROW:  # C: sum of x^2 over the whole row / n_per_row
            sigma2 = np.repeat(wq.sum_squares(chunk, ws) / F32(n), n // blk)
            out[s : s + r] = WEIGHTED_ROW[qtype](blocks, qwb, sigma2, ws).reshape(r, -1)
        else:
            out[s : s + r] = WEIGHTED_BLOCK[qtype](blocks, qwb, ws).reshape(r, -1)
    return out


def dequantize_rows(data: np.ndarray, qtype: QT) -> np.ndarray:
    """uint8 [R, row_bytes] -> float32 [R, n] (gguf-py's dequantizer, any type it knows; Q1_0 / Q2_0 quantkit's)."""
    if data.dtype != np.uint8:
        raise TypeError(f"expected the raw uint8 bytes of {qtype.name} rows, got {data.dtype}")
    if qtype in DEQUANTIZERS:
        return dequantize_lowbit(data, qtype)
    return gq.dequantize(np.ascontiguousarray(data), qtype).astype(np.float32, copy=False)


# ------------------------------------------------------------- integer codes -> blocks


def _blocks_of(qtype: QT, codes: np.ndarray, *scales: np.ndarray) -> tuple[np.ndarray, ...]:
    """codes [R, n] (checked against the type's range) and per-block params [R, n/32] -> codes [R*n/32, 32]
    and params [R*n/32, 1]."""
    check_codes(codes, qtype)
    R, n = codes.shape
    blk = block_size(qtype)
    if n % blk:
        raise ValueError(f"row length {n} is not a multiple of {blk}")
    for s in scales:
        if s.shape != (R, n // blk):
            raise ValueError(f"expected one parameter per {blk}-run, shape {(R, n // blk)}, got {s.shape}")
    return (codes.reshape(-1, blk), *(np.asarray(s).reshape(-1, 1) for s in scales))


def q4_0_from_codes(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Symmetric 4-bit codes int [R, n] in [-8, 7], scale [R, n/32] -> Q4_0 uint8 [R, n/32*18].

    d = fp16(scale), nibble = code + 8: lossless, dequant == code * fp16(scale) exactly.
    A group of 128 is four runs: repeat its scale 4x along the last axis.
    """
    c, s = _blocks_of(QT.Q4_0, codes, scale)
    return pack_q4_0(s, c).reshape(codes.shape[0], -1)


def q8_0_from_codes(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Symmetric 8-bit codes int [R, n] in [-128, 127], scale [R, n/32] -> Q8_0 uint8 [R, n/32*34].

    d = fp16(scale), qs = code: dequant == code * fp16(scale) exactly.
    """
    c, s = _blocks_of(QT.Q8_0, codes, scale)
    return pack_q8_0(s, c).reshape(codes.shape[0], -1)


def q4_1_from_codes(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Asymmetric codes u [R, n] in [0, 15] with value scale*(u - zero); scale, zero [R, n/32] -> Q4_1.

    d = fp16(scale), m = fp16(-scale*zero) (product in float32; m's rounding is the only loss), nibble = u.
    """
    c, s, z = _blocks_of(QT.Q4_1, codes, scale, zero)
    d = s.astype(np.float16)
    m = -(d.astype(np.float32) * z.astype(np.float32))
    return pack_q4_1(d, m, c).reshape(codes.shape[0], -1)
