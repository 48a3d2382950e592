"""The descent after GPTQ (quant.descent): coordinate descent over the codes and least-squares block scales lower
GPTQ's error in its own metric, keep every value on the type's grid, and write blocks that decode to exactly
the values chosen."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import CALIB_TEXT
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

from quantkit.cli import cli
from quantkit.formats.gguf.grids import choose_grid
from quantkit.quant.descent import coordinate_descent, refit_affine, refit_block_scales
from quantkit.quant.gptq import factor_hessian, gptq_quantize
from quantkit.quant.hessian import Hessian, shrink_offdiagonal, unshrunk_row_errors
from quantkit.quant.primitives import QuantSpec

# every scalar grid that gguf-py decodes: single-scale blocks, affine blocks, level tables, K super-blocks
TYPES = [QT.Q4_0, QT.Q5_1, QT.Q8_0, QT.IQ4_NL, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q3_K, QT.Q2_K, QT.IQ4_XS]


def _problem(o: int = 48, i: int = 512, n: int = 3072, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [o, i] and a Hessian of correlated inputs with uneven scales (what GPTQ's error feedback exploits)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(i, i, generator=gen) / i**0.5 + torch.eye(i)
    x = (torch.randn(n, i, generator=gen) @ mix) * (0.2 + 3 * torch.rand(i, generator=gen))
    return torch.randn(o, i, generator=gen), x.T @ x / n


def _err(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    d = (W - Q).double()
    return ((d @ H.double()) * d).sum(1)  # [O]


def _gptq(W, H, qtype, lam_frac=0.1):
    """GPTQ onto qtype's grid with damping lam_frac, and its metric H + λI."""
    res = gptq_quantize(W, H, QuantSpec(4, 32), grid=choose_grid(W, qtype, H.diagonal(), refine=0),
                        percdamp=lam_frac, actorder=True)  # fmt: skip
    return res.weight, H + lam_frac * H.diagonal().mean() * torch.eye(H.shape[0])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_descent_lowers_gptqs_own_error_and_decodes_exactly(qtype):
    W, H = _problem()
    gw, Hm = _gptq(W, H, qtype)
    before = _err(W, gw.dequantize(), Hm)
    cd, row_err = coordinate_descent(W, gw, Hm, sweeps=2)
    after = _err(W, cd.dequantize(), Hm)
    torch.testing.assert_close(row_err, after, rtol=1e-4, atol=1e-6)  # the error it reports is the error
    assert (after <= before * (1 + 1e-6)).all()  # never a row worse
    assert after.sum() < 0.99 * before.sum()  # GPTQ's one pass left room
    fitted = cd
    if not gw.grid.layout.super_block:  # then the blocks' fp16 scales
        fitted, row_err = refit_block_scales(W, cd, Hm)
        refitted = _err(W, fitted.dequantize(), Hm)
        assert (refitted <= after * (1 + 1e-6)).all() and refitted.sum() < after.sum()
        torch.testing.assert_close(row_err, refitted, rtol=1e-5, atol=1e-6)
    # the codes and scales are stored as chosen: gguf-py decodes the blocks to exactly these values
    o, i = W.shape
    got = gguf_dequantize(fitted.blocks(), qtype).reshape(o, i)
    np.testing.assert_array_equal(got, fitted.dequantize().numpy())


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_1, QT.IQ4_NL], ids=lambda t: t.name)
def test_refit_changes_only_the_block_floats(qtype):
    """The refit keeps the codes; only the blocks' d (and m) move."""
    W, H = _problem(seed=1)
    gw, Hm = _gptq(W, H, qtype)
    fitted, _ = refit_block_scales(W, gw, Hm)
    assert torch.equal(fitted.codes, gw.codes)
    moved = {k for k in gw.grid.fields if not np.array_equal(gw.grid.fields[k], fitted.grid.fields[k])}
    assert moved and moved <= {"d", "m"}


def test_super_block_scales_are_not_refitted():
    W, H = _problem(o=4, i=256, seed=7)
    gw, Hm = _gptq(W, H, QT.Q4_K)
    with pytest.raises(ValueError, match="Q4_K"):
        refit_block_scales(W, gw, Hm)


