"""The codebook i-quants IQ3_XXS and IQ3_S in numpy, byte for byte what llama-quantize writes without an
importance matrix: libggml's ``quantize_iq3_xxs`` / ``quantize_iq3_s`` (``quantize_row_iq3_xxs_impl`` /
``quantize_row_iq3_s_impl`` with weights x^2).

A super-block of 256 is eight 32-runs; a run stores |x| as eight 4-weight points of a codebook (256 points for
IQ3_XXS, 512 for IQ3_S) whose coordinates are odd levels 2l + 1, l in 0..7, times the run's scale, and the
signs apart: IQ3_S one bit per weight, IQ3_XXS 7 bits per 8 weights with an even count of negatives (an odd
count flips the least important weight, whose |x| then counts as negative). Each run's scale is searched
over trial inverse scales (15 + 0.2 is) / max (is in -15..15 for IQ3_XXS, -9..9 for IQ3_S): every 4-group's
levels are rounded, looked up in the codebook, and a group not in it takes its best neighbour (the
codebook points at the nearest two (IQ3_XXS) or three (IQ3_S) distances from the rounded point, as
``iq3xs_init_impl`` lists them) by weighted error; the scale is refitted by weighted least squares and the
best fit kept. Groups left off the codebook are re-rounded once more at the final scale. The run scales
are then stored as 4-bit l with scale = d (2l + 1), d = max_scale / 31 times a fudge factor (1.0125 / 1.033).

The search itself, shared with the IQ2 types, is ``quantkit.formats.gguf.codebook_search``.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from quantkit.formats.gguf.codebook_search import (
    Codebook,
    CodebookOverflowError,
    build_tables,
    coarser,
    grid_levels,
    points,
    search_runs,
    super_scales,
)
from quantkit.formats.gguf.ggml_float import Scratch, columns
from quantkit.formats.gguf.iquants import importance_weights
from quantkit.formats.gguf.layouts import pack_iq3_s, pack_iq3_xxs

__all__ = [
    "PACK",
    "CodebookOverflowError",
    "codebook",
    "codebook_fields",
    "quantize_codebook",
    "quantize_iq3_s",
    "quantize_iq3_xxs",
]


@cache
def codebook(qtype: QT) -> Codebook:
    """IQ3_XXS (256 points, neighbours at the nearest 2 distances) or IQ3_S (512, 3): 3 bits per level."""
    if qtype not in (QT.IQ3_XXS, QT.IQ3_S):
        raise ValueError(f"no codebook for {qtype.name}")
    xxs = qtype == QT.IQ3_XXS
    tables = build_tables(grid_levels(gq.IQ3_XXS if xxs else gq.IQ3_S), 2 if xxs else 3, bits=3, kmax=8)
    trials, eps, fudge = (15, 1e-8, 1.0125) if xxs else (9, 0.0, 1.033)
    flags = dict(parity=xxs, on_grid_init=xxs, resnap_all=not xxs, resnap_always=False, qp_start=False)
    return Codebook(qtype, kmax=8, step=0.2, trials=trials, eps=eps, fudge=fudge, **flags, **tables)


def codebook_fields(
    x: np.ndarray, qtype: QT, ws: Scratch | None = None, qw: np.ndarray | None = None, stride: int = 1
) -> dict:
    """float32 [B, 256] super-blocks -> the IQ3_XXS / IQ3_S block fields ``PACK[qtype]`` writes: fp16 d [B],
    points [B, 8 runs, 8 groups], sign bytes [B, 8, 4], 4-bit run scales [B, 8] (IQ3_S: and which runs are
    written [B, 8]). ``qw`` [B, 256]: an importance (llama-quantize --imatrix): weights qw * sqrt(sigma2 + x^2),
    sigma2 = 2 sum(x^2) / 256 per super-block, as for IQ4_XS. ``stride`` > 1: every stride-th trial scale only
    (``coarser``; no longer libggml's bytes)."""
    cb = coarser(codebook(qtype), stride)
    ws = ws or Scratch()
    B = x.shape[0]
    xs = columns(x, 32, ws)
    with np.errstate(over="ignore"):  # huge weights: inf squares, as in C (the search then refuses them)
        w = np.multiply(xs, xs) if qw is None else importance_weights(x, qw, ws)
    scale, lv, signs, zero = search_runs(cb, xs, w)
    dh, sc, empty = super_scales(cb, scale.reshape(B, 8))
    pts = points(cb, lv).T.reshape(B, 8, 8)  # [B, run, group]
    signs = signs.T.reshape(B, 8, 4)  # [B, run, byte]
    zero = zero.reshape(B, 8)
    if qtype == QT.IQ3_XXS:  # all-zero runs store point 0 and no signs; an all-zero super-block stores nothing
        blank = (zero | empty[:, None])[..., None]
        return dict(d=dh, points=np.where(blank, 0, pts), signs=np.where(blank, 0, signs), sc=sc)
    return dict(d=dh, points=pts, signs=signs, sc=sc, written=~zero)


PACK = {QT.IQ3_XXS: pack_iq3_xxs, QT.IQ3_S: pack_iq3_s}


def quantize_codebook(x: np.ndarray, qtype: QT, ws: Scratch | None = None, qw: np.ndarray | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 98] IQ3_XXS or [B, 110] IQ3_S blocks (``codebook_fields``)."""
    return PACK[qtype](**codebook_fields(x, qtype, ws, qw))


def quantize_iq3_xxs(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    return quantize_codebook(x, QT.IQ3_XXS, ws)


def quantize_iq3_s(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    return quantize_codebook(x, QT.IQ3_S, ws)
