"""ggml block types as fixed grids that GPTQ can round onto, and the blocks written from its codes.

Every ggml weight type decodes one row as groups of g consecutive weights, each group an affine grid

    value = s * c + b,   c an integer in [lo, hi],

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

``choose_grid`` picks those fields from the original weights, each group's scale (and offset) searched to
minimise the importance-weighted squared error Σ_j w_j (x_j - value_j)² (w = the diagonal of GPTQ's Hessian,
i.e. llama.cpp's imatrix statistic), then quantizes the K types' sub-block scales onto their 6/8-bit grids.
GPTQ then rounds column by column on that fixed grid (``BlockGrid.quantize``) and ``pack`` writes its codes
into the blocks without rounding again: decoding the bytes gives exactly s * c + b.
Shapes: W [O, I]; s, b [O, I/g]; codes [O, I]; blocks uint8 [O, I/block * type_bytes].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class _Layout:
    g: int  # weights per group (one s, b)
    lo: int
    hi: int
    sym: bool  # b = 0
    super_block: bool  # K type: 256-weight super-blocks with quantized sub-block scales


LAYOUTS = {
    QT.Q8_0: _Layout(32, -128, 127, True, False),
    QT.Q4_0: _Layout(32, -8, 7, True, False),
    QT.Q5_0: _Layout(32, -16, 15, True, False),
    QT.Q4_1: _Layout(32, 0, 15, False, False),
    QT.Q5_1: _Layout(32, 0, 31, False, False),
    QT.Q4_K: _Layout(32, 0, 15, False, True),
    QT.Q5_K: _Layout(32, 0, 31, False, True),
    QT.Q6_K: _Layout(16, -32, 31, True, True),
    QT.Q3_K: _Layout(16, -4, 3, True, True),
}
SEARCH_STEPS = 10  # candidate grids per group: 2 * SEARCH_STEPS + 1


@dataclass(frozen=True)
class BlockGrid:
    """A fixed grid for one weight [O, I] of ``qtype``: s, b [O, I/g] float32 and the fields to store."""

    qtype: QT
    s: torch.Tensor
    b: torch.Tensor  # zeros for symmetric types
    fields: dict[str, np.ndarray]  # the stored block fields (see ``pack``)

    @property
    def layout(self) -> _Layout:
        return LAYOUTS[self.qtype]

    def quantize(self, w: torch.Tensor, groups: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and values of columns ``w`` [O, n] whose groups are ``groups`` (indices into s's columns)."""
        s, b = self.s[:, groups], self.b[:, groups]
        if s.dim() == 1:
            s, b = s[:, None], b[:, None]
        lay = self.layout
        safe = torch.where(s == 0, torch.ones_like(s), s)
        c = torch.round((w - b) / safe).clamp(lay.lo, lay.hi)
        c = torch.where(s == 0, torch.zeros_like(c), c)
        return c.to(torch.int8), s * c + b

    def to(self, device: torch.device | str) -> BlockGrid:
        """This grid with s and b on ``device`` (the stored fields stay where they are: numpy)."""
        return replace(self, s=self.s.to(device), b=self.b.to(device))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        g = self.layout.g
        return self.s.repeat_interleave(g, 1) * codes.float() + self.b.repeat_interleave(g, 1)


# ------------------------------------------------------------------------------------------ grid search


def _rounded_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, b: torch.Tensor, lo: int, hi: int):
    """Σ w (x - (s c + b))² with c = clamp(round((x - b) / s), lo, hi): the error of rounding onto (s, b)."""
    safe = torch.where(s == 0, torch.ones_like(s), s)[:, None]
    c = torch.round((x - b[:, None]) / safe).clamp(lo, hi)
    c = torch.where(s[:, None] == 0, torch.zeros_like(c), c)
    return (w * (x - (s[:, None] * c + b[:, None])) ** 2).sum(-1)


