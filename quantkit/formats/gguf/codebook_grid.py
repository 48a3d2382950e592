"""The codebook i-quants as fixed grids that GPTQ chooses points on (``quantkit.quant.ldlq``), and the blocks
written from its choice.

A codebook type decodes a row as runs of ``run`` weights, each with a scale s computed from the super-block's
fp16 d and the run's few-bit l, and points of ``dim`` consecutive weights from the type's codebook:

    value = (s * p) * sign      p a point's coordinate (positive), a sign per weight (IQ3, IQ2)
    value = s * (p + delta)     IQ1: p in {-1, 0, 1}, delta = +1/8 or -1/8 per run (IQ1_S) or per 8 weights (IQ1_M)

| type    | run | dim | points | signs stored                                  | s (float32, as the decoders) |
|---------|-----|-----|--------|-----------------------------------------------|------------------------------|
| IQ3_XXS | 32  | 4   | 256    | 7 bits per 8 weights, even count of negatives | d (0.5 + l) 0.5              |
| IQ3_S   | 32  | 4   | 512    | 8 bits per 8 weights                          | d (1 + 2 l)                  |
| IQ2_XXS | 32  | 8   | 256    | 7 bits per 8, even count                      | d (0.5 + l) 0.25             |
| IQ2_XS  | 16  | 8   | 512    | 7 bits per 8, even count                      | d (0.5 + l) 0.25             |
| IQ2_S   | 16  | 8   | 1024   | 8 bits per 8                                  | d (0.5 + l) 0.25             |
| IQ1_S   | 32  | 8   | 2048   | none; the shift's sign per run                | d (2 l + 1)                  |
| IQ1_M   | 16  | 8   | 2048   | none; the shift's sign per 8 weights          | d (2 l + 1)                  |

The points' coordinates are gguf-py's decoding tables (IQ3_XXS: 4 .. 62, IQ3_S: 1 .. 15, IQ2: 8, 25, 43), so
a value is computed exactly as the decoders compute it. ``choose_codebook_grid`` fixes every run's s (its d and
l) from the original weights with the type's own encoder, diag(H) as its importance (llama-quantize --imatrix's
blocks; IQ3 / IQ2 with every third trial scale, ``TRIAL_STRIDE``); GPTQ then chooses the points, the signs
and IQ1_M's shifts, and ``CodebookWeight.blocks`` writes them with that d and l: decoding the bytes gives
exactly ``CodebookWeight.dequantize``.
Shapes: W [O, I]; s [O, I / run]; points [O, I / dim]; bits [O, I / 8] (bit i: weight 8j + i negative, or for
IQ1 the 8 weights' shift is -1/8).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from quantkit.errors import QuantkitError
from quantkit.formats.gguf import iquants_codebook, iquants_iq1, iquants_iq2
from quantkit.formats.gguf.grids import GridWeight
from quantkit.formats.gguf.layouts import pack_iq1_m, pack_iq1_s
from quantkit.formats.gguf.stream import default_workers

SUPER = 256  # weights per block of every codebook type
CHUNK = 1024  # super-blocks per encoder pass (the encoders' own chunking in blocks.py)
DELTA = float(gq.IQ1_S.delta)  # IQ1's shift, 1/8
# GPTQ keeps only the encoder's run scales, and the IQ3 / IQ2 encoders reach the same ones with every third
# of llama.cpp's trial scales (the same range): on two Gemma 3 270M down_proj weights the weighted error of
# the encoder's own choice moved by at most 0.2 % (IQ3_XXS 0.02226 -> 0.02222, IQ3_S 0.01491 -> 0.01490,
# IQ2_XS 0.06759 -> 0.06758), in 2.2-2.9x less time. Every fifth (a narrower range) was 3-4 % worse.
TRIAL_STRIDE = 3


def _scale_xxs(d: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    return d * (0.5 + sc) * 0.5


def _scale_s(d: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    return d * (1 + 2 * sc)


def _scale_iq2(d: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    return d * (0.5 + sc) * 0.25


def _scale_iq1(d: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    return d * (2 * sc + 1)


@dataclass(frozen=True)
class CodebookSpec:
    """One codebook type's decoding, as the table above."""

    qtype: QT
    run: int
    dim: int
    signs: str  # "parity" (7 bits, even count), "free" (8 bits), "shift" (IQ1: no signs)
    scale_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (fp16 d as float32 [B, 1], l [B, R]) -> s
    table: type  # gguf-py's quant class, whose ``grid`` holds the points' coordinates


