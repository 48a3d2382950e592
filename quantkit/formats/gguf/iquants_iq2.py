"""The 2-bit codebook i-quants IQ2_XXS, IQ2_XS and IQ2_S in numpy, byte for byte what llama-quantize writes:
libggml's ``quantize_iq2_xxs`` / ``quantize_iq2_xs`` / ``quantize_iq2_s`` (``quantize_row_iq2_*_impl``).

A super-block of 256 stores |x| as 8-weight points of a codebook (256 points for IQ2_XXS, 512 for IQ2_XS,
1024 for IQ2_S) whose coordinates are 2l + 1, l in 0..2, times a run's scale; runs are 32 weights (IQ2_XXS)
or 16 (IQ2_XS, IQ2_S). Signs are stored apart: 7 bits per 8 weights with an even count of negatives (IQ2_XXS,
IQ2_XS) or 8 bits (IQ2_S). The scale search is ``quantkit.formats.gguf.codebook_search``'s: trial inverse
scales (5 + 0.1 is) / base over is in -9..9 around the run's max |x| (IQ2_XS, IQ2_S), or -6..6 around three
times make_qp_quants' scale (IQ2_XXS); a group off the codebook takes its best neighbour among the points
at the nearest 2 (IQ2_XXS, IQ2_XS) or 1 (IQ2_S) squared distances. Run scales are stored as 4-bit l with
scale = d (2l + 1), d = max_scale / 31 (times 0.9875 for IQ2_S).

Weights: with an importance qw (llama-quantize --imatrix), qw * sqrt(sigma2 + x^2), sigma2 = sum(x^2) / 256
(IQ2_XXS, IQ2_XS) or 2 sum(x^2) / 256 (IQ2_S) per super-block. Without one, IQ2_S weighs 0.25 sigma2 + x^2;
libggml's IQ2_XXS and IQ2_XS abort without one (``GGML_ASSERT(quant_weights)``), so they raise here
(``ImportanceRequiredError``) and llama-quantize refuses such files.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from quantkit.formats.gguf.codebook_search import (
    Codebook,
    build_tables,
    coarser,
    grid_levels,
    points,
    search_runs,
    super_scales,
)
from quantkit.formats.gguf.ggml_float import F32, GROUP_MAX_EPS, Scratch, columns, dot
from quantkit.formats.gguf.iquants import importance_weights
from quantkit.formats.gguf.layouts import fp16_bytes

IQ2_TYPES = (QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S)
NEEDS_IMPORTANCE = (QT.IQ2_XXS, QT.IQ2_XS)  # libggml asserts quant_weights != NULL
RUN = {QT.IQ2_XXS: 32, QT.IQ2_XS: 16, QT.IQ2_S: 16}


class ImportanceRequiredError(ValueError):
    """IQ2_XXS / IQ2_XS blocks asked for without an importance matrix (libggml aborts there)."""


@cache
def codebook(qtype: QT) -> Codebook:
    """The IQ2 codebooks: 2 bits per level key, levels 0..2 reached by rounding (kMaxQ = 3)."""
    if qtype not in IQ2_TYPES:
        raise ValueError(f"no IQ2 codebook for {qtype.name}")
    grid = {QT.IQ2_XXS: gq.IQ2_XXS, QT.IQ2_XS: gq.IQ2_XS, QT.IQ2_S: gq.IQ2_S}[qtype]
    s, xxs = qtype == QT.IQ2_S, qtype == QT.IQ2_XXS
    tables = build_tables(grid_levels(grid), 1 if s else 2, bits=2, kmax=3)
    return Codebook(
        qtype,
        kmax=3,
        step=0.1,
        trials=6 if xxs else 9,
        eps=1e-8 if s else float(GROUP_MAX_EPS),
        fudge=0.9875 if s else 1.0,
        parity=not s,
        on_grid_init=True,
        resnap_all=xxs,
        resnap_always=xxs,
        qp_start=xxs,
        **tables,
    )


def _weights(x: np.ndarray, qtype: QT, qw: np.ndarray | None, ws: Scratch) -> np.ndarray:
    """The search's weights [run, 256B/run] of super-blocks x [B, 256]."""
    run = RUN[qtype]
    if qw is not None:
        return importance_weights(x, qw, ws, run=run, spread=2.0 if qtype == QT.IQ2_S else 1.0)
    if qtype in NEEDS_IMPORTANCE:
        raise ImportanceRequiredError(f"{qtype.name} needs an importance matrix (libggml aborts without one)")
    xt = np.ascontiguousarray(x.T)
    sigma2 = (F32(2) * dot(xt, xt)) / F32(256)  # [B], C: 2*sumx2/QK_K
    xs = columns(x, run, ws)
    return np.repeat(F32(0.25) * sigma2, 256 // run) + xs * xs


def iq2_fields(
    x: np.ndarray, qtype: QT, ws: Scratch | None = None, qw: np.ndarray | None = None, stride: int = 1
) -> dict:
    """float32 [B, 256] super-blocks (``qw`` [B, 256]: the importance) -> the block fields ``PACK[qtype]``
    writes: fp16 d [B], points [B, runs, groups], sign bytes [B, runs, groups], 4-bit run scales [B, runs].
    ``stride`` > 1: every stride-th trial scale only (``coarser``; no longer libggml's bytes)."""
    cb = coarser(codebook(qtype), stride)
    ws = ws or Scratch()
    B, run = x.shape[0], RUN[qtype]
    with np.errstate(over="ignore"):  # huge weights: inf squares, as in C (the search then refuses them)
        w = _weights(x, qtype, qw, ws)
    scale, lv, signs, zero = search_runs(cb, columns(x, run, ws), w)
    R, g = 256 // run, run // 8  # runs per super-block, 8-groups per run
    dh, sc, empty = super_scales(cb, scale.reshape(B, R))
    # all-zero runs are never written; IQ2_XXS / IQ2_XS also clear an all-zero super-block
    blank = (zero.reshape(B, R) | (empty[:, None] if qtype in NEEDS_IMPORTANCE else False))[..., None]
    pts = np.where(blank, 0, points(cb, lv).T.reshape(B, R, g))  # [B, run, group]
    return dict(d=dh, points=pts, signs=np.where(blank, 0, signs.T.reshape(B, R, g)), sc=sc)


def quantize_iq2(x: np.ndarray, qtype: QT, ws: Scratch | None = None, qw: np.ndarray | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks (``qw`` [B, 256]: the importance) -> uint8 [B, 66] IQ2_XXS, [B, 74]
    IQ2_XS or [B, 82] IQ2_S blocks (``iq2_fields``)."""
    return PACK[qtype](**iq2_fields(x, qtype, ws, qw))


def _u8(a: np.ndarray, dtype: str) -> np.ndarray:
    """Integers [B, ...] -> their little-endian bytes [B, n]."""
    return np.ascontiguousarray(a.astype(dtype)).view(np.uint8).reshape(a.shape[0], -1)


def _nibbles(sc: np.ndarray) -> np.ndarray:
    """4-bit run scales [B, 16] -> [B, 8]: run 2j low, 2j + 1 high."""
    u = sc.astype(np.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def pack_iq2_xxs(d: np.ndarray, points: np.ndarray, signs: np.ndarray, sc: np.ndarray) -> np.ndarray:
    """fp16 d [B], points [B, 8 runs, 4] (0..255), 7-bit signs [B, 8, 4], scales [B, 8] -> [B, 66]: d | per run
    two u32: its four points' bytes, then its sign bytes at bits 0, 7, 14, 21 and its scale at bit 28."""
    s = signs.astype(np.uint32)
    aux = s[..., 0] | (s[..., 1] << 7) | (s[..., 2] << 14) | (s[..., 3] << 21) | (sc.astype(np.uint32) << 28)
    q = np.concatenate([points.astype(np.uint8), _u8(aux, "<u4").reshape(-1, 8, 4)], axis=2)  # [B, 8, 8]
    return np.concatenate([fp16_bytes(d), q.reshape(-1, 64)], axis=1)


def pack_iq2_xs(d: np.ndarray, points: np.ndarray, signs: np.ndarray, sc: np.ndarray) -> np.ndarray:
    """fp16 d [B], points [B, 16 runs, 2] (0..511), 7-bit signs [B, 16, 2], scales [B, 16] -> [B, 74]:
    d | qs u16[32] (point | signs << 9) | scales[8]."""
    qs = points.astype(np.uint16) | (signs.astype(np.uint16) << 9)
    return np.concatenate([fp16_bytes(d), _u8(qs.reshape(-1, 32), "<u2"), _nibbles(sc)], axis=1)


def pack_iq2_s(d: np.ndarray, points: np.ndarray, signs: np.ndarray, sc: np.ndarray) -> np.ndarray:
    """fp16 d [B], points [B, 16 runs, 2] (0..1023), sign bytes [B, 16, 2], scales [B, 16] -> [B, 82]: d |
    qs[32] (the points' low 8 bits) | signs[32] | qh[8] (bits 2j of byte i: group 4i + j's bits 8-9) | scales[8]."""
    p = points.reshape(-1, 32).astype(np.int64)
    qh = ((p >> 8).reshape(-1, 8, 4) << (2 * np.arange(4))).sum(-1)
    parts = [(p & 255), signs.reshape(-1, 32), qh]
    return np.concatenate([fp16_bytes(d), *(a.astype(np.uint8) for a in parts), _nibbles(sc)], axis=1)


PACK = {QT.IQ2_XXS: pack_iq2_xxs, QT.IQ2_XS: pack_iq2_xs, QT.IQ2_S: pack_iq2_s}


def quantize_iq2_s(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    return quantize_iq2(x, QT.IQ2_S, ws)
