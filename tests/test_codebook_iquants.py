"""IQ3_XXS and IQ3_S blocks (quantkit.formats.gguf.iquants_codebook) against libggml's quantize_iq3_xxs /
quantize_iq3_s without an importance matrix (what llama-quantize runs), through ctypes, and gguf-py's
dequantizer. Skipped without llama-cpp-python."""

from __future__ import annotations

import platform

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_ggml_blocks import awkward_rows, differing_blocks, edge_rows, gaussian, heavy_tailed, rel_rms

from quantkit.formats.gguf.blocks import dequantize_rows, quantize_rows, quantize_rows_weighted
from quantkit.formats.gguf.iquants_codebook import CodebookOverflowError, codebook
from quantkit.formats.gguf.reference import quantize_rows_ref

CODEBOOK_TYPES = [QT.IQ3_XXS, QT.IQ3_S]
# libggml-base is built without FMA on x86-64; a build that contracts a*b+c may move a grid point
MISMATCH_LIMIT = 0.0 if platform.machine().lower() in ("x86_64", "amd64") else 0.05
# gguf-py's decoding of gaussian weights: relative rms error, measured 0.226 (IQ3_XXS) and 0.189 (IQ3_S),
# bounds ~10 % above; Q3_K (3.44 bits per weight, as IQ3_S) measures 0.20 on the same weights
RMS_BOUND = {QT.IQ3_XXS: 0.25, QT.IQ3_S: 0.21}


def codebook_edge_rows() -> np.ndarray:
    """[8, 512] rows with the cases the two searches treat apart."""
    x = gaussian(8, 512, seed=11)
    x[0, 64:96] = 0  # an all-zero 32-run mid super-block: IQ3_S writes the next runs' points one slot early
    x[1, :32] = 0  # ... at its start
    x[1, 256 + 224 :] = 0  # ... at its end
    x[2, :256] = 0
    x[2, 256:] *= 1e-9  # runs under IQ3_XXS's all-zero threshold (max < 1e-8), not under IQ3_S's (max == 0)
    x[3, ::2] = -np.abs(x[3, ::2])  # many negatives: parity flips in every 8-group
    x[4] = np.where(np.arange(512) % 8 == 3, -1e-6, np.abs(x[4]))  # one small negative per 8-group: flipped
    x[5, :] = np.float32(0.01) * (np.arange(512) % 16 - 7.5)  # the same run repeated: ties in the searches
    x[6, 5] = 3.0  # an outlier: its run's points sit near the top of the codebook
    x[7] *= 1e-20  # squares underflow to 0 on some weights
    return x


@pytest.mark.parametrize("qtype", CODEBOOK_TYPES, ids=lambda t: t.name)
def test_blocks_equal_libggml(libggml, qtype: QT) -> None:
    x = np.concatenate(
        [gaussian(24, 512), heavy_tailed(16, 512, seed=5), awkward_rows(), edge_rows(), codebook_edge_rows()]
    )
    bad, first = differing_blocks(quantize_rows(x, qtype), quantize_rows_ref(x, qtype, libggml), qtype)
    assert bad.mean() <= MISMATCH_LIMIT, f"{bad.sum()}/{bad.size} blocks differ; {first}"


@pytest.mark.parametrize("qtype", CODEBOOK_TYPES, ids=lambda t: t.name)
def test_round_trip_error(qtype: QT) -> None:
    """gguf-py decodes quantkit's blocks to within the measured error; all-zero super-blocks to zeros."""
    x = gaussian(32, 1024, seed=3)
    x[0, :256] = 0
    y = dequantize_rows(quantize_rows(x, qtype), qtype)
    assert rel_rms(y[1:], x[1:]) < RMS_BOUND[qtype]
    assert not y[0, :256].any()


@pytest.mark.parametrize(("qtype", "points", "nearest"), [(QT.IQ3_XXS, 256, 2), (QT.IQ3_S, 512, 3)])
def test_neighbour_lists(qtype: QT, points: int, nearest: int) -> None:
    """Every 4-level key is either a codebook point or has candidates at exactly ``nearest`` distances from
    it, none closer left out (what iq3xs_init_impl lists; the byte tests depend on their order)."""
    cb = codebook(qtype)
    assert cb.levels.shape == (points, 4) and (cb.index >= 0).sum() == points
    levels = (np.arange(4096)[:, None] >> np.array([0, 3, 6, 9])) & 7
    for key in np.flatnonzero(cb.index < 0)[::37]:
        cand = cb.lists[int(cb.count[key])][cb.row[key]]
        d2 = ((cb.levels - levels[key]) ** 2).sum(1)  # same order as distances of the odd coordinates
        dist = np.unique(d2)[:nearest]
        assert sorted(cand.tolist()) == np.flatnonzero(np.isin(d2, dist)).tolist()
        assert np.all(np.diff(d2[cand]) >= 0)


@pytest.mark.parametrize("qtype", CODEBOOK_TYPES, ids=lambda t: t.name)
def test_huge_weights_are_refused(qtype: QT) -> None:
    """|x| ~ 1e18: every candidate's float32 error overflows, where libggml aborts the process
    (GGML_ASSERT(grid_index >= 0)); quantkit raises. 1e9 still encodes, as in C."""
    x = gaussian(2, 256, seed=6, scale=1.0)
    assert quantize_rows(x * np.float32(1e9), qtype).shape[0] == 2
    with pytest.raises(CodebookOverflowError, match="too large"):
        quantize_rows(x * np.float32(1e18), qtype)


@pytest.mark.parametrize("qtype", CODEBOOK_TYPES, ids=lambda t: t.name)
def test_weighted_blocks_equal_libggml(libggml, qtype: QT) -> None:
    """With an importance vector (llama-quantize --imatrix): weights qw * sqrt(sigma2 + x^2)."""
    x = np.concatenate([gaussian(16, 512, seed=12), heavy_tailed(8, 512, seed=13), codebook_edge_rows()])
    qw = np.random.default_rng(14).gamma(0.5, 1.0, 512).astype(np.float32)
    qw[:40] = 0  # columns no calibration token reached
    ours = quantize_rows_weighted(x, qtype, qw)
    bad, first = differing_blocks(ours, quantize_rows_ref(x, qtype, libggml, imatrix=qw), qtype)
    assert bad.mean() <= MISMATCH_LIMIT, f"{bad.sum()}/{bad.size} blocks differ; {first}"
    assert bad.size and not np.array_equal(ours, quantize_rows(x, qtype))  # the importance changed the blocks
