"""GPTQ against RTN: identical with an identity Hessian, far better on correlated inputs."""

from __future__ import annotations

import pytest
import torch

from quantkit.quant.gptq import factor_hessian, gptq_quantize, output_error
from quantkit.quant.hessian import Hessian
from quantkit.quant.primitives import QuantSpec, rtn


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(4, 32, True),
        QuantSpec(4, 128, False),
        QuantSpec(8, -1, True),
        QuantSpec(3, 64, True),
        QuantSpec(4, 256, True),
    ],
    ids=str,
)
def test_identity_hessian_equals_rtn(spec):
    w = torch.randn(48, 512)
    res = gptq_quantize(w, torch.eye(512), spec, torch.bfloat16)
    ref = rtn(w, spec, torch.bfloat16)
    assert torch.equal(res.weight.codes, ref.codes)
    assert torch.equal(res.weight.scale, ref.scale)
    if not spec.sym:
        assert torch.equal(res.weight.zero, ref.zero)


def _correlated_inputs(n_in: int = 256, rank: int = 16, rows: int = 4096) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(n_in, rank, generator=g)
    return torch.randn(rows, rank, generator=g) @ mix.T + 0.1 * torch.randn(rows, n_in, generator=g)


@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(4, 128, True), QuantSpec(4, 32, False)], ids=str)
def test_gptq_output_error_well_below_rtn(spec, actorder):
    x = _correlated_inputs()
    hess = Hessian(256)
    for part in x.split(1000):  # running average over batches equals the one-shot Hessian
        hess.add(part)
    assert torch.allclose(hess.H, 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-3)
    w = torch.randn(128, 256)
    res = gptq_quantize(w, hess.H, spec, actorder=actorder)
    err = lambda wq: float(((x @ w.T - x @ wq.T) ** 2).sum())  # noqa: E731
    gptq_err, rtn_err = err(res.weight.dequantize()), err(rtn(w, spec).dequantize())
    assert gptq_err < 0.2 * rtn_err, gptq_err / rtn_err
    assert output_error(w, res.weight.dequantize(), hess.H) == pytest.approx(
        gptq_err / float(((x @ w.T) ** 2).sum()), rel=1e-3
    )


def test_dead_inputs_and_damping_retry():
    """A zero input column gets weight 0; a singular Hessian is rescued by damping."""
    x = _correlated_inputs()
    x[:, 5] = 0.0
    hess = Hessian(256)
    hess.add(x)
    res = gptq_quantize(torch.randn(16, 256), hess.H, QuantSpec(4, 128, True), percdamp=1e-9)
    assert torch.all(res.weight.codes[:, 5] == 0)
    assert res.damp >= 1e-9


@pytest.mark.parametrize("actorder", [False, True])
def test_hessian_factor_is_the_inverse_of_the_papers_factor(actorder):
    """R = U⁻¹ for U the upper Cholesky factor of Hd⁻¹ that the paper's GPTQ runs on."""
    x = _correlated_inputs()
    x[:, 7] = 0.0  # a dead input
    hess = Hessian(256)
    hess.add(x)
    H = hess.H.clone()
    fac = factor_hessian(hess, 0.01, actorder)
    assert hess.H is None  # taken: its storage is reused
    Hd = H.double()
    Hd[7, 7] = 1.0
    Hd = Hd[fac.perm][:, fac.perm]
    lam = 0.01 * float(Hd.diagonal().mean())
    Hd += lam * torch.eye(256, dtype=torch.float64)
    want = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert fac.lam == pytest.approx(lam, rel=1e-6)
    U = torch.linalg.inv(fac.R.double())
    assert torch.allclose(U, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    assert torch.equal(fac.R, torch.triu(fac.R))
    if actorder:
        assert torch.equal(fac.perm, torch.argsort(torch.diag(H).masked_fill(H.diag() == 0, 1.0), descending=True))


@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(4, 128, True), QuantSpec(4, 32, False), QuantSpec(8, -1, True)], ids=str)
def test_free_output_error_equals_explicit_trace(spec, actorder):
    """GPTQ's tr(D H Dᵀ) from its scaled errors (W - Q = E·U) equals the explicit product, random data."""
    g = torch.Generator().manual_seed(1)
    x = _correlated_inputs() + 0.5 * torch.randn(4096, 256, generator=g)
    x[:, 3] = 0.0
    hess = Hessian(256)
    hess.add(x)
    w = torch.randn(96, 256, generator=g)
    res = gptq_quantize(w, hess.H, spec, actorder=actorder)
    D = (w - res.weight.dequantize()).double()
    explicit = float(((D @ hess.H.double()) * D).sum())
    assert res.sq_output_err == pytest.approx(explicit, rel=1e-4)
    rows = ((D @ hess.H.double()) * D).sum(1)  # each row's (D H Dᵀ)_rr
    assert torch.allclose(res.row_sq_output_err, rows, rtol=1e-3, atol=1e-6 * float(rows.max()))
    den = float(((w.double() @ hess.H.double()) * w.double()).sum())
    assert output_error(w, res.weight.dequantize(), hess.H) == pytest.approx(explicit / den, rel=1e-4)


def test_shared_factor_gives_the_same_result_as_a_fresh_one():
    """q/k/v (and gate/up) share one factor: the same bytes as factoring the Hessian for each linear."""
    x = _correlated_inputs()
    hess = Hessian(256)
    hess.add(x)
    H = hess.H.clone()
    fac = factor_hessian(hess)
    for seed in range(3):
        w = torch.randn(64, 256, generator=torch.Generator().manual_seed(seed))
        a, b = gptq_quantize(w, fac, QuantSpec(4, 32, True)), gptq_quantize(w, H, QuantSpec(4, 32, True))
        assert torch.equal(a.weight.codes, b.weight.codes) and torch.equal(a.weight.scale, b.weight.scale)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 128, False)], ids=str)
def test_hessian_shrink_runs_from_gptq_to_weighted_rounding(spec):
    """(1 - s) H + s diag(H): s = 0 leaves GPTQ as it was; s = 1 feeds no error to other columns, so the codes
    are round-to-nearest's; in between, the output error (on the true H) lies between the two."""
    from quantkit.quant.hessian import shrink_offdiagonal

    x = _correlated_inputs()
    H = 2 * x.T @ x / len(x)
    w = torch.randn(64, 256)
    err = {}
    for s in (0.0, 0.5, 1.0):
        Hs = H.clone()
        shrink_offdiagonal(Hs, s)
        assert torch.equal(Hs.diagonal(), H.diagonal())
        assert torch.allclose(Hs - torch.diag(Hs.diagonal()), (1 - s) * (H - torch.diag(H.diagonal())))
        res = gptq_quantize(w, Hs, spec, torch.bfloat16)
        err[s] = output_error(w, res.weight.dequantize(), H)
        if s == 1.0:
            assert torch.equal(res.weight.codes, rtn(w, spec, torch.bfloat16).codes)
    assert err[0.0] < err[0.5] < err[1.0], err