def _keep_better(best: list[torch.Tensor], cand: list[torch.Tensor], ok: torch.Tensor) -> list[torch.Tensor]:
    """best / cand = [s, b, error]: per group, the candidate where it is valid and lower."""
    better = ok & (cand[2] < best[2])
    return [torch.where(better, c, o) for c, o in zip(cand, best, strict=True)]


def _search_sym(x: torch.Tensor, w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per group the scale s minimising Σ w (x - s c)², c = clamp(round(x / s), lo, hi). Candidates map the
    signed largest-magnitude value m near the code lo (s = m / lo, the reference quantizers' choice, is the
    first), each refitted by weighted least squares on its codes and kept if re-rounding onto it is better.
    x, w [N, g] -> s [N] (0 for all-zero groups)."""
    m = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed max magnitude [N]
    zero_b = torch.zeros_like(m)
    s0 = m / lo
    best = [s0, zero_b, _rounded_error(x, w, s0, zero_b, lo, hi)]
    safe_m = torch.where(m == 0, torch.ones_like(m), m)
    for t in range(-SEARCH_STEPS, SEARCH_STEPS + 1):
        c = torch.round(x * (-(-lo + 0.1 * t) / safe_m)[:, None]).clamp(lo, hi)
        num, den = (w * x * c).sum(-1), (w * c * c).sum(-1)
        s = num / den.clamp_min(1e-30)
        best = _keep_better(best, [s, zero_b, _rounded_error(x, w, s, zero_b, lo, hi)], den > 0)
    return torch.where(m == 0, zero_b, best[0])


def _search_asym(x: torch.Tensor, w: torch.Tensor, nmax: int, offset_le_zero: bool):
    """Per group (s >= 0, b) minimising Σ w (x - (s c + b))², c = clamp(round((x - b) / s), 0, nmax).
    Candidates stretch the [min, max] range (the min-max grid is the first), each refitted by weighted least
    squares on its codes; K types store the offset as a non-negative min that is subtracted, so there b <= 0.
    x, w [N, g] -> s, b [N]."""
    lo, hi = x.amin(-1), x.amax(-1)
    if offset_le_zero:
        lo = lo.clamp(max=0.0)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    s0 = (hi - lo) / nmax
    best = [s0, lo, _rounded_error(x, w, s0, lo, 0, nmax)]
    sw, swx = w.sum(-1), (w * x).sum(-1)
    for t in range(-SEARCH_STEPS, SEARCH_STEPS + 1):
        c = torch.round((x - lo[:, None]) * ((nmax + 0.1 * t) / span)[:, None]).clamp(0, nmax)
        swc, swcc, swcx = (w * c).sum(-1), (w * c * c).sum(-1), (w * c * x).sum(-1)
        det = sw * swcc - swc * swc
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        s, b = (sw * swcx - swc * swx) / det, (swcc * swx - swc * swcx) / det
        if offset_le_zero:  # refit the scale alone with the offset pinned at 0
            pos = b > 0
            s, b = torch.where(pos, swcx / swcc.clamp_min(1e-30), s), torch.where(pos, torch.zeros_like(b), b)
        best = _keep_better(best, [s, b, _rounded_error(x, w, s, b, 0, nmax)], ok & (s > 0))
    flat = hi <= lo
    return torch.where(flat, torch.zeros_like(best[0]), best[0]), torch.where(flat, lo, best[1])


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def _nearest(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t)  # half to even, as ggml's nearest_int


def choose_grid(W: torch.Tensor, qtype: QT, importance: torch.Tensor | None = None) -> BlockGrid:
    """The fixed grid of ``qtype`` for W [O, I], searched on the original weights weighted by ``importance``
    [I] (diag of the Hessian; None: unit weights)."""
    if qtype not in LAYOUTS:
        raise QuantkitError(f"{qtype.name}: no calibration-aware grid for this type")
    lay = LAYOUTS[qtype]
    o, i = W.shape
    blk = GGML_QUANT_SIZES[qtype][0]
    if i % blk:
        raise QuantkitError(f"row length {i} is not a multiple of {qtype.name}'s block of {blk}")
    W = W.detach().float()
    imp = torch.ones(i) if importance is None else importance.detach().float().cpu().clamp_min(0)
    imp = imp + 1e-8 * imp.mean().clamp_min(1e-30)  # no zero weights: every value keeps a say
    x = W.reshape(-1, lay.g)  # [O*I/g, g]
    w = imp.reshape(1, -1).expand(o, i).reshape(-1, lay.g)
    if lay.sym:
        s, b = _search_sym(x, w, lay.lo, lay.hi), torch.zeros(x.shape[0])
    else:
        s, b = _search_asym(x, w, lay.hi, offset_le_zero=lay.super_block)
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
    per = 256 // LAYOUTS[qtype].g  # sub-blocks per super-block
    s3 = s.reshape(o, -1, per)  # [O, S, per]
    if qtype in (QT.Q4_K, QT.Q5_K):
        mn = (-b).reshape(o, -1, per)
        max_s, max_m = s3.amax(-1, keepdim=True), mn.amax(-1, keepdim=True)
        sc = torch.where(max_s > 0, _nearest(63 * s3 / max_s.clamp_min(1e-30)), 0 * s3).clamp(0, 63)
        lm = torch.where(max_m > 0, _nearest(63 * mn / max_m.clamp_min(1e-30)), 0 * mn).clamp(0, 63)
        d, dmin = (max_s / 63).to(torch.float16), (max_m / 63).to(torch.float16)  # [O, S, 1]
        s_q = (d.float() * sc).reshape(o, n)
        b_q = -(dmin.float() * lm).reshape(o, n)
        fields = {
            "d": d.numpy(),
            "dmin": dmin.numpy(),
            "sc": sc.to(torch.uint8).numpy(),
            "mn": lm.to(torch.uint8).numpy(),
        }
        return BlockGrid(qtype, s_q, b_q, fields)
    # Q6_K, Q3_K: signed sub-block scales against the signed largest one
    big = s3.gather(-1, s3.abs().argmax(-1, keepdim=True))  # [O, S, 1]
    nmax, lo, hi = (128, -128, 127) if qtype == QT.Q6_K else (32, -32, 31)
    zero = big == 0
    iscale = -nmax / torch.where(zero, torch.ones_like(big), big)
    sc = torch.where(zero, 0 * s3, _nearest(iscale * s3)).clamp(lo, hi)
    d = torch.where(zero, 0 * big, 1 / iscale).to(torch.float16)
    s_q = (d.float() * sc).reshape(o, n)
    return BlockGrid(qtype, s_q, torch.zeros_like(s_q), {"d": d.numpy(), "sc": sc.to(torch.int8).numpy()})


# ---------------------------------------------------------------------------------------------- packing


def _le16(v: np.ndarray) -> np.ndarray:
    """float16 [...] -> uint8 [..., 2] little-endian."""
    return np.ascontiguousarray(v.astype("<f2")).view(np.uint8).reshape(*v.shape, 2)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """uint8 [B, 32] (0..15) -> [B, 16]: byte j = element j | element j+16 << 4 (legacy types)."""
    return u[:, :16] | (u[:, 16:] << 4)


def _high_bits_u32(u: np.ndarray) -> np.ndarray:
    """bit 4 of 32 codes [B, 32] -> [B, 4] bytes of a little-endian u32 (bit k = element k)."""
    return np.packbits((u >> 4) & 1, axis=-1, bitorder="little")


def _pack_scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """6-bit scales and mins [B, 8] -> the 12 packed bytes of Q4_K/Q5_K."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _pack_scales_q3(ls: np.ndarray) -> np.ndarray:
    """16 unsigned 6-bit scales [B, 16] -> the 12 packed bytes of Q3_K."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, :8] = (ls[:, :8] & 15) | ((ls[:, 8:] & 15) << 4)
    hi = ls >> 4  # [B, 16], 2 bits each
    for j in range(16):
        out[:, 8 + j % 4] |= (hi[:, j] << (2 * (j // 4))).astype(np.uint8)
    return out


def pack(grid: BlockGrid, codes: torch.Tensor) -> np.ndarray:
    """Codes [O, I] on ``grid`` -> the type's blocks, uint8 [O, I/block * type_bytes]; decoding gives
    exactly ``grid.dequantize(codes)``."""
    q, lay = grid.qtype, grid.layout
    c = codes.numpy().astype(np.int16)
    if c.min() < lay.lo or c.max() > lay.hi:
        raise ValueError(f"{q.name}: codes must lie in [{lay.lo}, {lay.hi}]")
    o, i = c.shape
    f = grid.fields
    if not lay.super_block:
        u = (c - lay.lo if lay.sym else c).astype(np.uint8).reshape(-1, 32)  # unsigned stored codes
        parts = [_le16(f["d"].reshape(-1))]
        if "m" in f:
            parts.append(_le16(f["m"].reshape(-1)))
        if q == QT.Q8_0:
            parts.append(c.astype(np.int8).reshape(-1, 32).view(np.uint8))
        elif q in (QT.Q5_0, QT.Q5_1):
            parts += [_high_bits_u32(u), _nibbles(u & 15)]
        else:
            parts.append(_nibbles(u))
        return np.concatenate(parts, axis=1).reshape(o, -1)
    nb = o * i // 256
    if q in (QT.Q4_K, QT.Q5_K):
        u = c.astype(np.uint8).reshape(nb, 4, 2, 32)  # [B, chunk of 64, half, 32]
        qs = ((u[:, :, 0] & 15) | ((u[:, :, 1] & 15) << 4)).reshape(nb, 128)
        scales = _pack_scale_min_k4(f["sc"].reshape(nb, 8), f["mn"].reshape(nb, 8))
        parts = [_le16(f["d"].reshape(nb)), _le16(f["dmin"].reshape(nb)), scales]
        if q == QT.Q5_K:
            hb = (u.reshape(nb, 8, 32) >> 4) & 1  # [B, sub-block j, l] -> bit j of qh[l]
            parts.append((hb << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8))
        parts.append(qs)
        return np.concatenate(parts, axis=1).reshape(o, -1)
    if q == QT.Q6_K:
        u = (c + 32).astype(np.uint8).reshape(nb, 2, 4, 32)  # [B, half, quarter, l]
        ql = np.concatenate([(u[:, :, 0] & 15) | ((u[:, :, 2] & 15) << 4),
                             (u[:, :, 1] & 15) | ((u[:, :, 3] & 15) << 4)], axis=2).reshape(nb, 128)  # fmt: skip
        qh = ((u >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2).astype(np.uint8)
        sc = f["sc"].reshape(nb, 16).view(np.uint8)
        return np.concatenate([ql, qh.reshape(nb, 64), sc, _le16(f["d"].reshape(nb))], axis=1).reshape(o, -1)
    # Q3_K: stored L = c + 4 in 0..7; bit 2 in hmask (element e: byte e % 32, bit e // 32), low 2 bits in qs
    u = (c + 4).astype(np.uint8).reshape(nb, 256)
    hm = ((u >> 2) & 1).reshape(nb, 8, 32)
    hmask = (hm << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8)
    low = (u & 3).reshape(nb, 2, 4, 32)  # [B, 128-chunk, shift, l]
    qs = (low << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2).astype(np.uint8).reshape(nb, 64)
    ls = (f["sc"].reshape(nb, 16).astype(np.int16) + 32).astype(np.uint8)
    return np.concatenate([hmask, qs, _pack_scales_q3(ls), _le16(f["d"].reshape(nb))], axis=1).reshape(o, -1)


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
    codes, _ = grid.quantize(W.float(), torch.arange(W.shape[1]) // grid.layout.g)
    return GridWeight(grid, codes.to(torch.int8))
