"""The dequantizing linear: y = x · dequant(W)ᵀ with W held as packed integer codes.

4-bit codes are stored two per byte (``NIBBLES``: byte k of a row holds column 2k in its low nibble and
column 2k+1 in its high nibble, as unsigned c + 8); other widths as int8. Each call dequantizes a block of
output rows at a time into a temporary fp32 matrix and multiplies; no float copy of the weight is kept
between calls, except inside ``holding_weights``: a pass of many batches through one layer (calibration,
layer-streamed evaluation) dequantizes each weight once and runs the very same products.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.quant.primitives import QuantizedWeight, QuantSpec

NIBBLES = "uint8: low nibble = column 2k, high nibble = column 2k+1, unsigned (c + 8)"
ROW_BLOCK = 4096  # output rows dequantized per step: bounds the temporary to ROW_BLOCK x I fp32


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [O, I] (I even) -> uint8 [O, I/2]."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [O, I/2] -> int8 codes [O, I]."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)


def blocked_linear(x: torch.Tensor, out_features: int, rows_of: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """y = x · Wᵀ where ``rows_of(rows)`` gives W's rows [r, I] in x's dtype: a weight wider than ROW_BLOCK
    rows is materialised ROW_BLOCK rows at a time, each product written into one preallocated output."""
    if out_features <= ROW_BLOCK:
        return F.linear(x, rows_of(slice(None)))
    out = x.new_empty((*x.shape[:-1], out_features))
    for r in range(0, out_features, ROW_BLOCK):
        out[..., r : r + ROW_BLOCK] = F.linear(x, rows_of(slice(r, r + ROW_BLOCK)))
    return out


class HeldWeight(nn.Module):
    """A linear whose float weight [O, I] is made from its storage per call (``rows_in``); ``hold`` keeps the
    first call's whole matrix until ``release``, and the following calls multiply by it: each product is the
    one an unheld call computes (the same ROW_BLOCK blocks of the same values), only not recomputed."""

    out_features: int
    holding: bool = False
    held: torch.Tensor | None = None

    def rows_in(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.holding and (self.held is None or self.held.dtype != x.dtype):
            self.held = self.rows_in(slice(None), x.dtype)
        w = self.held if self.holding else None
        if w is not None:
            return blocked_linear(x, self.out_features, lambda rows: w[rows])
        return blocked_linear(x, self.out_features, lambda rows: self.rows_in(rows, x.dtype))

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding, self.held = False, None


@contextmanager
def holding_weights(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block every ``HeldWeight`` in (or under) ``modules`` makes its float weight once, at its
    first call, instead of once per call; all are released on exit (the copies cost I x O floats each)."""
    held = {id(m): m for top in modules for m in top.modules() if isinstance(m, HeldWeight)}
    for m in held.values():
        m.hold()
    try:
        yield
    finally:
        for m in held.values():
            m.release()


class PackedLinear(HeldWeight):
    """A bias-free linear whose weight [O, I] is stored as codes, scale [O, G] and zero point [O, G]."""

    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        self.spec: QuantSpec = qw.spec
        self.out_features, self.in_features = qw.shape
        self.nibbles = qw.spec.bits == 4 and self.in_features % 2 == 0
        self.register_buffer("codes", pack_nibbles(qw.codes) if self.nibbles else qw.codes.to(torch.int8))
        self.register_buffer("scale", qw.scale)
        self.register_buffer("zero", qw.zero)

    def quantized_weight(self, rows: slice = slice(None)) -> QuantizedWeight:
        codes = self.codes[rows]
        codes = unpack_nibbles(codes) if self.nibbles else codes
        zero = None if self.zero is None else self.zero[rows]
        return QuantizedWeight(codes, self.scale[rows], zero, self.spec)

    def dequantized(self, rows: slice = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight(rows).dequantize(dtype)

    def rows_in(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantized(rows, dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return f"in={self.in_features}, out={self.out_features}, bits={s.bits}, group={s.group_size}, sym={s.sym}"


def linears_from_checkpoint(ckpt, i: int) -> dict[str, nn.Module]:
    """PackedLinear modules for every quantized linear of layer i of a pack-quantized checkpoint."""
    from quantkit.formats.gguf.blocks import dequantize_rows
    from quantkit.model import LINEAR_NAMES

    out: dict[str, nn.Module] = {}
    for name in LINEAR_NAMES:
        path = f"model.layers.{i}.{name}"
        if ckpt.has_blocks(path):
            qtype, blocks = ckpt.blocks(path)
            out[name] = dense_linear(torch.from_numpy(dequantize_rows(blocks, qtype)))
        elif ckpt.is_linear_quantized(path):
            out[name] = PackedLinear(ckpt.quantized_weight(path))
    return out


def dense_linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear holding ``weight`` [O, I] as it is."""
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    module.weight = nn.Parameter(weight, requires_grad=False)
    return module


class CastLinear(HeldWeight):
    """A bias-free linear that keeps ``weight`` [O, I] in its stored dtype (e.g. a bf16 checkpoint's) and
    casts it to the input's dtype for each call, a block of rows at a time: the products of a linear
    holding the cast copy, at the stored dtype's memory."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.out_features = weight.shape[0]

    def rows_in(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[rows].to(dtype)
