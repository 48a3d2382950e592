"""ggml block types as fixed grids that GPTQ can round onto, and the blocks written from its codes.

Every ggml weight type decodes one row as groups of g consecutive weights, each group an affine grid

    value = s * c + b,   c an integer in [lo, hi],

or, for the non-linear types, value = s * levels[c] (c indexes ggml's 16 kvalues_iq4nl levels for IQ4, the
signs -1, +1 for Q1_0),

with s (and b) derived from the block's stored fields exactly as the decoder computes them in float32:

| type | g  | c range   | s                      | b                         | stored per group / block            |
|------|----|-----------|------------------------|---------------------------|-------------------------------------|
| Q8_0 | 32 | -128..127 | fp16 d                 | 0                         | d                                   |
| Q4_0 | 32 | -8..7     | fp16 d                 | 0                         | d                                   |
| Q5_0 | 32 | -16..15   | fp16 d                 | 0                         | d                                   |
| Q4_1 | 32 | 0..15     | fp16 d                 | fp16 m                    | d, m                                |
| Q5_1 | 32 | 0..31     | fp16 d                 | fp16 m                    | d, m                                |
| Q4_K | 32 | 0..15     | fp16 d * sc (6 bit)    | -(fp16 dmin * mn (6 bit)) | d, dmin per 256; sc, mn per 32      |
| Q5_K | 32 | 0..31     | as Q4_K                | as Q4_K                   | as Q4_K                             |
| Q6_K | 16 | -32..31   | fp16 d * sc (int8)     | 0                         | d per 256; sc per 16                |
| Q3_K | 16 | -4..3     | fp16 d * (sc - 32)     | 0                         | d per 256; sc (6 bit) per 16        |
| Q2_K | 16 | 0..3      | fp16 d * sc (4 bit)    | -(fp16 dmin * mn (4 bit)) | d, dmin per 256; sc, mn per 16      |
| IQ4_NL | 32 | 0..15 (levels) | fp16 d          | 0                         | d                                   |
| IQ4_XS | 32 | 0..15 (levels) | fp16 d * sc     | 0                         | d per 256; sc (-32..31) per 32      |
| Q1_0 | 128 | 0..1 (levels -1, 1) | fp16 d         | 0                         | d                                   |
| Q2_0 | 64 | -1..2      | fp16 d                 | 0                         | d                                   |

``choose_grid`` picks those fields from the original weights, each group's scale (and offset) searched
(``grid_search``) to minimise the importance-weighted squared error Σ_j w_j (x_j - value_j)² (w = the diagonal
of GPTQ's Hessian, i.e. llama.cpp's imatrix statistic), then quantizes the K types' sub-block scales onto
their 6/8-bit grids. GPTQ then rounds column by column on that fixed grid (``BlockGrid.column_rounder``) and
``pack`` writes its codes into the blocks without rounding again: decoding the bytes gives exactly s * c + b.
Shapes: W [O, I]; s, b [O, I/g]; codes [O, I]; blocks uint8 [O, I/block * type_bytes].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.ggml_float import signed_absmax
from quantkit.formats.gguf.grid_search import REFINE_STEPS, level_of, round_onto, search_in_chunks
from quantkit.formats.gguf.layouts import LAYOUTS, PACKERS, Layout, block_size, check_codes


@dataclass(frozen=True)
class BlockGrid:
    """A fixed grid for one weight [O, I] of ``qtype``: s, b [O, I/g] float32 and the fields to store."""

    qtype: QT
    s: torch.Tensor
    b: torch.Tensor  # zeros for symmetric types
    fields: dict[str, np.ndarray]  # the stored block fields (see ``pack``)

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.qtype]

    def round_rows(
        self, W: torch.Tensor, rows: torch.Tensor | slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Round-to-nearest of W's ``rows`` (W [O, I]) onto this grid, every column against its own group's
        (s, b): codes int8 and values float32, [r, I]."""
        Wr = W[rows].float()
        r, n = Wr.shape
        g = self.layout.g
        lay = self.layout
        c, v = round_onto(
            Wr.view(r, n // g, g), self.s[rows, :, None], self.b[rows, :, None], lay.lo, lay.hi, lay.levels
        )
        return c.to(torch.int8).view(r, n), v.view(r, n)

    def column_rounder(self) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
        """``(w [O], group) -> (codes, values) [O]``: one column of W rounded onto its group's (s, b), as
        ``round_rows`` rounds it, for GPTQ's column loop: s and b are read as contiguous rows of their
        transposes [G, O], and a group with no zero scale skips their handling."""
        lay = self.layout
        st = self.s.T.contiguous()
        bt = None if lay.sym else self.b.T.contiguous()
        nonzero = (st != 0).all(1).tolist()

        def round_column(w: torch.Tensor, grp: int) -> tuple[torch.Tensor, torch.Tensor]:
            b = None if bt is None else bt[grp]
            c, v = round_onto(w, st[grp], b, lay.lo, lay.hi, lay.levels, nonzero[grp])
            return c.to(torch.int8), v

        return round_column

    def to(self, device: torch.device | str) -> BlockGrid:
        """This grid with s and b on ``device`` (the stored fields stay where they are: numpy)."""
        return replace(self, s=self.s.to(device), b=self.b.to(device))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 [O, I] from codes [O, I] (int8 or float)."""
        o, n = codes.shape
        g = self.layout.g
        v = level_of(codes, self.layout.levels).view(o, n // g, g)  # [O, G, g]
        return torch.addcmul(self.b[:, :, None], self.s[:, :, None], v).view(o, n)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def _nearest(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t)  # half to even, as ggml's nearest_int


def choose_grid(
    W: torch.Tensor, qtype: QT, importance: torch.Tensor | None = None, refine: int = REFINE_STEPS
) -> BlockGrid:
    """The fixed grid of ``qtype`` for W [O, I], searched on the original weights weighted by ``importance``
    [I] (diag of the Hessian; None: unit weights), with ``refine`` Lloyd steps (GPTQ's grids take none)."""
    if qtype not in LAYOUTS:
        raise QuantkitError(f"{qtype.name}: no calibration-aware grid for this type")
    lay = LAYOUTS[qtype]
    o, i = W.shape
    blk = block_size(qtype)
    if i % blk:
        raise QuantkitError(f"row length {i} is not a multiple of {qtype.name}'s block of {blk}")
    W = W.detach().float()
    imp = torch.ones(i) if importance is None else importance.detach().float().cpu().clamp_min(0)
    imp = imp + 1e-8 * imp.mean().clamp_min(1e-30)  # no zero weights: every value keeps a say
    x = W.reshape(-1, lay.g)  # [O*I/g, g]
    w = imp.reshape(1, -1).expand(o, i).reshape(-1, lay.g)
    s, b = search_in_chunks(x, w, lay, refine)
    s, b = s.reshape(o, -1), b.reshape(o, -1)
    if not lay.super_block:
        fields = {"d": s.to(torch.float16).numpy()}
        if not lay.sym:
            fields["m"] = b.to(torch.float16).numpy()
        return BlockGrid(qtype, _fp16(s), _fp16(b), fields)
    return _super_block_grid(qtype, s, b)


def _super_block_grid(qtype: QT, s: torch.Tensor, b: torch.Tensor) -> BlockGrid:
    """Quantize sub-block scales (and mins) onto the K type's grid; s, b [O, I/g]."""
    o, n = s.shape
    per = block_size(qtype) // LAYOUTS[qtype].g  # sub-blocks per super-block
    s3 = s.reshape(o, -1, per)  # [O, S, per]
    if qtype in (QT.Q4_K, QT.Q5_K, QT.Q2_K):
        q = 15 if qtype == QT.Q2_K else 63  # 4-bit or 6-bit sub-block scales and mins
        mn = (-b).reshape(o, -1, per)
        max_s, max_m = s3.amax(-1, keepdim=True), mn.amax(-1, keepdim=True)
        sc = torch.where(max_s > 0, _nearest(q * s3 / max_s.clamp_min(1e-30)), 0 * s3).clamp(0, q)
        lm = torch.where(max_m > 0, _nearest(q * mn / max_m.clamp_min(1e-30)), 0 * mn).clamp(0, q)
        d, dmin = (max_s / q).to(torch.float16), (max_m / q).to(torch.float16)  # [O, S, 1]
        s_q = (d.float() * sc).reshape(o, n)
        b_q = -(dmin.float() * lm).reshape(o, n)
        fields = {
            "d": d.numpy(),
            "dmin": dmin.numpy(),
            "sc": sc.to(torch.uint8).numpy(),
            "mn": lm.to(torch.uint8).numpy(),
        }
        return BlockGrid(qtype, s_q, b_q, fields)
    # Q6_K, Q3_K, IQ4_XS: signed sub-block scales against the signed largest one
    big = torch.from_numpy(signed_absmax(s3.reshape(-1, per).numpy(), 1)).reshape(o, -1, 1)  # [O, S, 1]
    nmax, lo, hi = (128, -128, 127) if qtype == QT.Q6_K else (32, -32, 31)
    zero = big == 0
    iscale = -nmax / torch.where(zero, torch.ones_like(big), big)
    sc = torch.where(zero, 0 * s3, _nearest(iscale * s3)).clamp(lo, hi)
    d = torch.where(zero, 0 * big, 1 / iscale).to(torch.float16)
    s_q = (d.float() * sc).reshape(o, n)
    return BlockGrid(qtype, s_q, torch.zeros_like(s_q), {"d": d.numpy(), "sc": sc.to(torch.int8).numpy()})


# ---------------------------------------------------------------------------------------------- packing


def pack(grid: BlockGrid, codes: torch.Tensor) -> np.ndarray:
    """Codes [O, I] on ``grid`` -> the type's blocks, uint8 [O, I/block * type_bytes]; decoding gives
    exactly ``grid.dequantize(codes)``."""
    c = codes.numpy()
    check_codes(c, grid.qtype)
    nb = c.size // block_size(grid.qtype)
    fields = {k: v.reshape(nb, -1) for k, v in grid.fields.items()}  # per block: [nb, 1] or [nb, sub-blocks]
    return PACKERS[grid.qtype](codes=c.reshape(nb, -1), **fields).reshape(c.shape[0], -1)


@dataclass(frozen=True)
class GridWeight:
    """A weight [O, I] quantized onto a fixed ``BlockGrid``: int8 codes [O, I]."""

    grid: BlockGrid
    codes: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.grid.dequantize(self.codes).to(dtype)

    def blocks(self) -> np.ndarray:
        return pack(self.grid, self.codes)


def rtn_on_grid(W: torch.Tensor, grid: BlockGrid) -> GridWeight:
    """Round-to-nearest of W [O, I] onto ``grid``: every column against its own group's (s, b)."""
    codes, _ = grid.round_rows(W)
    return GridWeight(grid, codes)


def searched_blocks(W: torch.Tensor, qtype: QT, importance: np.ndarray | None = None) -> np.ndarray:
    """W [O, I] rounded to nearest onto ``choose_grid``'s searched scales (weighted by ``importance`` [I]), as
    ggml blocks uint8 [O, row_bytes]: the encoder of a budget mix's Q2_0 weights that GPTQ does not
    write. llama.cpp's reference sets Q2_0's d to max |x|, leaving its level 2d unused: on the Gemma 3 270M's
    weights that is 0.53 relative error, the searched grid 0.13-0.15 (Q4_0's is 0.01)."""
    imp = None if importance is None else torch.from_numpy(np.asarray(importance, dtype=np.float32))
    W = W.float()
    return rtn_on_grid(W, choose_grid(W, qtype, imp)).blocks()
