"""IQ1_S / IQ1_M blocks: quantkit's numpy searches byte for byte against libggml's ``quantize_iq1_s`` /
``quantize_iq1_m`` with an importance vector (what llama-quantize --imatrix calls; IQ1_M also without one),
decoded alike by gguf-py and libggml; IQ1_S without an importance vector is refused, where libggml aborts.
Whole IQ1 files: tests/test_llama_quantize_files.py. libggml's IQ1 tables take ~60 s to build, once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from quantkit.formats.gguf.blocks import dequantize_rows, quantize_rows, quantize_rows_weighted
from quantkit.formats.gguf.reference import dequantize_rows_ref, quantize_rows_ref


def iq1_rows(seed: int = 0) -> np.ndarray:
    """[R, 512] rows: gaussian with random spreads, heavy tails, bf16-rounded (equal values tie in the sort),
    few distinct values, all zero, a zero run among values, tiny (runs under 1e-12: empty), one outlier."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((24, 512)) * rng.random((24, 1))
    t = rng.standard_t(2, (8, 512))
    bf = torch.from_numpy(rng.standard_normal((12, 512)).astype(np.float32)).bfloat16().float().numpy() * 0.02
    few = rng.integers(-2, 3, (4, 512)) / 4.0
    special = np.stack(
        [
            np.zeros(512),
            np.r_[np.zeros(32), rng.standard_normal(480)],
            np.r_[rng.standard_normal(256) * 1e-14, rng.standard_normal(256)],
            np.r_[50.0, rng.standard_normal(511) * 0.01],
            np.full(512, 0.3),
            np.abs(rng.standard_normal(512)),
        ]
    )
    return np.concatenate([g, t, bf, few, special]).astype(np.float32)


CASES = [(QT.IQ1_S, 0, True), (QT.IQ1_S, 1, True), (QT.IQ1_M, 0, True), (QT.IQ1_M, 1, False)]


@pytest.mark.parametrize(("qtype", "seed", "weighted"), CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_iq1_matches_libggml(libggml, qtype, seed, weighted):
    x = iq1_rows(seed)
    qw = (10 ** (3 * np.random.default_rng(seed + 10).random(512))).astype(np.float32) if weighted else None
    ours = quantize_rows(x, qtype) if qw is None else quantize_rows_weighted(x, qtype, qw)
    ref = quantize_rows_ref(x, qtype, libggml, imatrix=qw)
    size = ours.shape[1] // 2
    bad = (ours.reshape(-1, size) != ref.reshape(-1, size)).any(1)
    assert not bad.any(), f"{bad.sum()} of {bad.size} blocks differ, first {np.flatnonzero(bad)[0]}"
    # gguf-py's decoder reads quantkit's blocks as libggml's does
    np.testing.assert_array_equal(dequantize_rows(ours, qtype), dequantize_rows_ref(ours, qtype, libggml))


def test_iq1_s_needs_an_importance_vector():
    with pytest.raises(ValueError, match="needs an importance matrix"):
        quantize_rows(iq1_rows()[:2], QT.IQ1_S)