SPECS = {
    QT.IQ3_XXS: CodebookSpec(QT.IQ3_XXS, 32, 4, "parity", _scale_xxs, gq.IQ3_XXS),
    QT.IQ3_S: CodebookSpec(QT.IQ3_S, 32, 4, "free", _scale_s, gq.IQ3_S),
    QT.IQ2_XXS: CodebookSpec(QT.IQ2_XXS, 32, 8, "parity", _scale_iq2, gq.IQ2_XXS),
    QT.IQ2_XS: CodebookSpec(QT.IQ2_XS, 16, 8, "parity", _scale_iq2, gq.IQ2_XS),
    QT.IQ2_S: CodebookSpec(QT.IQ2_S, 16, 8, "free", _scale_iq2, gq.IQ2_S),
    QT.IQ1_S: CodebookSpec(QT.IQ1_S, 32, 8, "shift", _scale_iq1, gq.IQ1_S),
    QT.IQ1_M: CodebookSpec(QT.IQ1_M, 16, 8, "shift", _scale_iq1, gq.IQ1_M),
}
CODEBOOK_TYPES = tuple(SPECS)


@cache
def _table(qtype: QT) -> torch.Tensor:
    cls = SPECS[qtype].table
    cls.init_grid()
    return torch.from_numpy(np.array(cls.grid, dtype=np.float32).reshape(-1, SPECS[qtype].dim))  # [G, dim]


def _fields(x: np.ndarray, qtype: QT, qw: np.ndarray) -> dict[str, np.ndarray]:
    """The type's encoder on super-blocks x, importance qw [B, 256] -> its block fields [B, ...] (IQ3 / IQ2:
    every TRIAL_STRIDE-th trial scale)."""
    if qtype in (QT.IQ3_XXS, QT.IQ3_S):
        return iquants_codebook.codebook_fields(x, qtype, None, qw, TRIAL_STRIDE)
    if qtype == QT.IQ1_S:
        return iquants_iq1.iq1_s_fields(x, qw)
    if qtype == QT.IQ1_M:
        return iquants_iq1.iq1_m_fields(x, qw)
    return iquants_iq2.iq2_fields(x, qtype, None, qw, TRIAL_STRIDE)


def _bytes_to_bits(signs: np.ndarray, parity: bool) -> np.ndarray:
    """Stored sign bytes -> 8 sign bits (a 7-bit byte's bit 7: the parity of its bits 0..6)."""
    b = signs.astype(np.int64)
    if parity:
        b = b | ((((b[..., None] >> np.arange(7)) & 1).sum(-1) % 2) << 7)
    return b


