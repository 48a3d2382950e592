"""Quantization primitives on quantkit's per-group integer grid: choose (scale, zero point), quantize,
dequantize, pack.

``quantize`` rounds onto this grid for RTN and GPTQ alike (the scale search repeats its operations in scratch
buffers to score candidate scales); where the grid fits a ggml type (Q4_0, Q8_0, Q4_1) its codes go into the
blocks unchanged. Every other weight bound for ggml blocks is rounded on the GGUF side: onto a ggml type's fixed
grid (GPTQ into GGUF blocks) or by the block encoders, which reproduce ggml's own rounding.

Grid (compressed-tensors' convention, which GPTQ's symmetric grid equals):
    codes are signed integers c in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1];
    dequantized value = (c - zp) * scale, with zp = 0 for symmetric grids.
    symmetric:  scale = absmax / ((2^b - 1) / 2)          (4-bit: absmax / 7.5)
    asymmetric: scale = (hi - lo) / (2^b - 1), zp = round(-2^(b-1) - lo / scale)
    where lo = min(min w, 0) and hi = max(max w, 0) per group, so 0 is always representable.

Shapes: a weight W [O, I] (rows = output features, columns = input features) with group size g has
G = I / g groups per row: codes [O, I] int8, scale [O, G], zero point [O, G] int8 (asymmetric only).
Per-channel quantization is g = I (G = 1). Functions infer g from the shapes, so the same ``quantize``
also rounds a single GPTQ column against its group's [O, 1] scale.

The scale is stored in ``scale_dtype`` (bf16 for a bf16 checkpoint, fp16 for GGUF-bound weights) and is
rounded *up* into that dtype before the codes are computed, so stored codes and stored scales agree and
|w - dequantize(quantize(w))| <= scale / 2 holds element-wise for every in-range value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (32, 64, 128, 256, -1)


@dataclass(frozen=True)
class QuantSpec:
    """Grid of a per-group integer quantization: weight [O, I], group g -> codes [O, I], scales [O, I/g]."""

    bits: int = 4
    group_size: int = 128  # -1: one group per output row (per-channel)
    sym: bool = True

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise QuantkitError(f"--bits {self.bits} is not supported (choose from {list(SUPPORTED_BITS)})")
        if self.group_size not in SUPPORTED_GROUPS:
            raise QuantkitError(
                f"--group {self.group_size} is not supported (choose from {list(SUPPORTED_GROUPS)}; -1 = per channel)"
            )

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def check_divides(self, name: str, in_features: int) -> None:
        if self.group_size != -1 and in_features % self.group_size:
            raise QuantkitError(
                f"{name}: input dimension {in_features} is not a multiple of group size {self.group_size}"
            )

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        """Storage per weight: the code plus its share of scale (and zero point)."""
        if self.group_size == -1:
            return float(self.bits)
        return self.bits + (scale_bits + (0 if self.sym else self.bits)) / self.group_size


def _expand(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """[O, G] per-group values -> [O, I] per-column values."""
    return t.repeat_interleave(in_features // t.shape[1], dim=1)


def round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast positive (fp64) values to ``dtype``, rounding up (never below x), so a scale never shrinks."""
    y = x.to(dtype)
    low = y.double() < x
    if low.any():
        y = torch.where(low, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y


def choose_qparams(
    w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale (and zero point) per row and group. w [O, I] -> scale [O, G], zero [O, G] int8 | None."""
    return qparams_from_range(*group_range(w, spec), spec, scale_dtype)


def group_range(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row and group's range widened to hold 0: w [O, I] -> lo <= 0 <= hi, fp64 [O, G] (a weight's
    extreme is exact in fp64, where ``qparams_from_range`` rounds up exactly)."""
    o, i = w.shape
    wg = w.reshape(o, spec.groups(i), -1)  # [O, G, g]
    return wg.amin(dim=-1).double().clamp(max=0.0), wg.amax(dim=-1).double().clamp(min=0.0)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) whose grid spans [lo, hi] (fp64 [O, G], lo <= 0 <= hi), as in ``choose_qparams``."""
    if spec.sym:
        scale = torch.maximum(-lo, hi) / ((2**spec.bits - 1) / 2)
    else:
        scale = (hi - lo) / (2**spec.bits - 1)
    scale = round_up_to(scale, scale_dtype)
    scale = torch.where(scale == 0, torch.finfo(scale_dtype).eps, scale.double()).to(scale_dtype)
    if spec.sym:
        return scale, None
    zero = torch.round(spec.qmin - lo / scale.double()).clamp(spec.qmin, spec.qmax).to(torch.int8)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Codes c = clamp(round(w / scale + zp), qmin, qmax). w [O, I], scale/zero [O, G] -> int8 [O, I]."""
    i = w.shape[1]
    x = w.float() / _expand(scale.float(), i)
    if zero is not None:
        x = x + _expand(zero.float(), i)
    return torch.round(x).clamp(spec.qmin, spec.qmax).to(torch.int8)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(c - zp) * scale in fp32, then cast. codes [O, I], scale/zero [O, G] -> [O, I]."""
    i = codes.shape[1]
    c = codes.float()
    if zero is not None:
        c = c - _expand(zero.float(), i)
    return (c * _expand(scale.float(), i)).to(dtype)


# ---- bit packing ---------------------------------------------------------------------------------------
# compressed-tensors "pack-quantized": unsigned codes u = c + 2^(b-1); along the packed dimension element k
# occupies bits [k*b, k*b + b) of the row's little-endian bit stream of int32 words (b = 4: 8 codes/word).


_ROWS_PER_CHUNK = 1024  # bounds the int64 temporaries to a few hundred MB for a 9B MLP matrix


def _pack_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [r, N] int64 -> uint32-valued int64 words [r, W]."""
    r, n = u.shape
    n_words = -(-n * bits // 32)
    if 32 % bits == 0:  # whole codes per word: word j holds codes j*k .. j*k + k - 1, k = 32 / bits
        k = 32 // bits
        u = torch.nn.functional.pad(u, (0, n_words * k - n))
        return (u.reshape(r, n_words, k) << (torch.arange(k, dtype=torch.int64) * bits)).sum(-1)
    stream = ((u[:, :, None] >> torch.arange(bits, dtype=torch.int64)) & 1).reshape(r, n * bits)
    stream = torch.nn.functional.pad(stream, (0, n_words * 32 - n * bits))
    return (stream.reshape(r, n_words, 32) << torch.arange(32, dtype=torch.int64)).sum(-1)


def _unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint32-valued int64 words [r, W] -> unsigned codes [r, n] int64."""
    r, w = words.shape
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        k = 32 // bits
        return ((words[:, :, None] >> (torch.arange(k, dtype=torch.int64) * bits)) & mask).reshape(r, w * k)[:, :n]
    stream = ((words[:, :, None] >> torch.arange(32, dtype=torch.int64)) & 1).reshape(r, w * 32)[:, : n * bits]
    return (stream.reshape(r, n, bits) << torch.arange(bits, dtype=torch.int64)).sum(-1)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [R, N] -> int32 words [R, ceil(N*bits/32)] packed along the last dimension."""
    out = []
    for chunk in codes.split(_ROWS_PER_CHUNK):
        u = (chunk.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
        out.append(_pack_rows(u, bits).to(torch.uint32).view(torch.int32))
    return torch.cat(out)


def unpack_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 words [R, W] -> signed int8 codes [R, n] (inverse of ``pack_int32``)."""
    out = []
    for chunk in words.split(_ROWS_PER_CHUNK):
        u = _unpack_rows(chunk.view(torch.uint32).to(torch.int64), bits, n)  # logical: bit 31 is data
        out.append((u - (1 << (bits - 1))).to(torch.int8))
    return torch.cat(out)


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized linear weight [O, I]: int8 codes [O, I], scale [O, G], zero point [O, G] | None."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, dtype)


def rtn(w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Round-to-nearest on the min-max grid of each group."""
    scale, zero = choose_qparams(w, spec, scale_dtype)
    return QuantizedWeight(quantize(w, scale, zero, spec), scale, zero, spec)
