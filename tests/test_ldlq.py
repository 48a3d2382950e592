"""GPTQ onto the codebook i-quants (block LDLQ, ``quantkit.quant.ldlq``): the grid is llama-quantize
--imatrix's own blocks (from a third of its trial scales, at the same error), the chosen points decode
exactly (gguf-py and libggml) to what GPTQ fed forward, and the output error is well below the encoder's on
the same scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from quantkit.errors import QuantkitError
from quantkit.formats.gguf import codebook_grid
from quantkit.formats.gguf.blocks import dequantize_rows, quantize_rows_weighted
from quantkit.formats.gguf.codebook_grid import CODEBOOK_TYPES, choose_codebook_grid
from quantkit.quant.gptq import factor_hessian
from quantkit.quant.hessian import Hessian
from quantkit.quant.ldlq import ldlq_quantize


def _weights(o: int, i: int, seed: int) -> torch.Tensor:
    """Rows of spread magnitude with an all-zero row, an all-positive row and an outlier."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(o, i, generator=g) * (0.2 + torch.rand(o, 1, generator=g))
    W[0] = 0.0
    W[1] = W[1].abs()
    W[2, 5] = 12.0
    return W


def _correlated_hessian(i: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(i, i, generator=g) / i**0.5
    X = torch.randn(4 * i, i, generator=g) @ (torch.eye(i) + 2 * A)  # inputs with correlated features
    return 2.0 / len(X) * X.T @ X


def _factor(H: torch.Tensor, actorder: bool, group: int = 8):
    hess = Hessian(H.shape[0], "cpu")
    hess.H = H.clone()
    return factor_hessian(hess, 0.01, actorder, group)


@pytest.mark.parametrize("actorder", [False, True], ids=["natural", "actorder"])
@pytest.mark.parametrize("qtype", CODEBOOK_TYPES, ids=lambda q: q.name)
def test_ldlq_on_a_codebook(qtype, actorder, libggml, monkeypatch):
    from quantkit.formats.gguf.reference import dequantize_rows_ref

    W, H = _weights(24, 512, 4), _correlated_hessian(512, 5)
    monkeypatch.setattr(codebook_grid, "TRIAL_STRIDE", 1)  # every trial scale: llama-quantize's own blocks
    grid = choose_codebook_grid(W, qtype, H.diagonal())
    # the grid's own points are the encoder's with diag(H) as the imatrix (IQ3_S: libggml skips the slots of
    # an all-zero run, which quantkit writes; the all-zero row is compared apart)
    imp = H.diagonal()
    ref = quantize_rows_weighted(W.numpy(), qtype, (imp + 1e-8 * imp.mean()).numpy())  # as the grid's
    rtn = grid.rtn()
    rows = slice(1, None) if qtype == QT.IQ3_S else slice(None)
    assert np.array_equal(rtn.blocks()[rows], ref[rows])
    assert np.array_equal(dequantize_rows(ref, qtype).reshape(W.shape)[rows], rtn.dequantize().numpy()[rows])

    res = ldlq_quantize(W, _factor(H, actorder), grid)
    got = res.weight.dequantize()
    blocks = res.weight.blocks()  # written with the grid's d and run scales: the decoders give GPTQ's values
    assert np.array_equal(dequantize_rows(blocks, qtype).reshape(W.shape), got.numpy())
    assert np.array_equal(dequantize_rows_ref(blocks, qtype, libggml).reshape(W.shape), got.numpy())

    def out_err(v: torch.Tensor) -> float:
        D = W - v
        return float(((D @ H) * D).sum())

    # measured 0.50-0.67 of the encoder's output error (IQ3_XXS, whose sign parity spans two slabs, highest)
    assert out_err(got) < 0.75 * out_err(rtn.dequantize())
    assert res.sq_output_err == pytest.approx(out_err(got), rel=1e-3)
    assert float(res.row_sq_output_err.sum()) == pytest.approx(res.sq_output_err, rel=1e-9)


@pytest.mark.parametrize("qtype", [QT.IQ3_XXS, QT.IQ3_S, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S], ids=lambda q: q.name)
def test_gptq_grids_take_a_third_of_the_trial_scales_at_the_encoders_error(qtype, monkeypatch):
    """GPTQ keeps only the run scales, which every third trial scale (``TRIAL_STRIDE``) finds about as well:
    the encoder's own choice on them has at most 1 % more weighted error than with every trial."""
    W, H = _weights(64, 512, 7), _correlated_hessian(512, 8)
    imp = H.diagonal()
    coarse = choose_codebook_grid(W, qtype, imp)
    monkeypatch.setattr(codebook_grid, "TRIAL_STRIDE", 1)
    exact = choose_codebook_grid(W, qtype, imp)

    def weighted(grid) -> float:
        return float((imp * (W - grid.rtn().dequantize()) ** 2).sum())

    assert not torch.equal(coarse.scale, exact.scale)  # the stride is in force
    assert weighted(coarse) < 1.01 * weighted(exact)


def test_ldlq_needs_whole_slabs_in_act_order():
    W, H = _weights(4, 256, 1), _correlated_hessian(256, 2)
    grid = choose_codebook_grid(W, QT.IQ2_S, H.diagonal())
    with pytest.raises(QuantkitError, match="act-order must keep runs of 8 columns"):
        ldlq_quantize(W, _factor(H, True, group=1), grid)


def test_act_order_by_runs_keeps_each_run_whole():
    H = _correlated_hessian(64, 3)
    perm = _factor(H, True).perm.reshape(-1, 8)
    assert torch.equal(perm - perm[:, :1], torch.arange(8).expand(8, 8)) and bool((perm[:, 0] % 8 == 0).all())
    sums = H.diagonal()[perm].sum(1)
    assert bool((sums[:-1] >= sums[1:]).all())  # runs by decreasing diag(H)
