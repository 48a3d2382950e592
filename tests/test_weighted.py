"""The importance-weighted encoders (export --imatrix) against libggml's own `quantize_<type>(src, dst, nrows,
n_per_row, quant_weights)`, called through ctypes: the same bytes for every type that takes an importance."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from quantkit.formats.gguf.blocks import WEIGHTED, quantize_rows_weighted
from quantkit.formats.gguf.reference import libggml_path, quantize_rows_ref

pytestmark = pytest.mark.skipif(libggml_path() is None, reason="libggml-base not found (llama-cpp-python)")


def _rows(rows: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of mixed scales with an all-zero block, a flat run and a zero super-block; an importance vector
    with zeros (weights 0) and a wide range."""
    g = np.random.default_rng(seed)
    x = (g.standard_normal((rows, n)) * g.uniform(0.01, 2, (rows, 1))).astype(np.float32)
    x[0, :32], x[1, 16:48], x[2, :256] = 0, 0.5, 0
    x[3] = np.abs(x[3])  # all positive: make_qkx3's min clamps to 0
    qw = (g.standard_normal(n) ** 2 * g.uniform(0.1, 10)).astype(np.float32)
    qw[:16] = 0
    return x, qw


@pytest.mark.parametrize("qtype", [*WEIGHTED, QT.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("n", [512, 768])
def test_weighted_encoder_equals_libggml(qtype, n):
    x, qw = _rows(40, n, n)
    got = quantize_rows_weighted(x, qtype, qw)
    want = quantize_rows_ref(x, qtype, imatrix=qw)
    assert got.shape == want.shape
    differ = np.flatnonzero((got != want).any(axis=1))
    assert differ.size == 0, f"{qtype.name}: rows {differ[:8]} of {len(x)} differ from libggml's"


def test_the_importance_changes_the_bytes():
    """Not a no-op: the weighted bytes differ from the unweighted ones, and from another importance's."""
    x, qw = _rows(8, 512, 0)
    a = quantize_rows_weighted(x, QT.Q4_K, qw)
    assert not np.array_equal(a, quantize_rows_ref(x, QT.Q4_K))
    assert not np.array_equal(a, quantize_rows_weighted(x, QT.Q4_K, qw[::-1].copy()))