@pytest.mark.parametrize("affine", [False, True])
def test_refit_affine_is_least_squares(affine):
    """Row by row, refit_affine's unrounded floats converge to torch.linalg.lstsq's minimiser of ‖Lᵀ(w − A p)‖²
    (H = L Lᵀ), A [I, K·G] holding u (and v) in each block's columns."""
    W, H = _problem(o=6, i=256, seed=2)
    o, i, G = *W.shape, 8
    gen = torch.Generator().manual_seed(3)
    U = torch.randint(-8, 8, (o, i), generator=gen).float()
    V = -torch.randint(0, 4, (o, i), generator=gen).float() if affine else None
    d0, m0 = torch.full((o, G), 1e-3), torch.zeros(o, G) if affine else None
    d, m, _ = refit_affine(W, U, V, H, d0, m0, iters=4 * G)  # conjugate gradients run to convergence
    L = torch.linalg.cholesky(H.double())
    block = torch.arange(i) // (i // G)
    for r in range(o):
        A = torch.zeros(i, G * (2 if affine else 1), dtype=torch.float64)
        A[torch.arange(i), block] = U[r].double()
        if affine:
            A[torch.arange(i), G + block] = V[r].double()
        want = torch.linalg.lstsq(L.T @ A, L.T @ W[r].double()[:, None]).solution[:, 0]
        torch.testing.assert_close(d[r], want[:G], rtol=1e-4, atol=1e-8)  # float32 products
        if affine:
            torch.testing.assert_close(m[r], want[G:], rtol=1e-4, atol=1e-8)


def test_refit_keeps_a_row_it_cannot_improve():
    """A row whose least-squares floats do not beat its own (here: already optimal, so fp16 rounding can only
    lose) keeps them bit for bit."""
    W, H = _problem(o=4, i=256, seed=4)
    gw, Hm = _gptq(W, H, QT.Q8_0)
    once, _ = refit_block_scales(W, gw, Hm)
    twice, _ = refit_block_scales(W, once, Hm)
    np.testing.assert_array_equal(twice.grid.fields["d"], once.grid.fields["d"])


def test_row_errors_in_a_shrunk_metric_convert_back_to_h():
    """GPTQ solved in (1 − s) H + s diag(H) reports its row errors there; ``unshrunk_row_errors`` gives e H eᵀ."""
    W, H = _problem(o=16, i=256, seed=5)
    s = 0.25
    hess = Hessian(H.shape[0], "cpu")
    hess.H = H.clone()
    shrink_offdiagonal(hess.H, s)
    grid = choose_grid(W, QT.Q4_0, H.diagonal(), refine=0)
    res = gptq_quantize(W, factor_hessian(hess, 0.1, True), QuantSpec(4, 32), grid=grid)
    e = W - res.weight.dequantize()
    got = unshrunk_row_errors(res.row_sq_output_err, e, H.diagonal(), s)
    torch.testing.assert_close(got, _err(W, res.weight.dequantize(), H), rtol=1e-4, atol=1e-6)


def test_a_grid_weight_round_trips_through_descent_unchanged_at_zero_sweeps():
    W, H = _problem(o=8, i=256, seed=6)
    gw, Hm = _gptq(W, H, QT.Q4_0)
    assert torch.equal(coordinate_descent(W, gw, Hm, sweeps=0)[0].codes, gw.codes)


def _quantize(model: Path, out: Path, gguf_type: str, sweeps: int) -> dict:
    args = ["quantize", str(model), "--format", "gguf", "--type", gguf_type, "--nsamples", "8", "--seqlen", "64",
            "--calib", str(CALIB_TEXT), "--descent-sweeps", str(sweeps), "-o", str(out), "--json"]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _tensors(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data) for t in gguf.GGUFReader(path).tensors}


def test_quantize_descends_uniform_grids_and_leaves_level_tables(tiny_gemma2, tmp_path):
    """--descent-sweeps lowers a Q4_0 file's output errors (measured against H itself) and changes its blocks;
    an IQ4_NL file's linears keep GPTQ's codes byte for byte."""
    q = {s: _quantize(tiny_gemma2, tmp_path / f"q4_0-{s}.gguf", "q4_0", s) for s in (0, 2)}
    err = {s: np.mean([v["output_rel_err"] for v in r["linears"].values()]) for s, r in q.items()}
    assert err[2] < 0.97 * err[0]
    assert _tensors(tmp_path / "q4_0-0.gguf") != _tensors(tmp_path / "q4_0-2.gguf")
    for s in (0, 2):
        _quantize(tiny_gemma2, tmp_path / f"iq4_nl-{s}.gguf", "iq4_nl", s)
    assert _tensors(tmp_path / "iq4_nl-0.gguf") == _tensors(tmp_path / "iq4_nl-2.gguf")
