"""IQ2_XXS, IQ2_XS and IQ2_S blocks (quantkit.formats.gguf.iquants_iq2) against libggml's quantize_iq2_* through
ctypes (with an importance vector, and IQ2_S also without one, as llama-quantize runs them), and gguf-py's
dequantizer. Skipped without llama-cpp-python."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_codebook_iquants import MISMATCH_LIMIT, codebook_edge_rows
from test_ggml_blocks import awkward_rows, differing_blocks, edge_rows, gaussian, heavy_tailed, rel_rms

from quantkit.formats.gguf.blocks import dequantize_rows, quantize_rows, quantize_rows_weighted
from quantkit.formats.gguf.codebook_search import CodebookOverflowError
from quantkit.formats.gguf.iquants_iq2 import ImportanceRequiredError, codebook
from quantkit.formats.gguf.reference import quantize_rows_ref

IQ2_TYPES = [QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S]
# gguf-py's decoding of gaussian weights, unit importance: relative rms error measured 0.344 (IQ2_XXS), 0.300
# (IQ2_XS), 0.249 (IQ2_S; 0.265 without an importance), bounds ~5 % above; Q2_K measures 0.267 on the same
RMS_BOUND = {QT.IQ2_XXS: 0.36, QT.IQ2_XS: 0.315, QT.IQ2_S: 0.26}


def rows() -> np.ndarray:
    return np.concatenate(
        [gaussian(16, 512, seed=31), heavy_tailed(8, 512, seed=32), awkward_rows(), edge_rows(), codebook_edge_rows()]
    )


def importance(n: int = 512) -> np.ndarray:
    qw = np.random.default_rng(33).gamma(0.5, 1.0, n).astype(np.float32)
    qw[:40] = 0  # columns no calibration token reached
    return qw


@pytest.mark.parametrize("qtype", IQ2_TYPES, ids=lambda t: t.name)
def test_weighted_blocks_equal_libggml(libggml, qtype: QT) -> None:
    """With an importance vector (llama-quantize --imatrix): weights qw * sqrt(sigma2 + x^2)."""
    x, qw = rows(), importance()
    ours = quantize_rows_weighted(x, qtype, qw)
    bad, first = differing_blocks(ours, quantize_rows_ref(x, qtype, libggml, imatrix=qw), qtype)
    assert bad.mean() <= MISMATCH_LIMIT, f"{bad.sum()}/{bad.size} blocks differ; {first}"
    same = quantize_rows_weighted(x, qtype, np.ones_like(qw))
    assert not np.array_equal(ours, same)  # the importance changed the blocks


def test_iq2_s_blocks_equal_libggml(libggml) -> None:
    """IQ2_S without an importance (weights sigma2 / 4 + x^2): what iq3_xxs files get on rows of 256."""
    x = rows()
    bad, first = differing_blocks(quantize_rows(x, QT.IQ2_S), quantize_rows_ref(x, QT.IQ2_S, libggml), QT.IQ2_S)
    assert bad.mean() <= MISMATCH_LIMIT, f"{bad.sum()}/{bad.size} blocks differ; {first}"


@pytest.mark.parametrize("qtype", [QT.IQ2_XXS, QT.IQ2_XS], ids=lambda t: t.name)
def test_unweighted_is_refused(qtype: QT) -> None:
    """libggml aborts the process without an importance (GGML_ASSERT(quant_weights)); quantkit raises."""
    x = gaussian(2, 256)
    with pytest.raises(ImportanceRequiredError, match="importance"):
        quantize_rows(x, qtype)
    with pytest.raises(ValueError, match="aborts"):
        quantize_rows_ref(x, qtype)


@pytest.mark.parametrize("qtype", IQ2_TYPES, ids=lambda t: t.name)
def test_round_trip_error(qtype: QT) -> None:
    """gguf-py decodes quantkit's blocks to within the measured error; all-zero super-blocks to zeros."""
    x = gaussian(32, 1024, seed=3)
    x[0, :256] = 0
    y = dequantize_rows(quantize_rows_weighted(x, qtype, np.ones(1024, np.float32)), qtype)
    assert rel_rms(y[1:], x[1:]) < RMS_BOUND[qtype]
    assert not y[0, :256].any()


@pytest.mark.parametrize(
    ("qtype", "points", "nearest"), [(QT.IQ2_XXS, 256, 2), (QT.IQ2_XS, 512, 2), (QT.IQ2_S, 1024, 1)]
)
def test_neighbour_lists(qtype: QT, points: int, nearest: int) -> None:
    """Every 8-level key rounding reaches (levels 0..2) is a codebook point or has candidates at exactly
    ``nearest`` distances from it, none closer left out (what iq2xs_init_impl lists), sorted by distance."""
    cb = codebook(qtype)
    assert cb.levels.shape == (points, 8) and (cb.index >= 0).sum() == points
    keys = np.flatnonzero((cb.index < 0) & (cb.count > 0))
    assert keys.size == 3**8 - points  # every reachable key off the codebook has a list
    levels = (keys[:, None] >> (2 * np.arange(8))) & 3
    for key, lv in zip(keys[::97], levels[::97], strict=True):
        cand = cb.lists[int(cb.count[key])][cb.row[key]]
        d2 = ((cb.levels - lv) ** 2).sum(1)
        dist = np.unique(d2)[:nearest]
        assert sorted(cand.tolist()) == np.flatnonzero(np.isin(d2, dist)).tolist()
        assert np.all(np.diff(d2[cand]) >= 0)


@pytest.mark.parametrize("qtype", IQ2_TYPES, ids=lambda t: t.name)
def test_huge_weights_are_refused(qtype: QT) -> None:
    """|x| ~ 1e18: every candidate's float32 error overflows, where libggml aborts; quantkit raises."""
    x = gaussian(2, 256, seed=6, scale=1.0)
    qw = np.ones(256, np.float32)
    assert quantize_rows_weighted(x * np.float32(1e9), qtype, qw).shape[0] == 2
    with pytest.raises(CodebookOverflowError, match="too large"):
        quantize_rows_weighted(x * np.float32(1e18), qtype, qw)