@dataclass(frozen=True)
class CodebookGrid:
    """A codebook type's fixed run scales for one weight [O, I], and the encoder's fields they came from."""

    spec: CodebookSpec
    shape: tuple[int, int]
    scale: torch.Tensor  # [O, I / run] float32: every run's s, exactly as the decoders compute it
    fields: dict[str, np.ndarray]  # the encoder's block fields [B, ...] (B = O I / 256, row-major)

    @property
    def qtype(self) -> QT:
        return self.spec.qtype

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The points' coordinates [G, dim] float32."""
        return _table(self.qtype).to(device)

    def rtn(self) -> CodebookWeight:
        """The encoder's own points and signs on this grid (llama-quantize --imatrix's choice; IQ3 / IQ2 from a
        third of its trial scales)."""
        o, i = self.shape
        f, sp = self.fields, self.spec
        points = torch.from_numpy(f["points"].astype(np.int64).reshape(o, i // sp.dim))
        if sp.signs == "shift":
            minus = f["minus"].astype(np.int64).reshape(o, -1)  # per run (IQ1_S) or per 8 weights (IQ1_M)
            bits = np.repeat(minus, i // 8 // minus.shape[1], axis=1)
        else:
            bits = _bytes_to_bits(f["signs"], sp.signs == "parity").reshape(o, i // 8)
        return CodebookWeight(self, points, torch.from_numpy(bits))

    def run_minus(self) -> torch.Tensor:
        """IQ1_S: whether each run's shift is -1/8 [O, I / 32] (fixed with the scales)."""
        return torch.from_numpy(self.fields["minus"].astype(bool).reshape(self.shape[0], -1))


def choose_codebook_grid(W: torch.Tensor, qtype: QT, importance: torch.Tensor) -> CodebookGrid:
    """The run scales of ``qtype`` for W [O, I]: the type's encoder on the original weights, importance
    [I] (diag of the Hessian) as llama-quantize's imatrix, super-block chunk by chunk (IQ3 / IQ2: every
    TRIAL_STRIDE-th trial scale)."""
    sp = SPECS[qtype]
    o, i = W.shape
    if i % SUPER:
        raise QuantkitError(f"row length {i} is not a multiple of {qtype.name}'s block of {SUPER}")
    x = W.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1, SUPER)  # [B, 256]
    imp = importance.detach().to("cpu", torch.float32).clamp_min(0)
    imp = (imp + 1e-8 * imp.mean().clamp_min(1e-30)).numpy().reshape(1, -1, SUPER)  # [1, I / 256, 256]
    per_row = i // SUPER

    def chunk(a: int) -> dict[str, np.ndarray]:  # CHUNK is a multiple of per_row only by chance: tile per chunk
        b = min(a + CHUNK, x.shape[0])
        qw = np.ascontiguousarray(imp[0, np.arange(a, b) % per_row])  # [b - a, 256]
        return _fields(np.ascontiguousarray(x[a:b]), qtype, qw)

    with ThreadPoolExecutor(default_workers()) as pool:  # numpy's passes release the GIL: one chunk per core
        parts = list(pool.map(chunk, range(0, x.shape[0], CHUNK)))
    fields = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    d = fields["dh" if qtype == QT.IQ1_M else "d"]
    d32 = torch.from_numpy(np.asarray(d, dtype=np.float16).astype(np.float32).reshape(-1, 1))  # [B, 1]
    scale = sp.scale_of(d32, torch.from_numpy(fields["sc"].astype(np.float32)))  # [B, R]
    return CodebookGrid(sp, (o, i), scale.reshape(o, i // sp.run).contiguous(), fields)


@dataclass(frozen=True)
class CodebookWeight:
    """A weight [O, I] on a ``CodebookGrid``: points [O, I / dim] and 8-weight bits [O, I / 8] (int64)."""

    grid: CodebookGrid
    points: torch.Tensor
    bits: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return codebook_values(self.grid, self.points, self.bits).to(dtype)

    def blocks(self) -> np.ndarray:
        """The type's blocks uint8 [O, I / 256 * type_bytes], with the grid's d and l."""
        g, sp = self.grid, self.grid.spec
        o, i = g.shape
        B, R = o * i // SUPER, SUPER // sp.run
        pts = self.points.numpy().reshape(B, R, -1)
        bits = self.bits.numpy()
        f = g.fields
        signs = (bits & 127 if sp.signs == "parity" else bits).reshape(B, R, -1)
        if sp.qtype == QT.IQ1_S:
            out = pack_iq1_s(f["d"], pts, f["sc"], bits[:, ::4].reshape(B, R).astype(bool))
        elif sp.qtype == QT.IQ1_M:
            out = pack_iq1_m(f["dh"], pts, f["sc"], bits.reshape(B, R, 2).astype(bool))
        elif sp.qtype == QT.IQ3_S:  # every run written (libggml skips all-zero runs' slots: see pack_iq3_s)
            out = iquants_codebook.PACK[sp.qtype](f["d"], pts, signs, f["sc"], np.ones((B, R), bool))
        else:
            pack = iquants_codebook.PACK if sp.qtype == QT.IQ3_XXS else iquants_iq2.PACK
            out = pack[sp.qtype](f["d"], pts, signs, f["sc"])
        return out.reshape(o, -1)


def codebook_values(grid: CodebookGrid, points: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """The decoded weight [O, I] float32 of points [O, I / dim] and bits [O, I / 8] on ``grid``."""
    sp = grid.spec
    o, i = grid.shape
    s = grid.scale.to(points.device).repeat_interleave(sp.run, 1)  # [O, I]
    p = grid.table(points.device)[points].reshape(o, i)
    if sp.signs == "shift":
        minus = bits.bool().repeat_interleave(8, 1)
        return s * (p + torch.where(minus, -DELTA, DELTA))
    flag = ((bits[:, :, None] >> torch.arange(8, device=bits.device)) & 1).reshape(o, i).bool()
    prod = s * p
    return torch.where(flag, -prod, prod)


BlockWeight = GridWeight | CodebookWeight  # a linear GPTQ wrote as ggml blocks
