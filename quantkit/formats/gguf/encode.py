"""One GGUF tensor's bytes from a checkpoint's tensor: the encoders behind the exporter.

Quantized artifacts go into blocks losslessly where the block grid holds their integer grid: every 32-run of
a group becomes one block with d = fp16(scale) and the codes copied, when the group size is a multiple of 32
and every scale is an fp16 value. Q4_0 takes symmetric codes in [-8, 7]; Q8_0 any codes with c - zero in
[-128, 127]; Q4_1 any 4-bit codes, with m = fp16(-d * zero) its only rounding. GPTQ's ggml blocks are copied
when the planned type is theirs. Any other weight is dequantized to fp32 and quantized with ggml's reference
quantizer; norms are stored F32 as 1 + w.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from quantkit.formats.gguf.blocks import (
    NUMPY_QUANTIZERS,
    TORCH_QUANTIZERS,
    WEIGHTED,
    dequantize_rows,
    q4_0_from_codes,
    q4_1_from_codes,
    q8_0_from_codes,
    quantize_rows,
    quantize_rows_torch,
    quantize_rows_weighted,
    row_bytes,
)
from quantkit.formats.gguf.grids import searched_blocks
from quantkit.formats.gguf.policy import FLOAT_TYPES, TORCH_FLOATS, PlannedTensor
from quantkit.io.checkpoint import Checkpoint
from quantkit.quant.primitives import QuantizedWeight

CHUNK_ELEMENTS = 1 << 24  # rows quantized per step: bounds the fp32 temporaries to ~64 MB


def _fp16_exact(scale: torch.Tensor) -> bool:
    return bool((scale.to(torch.float16).to(scale.dtype) == scale).all())


def blocks_from_codes(qw: QuantizedWeight, qtype: QT) -> np.ndarray | None:
    """``qw``'s codes and scales written straight into ``qtype`` blocks, uint8 [O, row_bytes]; None when
    the blocks cannot hold them exactly (group not a multiple of 32, scale not fp16, codes out of range)."""
    i = qw.shape[1]
    g = i // qw.scale.shape[1]  # group size
    if g % 32 or not _fp16_exact(qw.scale) or qtype not in (QT.Q4_0, QT.Q8_0, QT.Q4_1):
        return None
    runs = g // 32
    scale = qw.scale.float().numpy().repeat(runs, axis=1)  # [O, I/32]
    codes = qw.codes.numpy().astype(np.int16)  # [O, I]
    zero = None if qw.zero is None else qw.zero.numpy().astype(np.int16).repeat(runs, axis=1)
    if qtype == QT.Q4_0 and zero is None and codes.min() >= -8 and codes.max() <= 7:
        return q4_0_from_codes(codes, scale)
    if qtype == QT.Q8_0:
        values = codes if zero is None else codes - zero.repeat(32, axis=1)
        if values.min() >= -128 and values.max() <= 127:
            return q8_0_from_codes(values, scale)
    if qtype == QT.Q4_1 and codes.min() >= -8 and codes.max() <= 7:
        z = np.full_like(scale, 8.0) if zero is None else zero + 8  # unsigned zero of u = c + 8
        return q4_1_from_codes(codes + 8, scale, z)
    return None


def _q4_1_exact(qw: QuantizedWeight) -> bool:
    """Whether every Q4_1 m = -d * zero is an fp16 value (then the blocks dequantize exactly)."""
    z = 8.0 if qw.zero is None else qw.zero.numpy().astype(np.float32) + 8
    m = -(qw.scale.float().numpy() * z)
    return bool(np.array_equal(m.astype(np.float16).astype(np.float32), m))


def quantize_weight(w: np.ndarray, qtype: QT, qw: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """float32 [O, I] -> (uint8 [O, row_bytes], whether it dequantizes to exactly ``w``), in row chunks; ``qw``
    [I]: the importance, for the types that take one."""
    if qw is not None and qtype in WEIGHTED:
        return quantize_rows_weighted(w, qtype, qw), False
    o, i = w.shape
    out = np.empty((o, row_bytes(qtype, i)), dtype=np.uint8)
    exact = qtype in FLOAT_TYPES
    step = max(1, CHUNK_ELEMENTS // i)
    for r in range(0, o, step):
        x = np.ascontiguousarray(w[r : r + step], dtype=np.float32)
        out[r : r + step] = quantize_rows(x, qtype)
        if exact and qtype != QT.F32:
            exact = bool(np.array_equal(dequantize_rows(out[r : r + step], qtype), x))
    return out, exact


def encode_tensor(
    ckpt: Checkpoint, t: PlannedTensor, importance: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """The bytes of one planned tensor, read whole, and its report entry (``importance``: its importance
    vector, or None)."""
    entry: dict[str, Any] = {"name": t.gguf_name, "hf_name": t.hf_name, "type": t.qtype.name}
    if t.is_norm:  # 1 + w in fp32, stored F32
        data = (ckpt.get(t.hf_name, torch.float32, check_finite=True) + 1.0).numpy()
        return data.view(np.uint8), entry | {"method": "norm", "exact": True}
    module = t.hf_name.removesuffix(".weight")
    if ckpt.has_blocks(module):  # GPTQ wrote this tensor's blocks: copied when the planned type is theirs
        qtype, blocks = ckpt.blocks(module)
        if qtype == t.qtype:
            return blocks, entry | {"method": "lossless", "exact": True}
        w = dequantize_rows(blocks, qtype)
    elif ckpt.quant_spec is not None and ckpt.is_linear_quantized(module):
        qw = ckpt.quantized_weight(module)
        blocks = blocks_from_codes(qw, t.qtype)
        if blocks is not None:
            exact = t.qtype != QT.Q4_1 or _q4_1_exact(qw)
            return blocks, entry | {"method": "lossless", "exact": exact}
        w = qw.dequantize(torch.float32).numpy()
    else:
        w = ckpt.get(t.hf_name, torch.float32, check_finite=True)[: t.shape[0]].numpy()  # drop embedding padding rows
    data, exact = quantize_weight(w, t.qtype, importance)
    return data, entry | {"method": "lossless" if exact else "requantized", "exact": exact}


def encode_rows(
    src: torch.Tensor, qtype: QT, qw: np.ndarray | None = None, searched: bool = False
) -> tuple[np.ndarray, bool]:
    """Rows [R, n] in any float dtype -> (uint8 [R, row_bytes], whether they decode to exactly ``src``);
    ``qw`` [n]: the importance, for the types that take one (llama-quantize --imatrix); ``searched``: rounded
    onto quantkit's searched scales (``grids.searched_blocks``) instead of llama-quantize's encoder."""
    if searched:  # the caller checks the rows are finite (encode_job)
        return searched_blocks(src, qtype, qw), False
    if qw is not None and qtype in WEIGHTED:
        return quantize_rows_weighted(src, qtype, qw), False
    if TORCH_FLOATS.get(qtype) == src.dtype:  # bf16 -> BF16 etc.: the stored bytes as they are
        return src.view(torch.uint8).numpy(), True
    if qtype in TORCH_QUANTIZERS or qtype in NUMPY_QUANTIZERS:  # converted to float32 chunk by chunk
        return quantize_rows_torch(src, qtype).numpy(), False
    x = src.float()
    if qtype in TORCH_FLOATS:
        y = x.to(TORCH_FLOATS[qtype])
        return y.view(torch.uint8).numpy(), bool(torch.equal(y.float(), x))
    return quantize_rows(x.numpy(), qtype), False
