"""The calibration's statistics, computed in less than one GEMM each: H from its upper triangle, the drift as
W D directly for a subset of few rows, and the factor of H; each against the plain product."""

from __future__ import annotations

import torch

from quantkit.quant import hessian
from quantkit.quant.gptq import factor_hessian, fp_target, weighted_norms
from quantkit.quant.hessian import Drift, Hessian

N_IN = hessian.BLOCK + 300  # two column blocks: the upper-triangle path and its mirror


def _rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, N_IN, generator=g, dtype=torch.float64) * torch.rand(N_IN, generator=g, dtype=torch.float64)


def test_hessian_from_its_upper_triangle_is_the_whole_product():
    x = _rows(1500, 0)
    h = Hessian(N_IN)
    for b in x.split(400):  # batches, rescaled as they come
        h.add(b.float())
    H = h.H
    assert torch.equal(H, H.T)  # mirrored exactly
    ref = 2 * x.T @ x / x.shape[0]
    assert (H.double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_direct_drift_products_equal_w_times_d():
    x, x_fp = _rows(900, 1), _rows(900, 2)
    ws = {"down": torch.randn(200, N_IN, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)}  # 2·200 < N_IN
    direct, full = Drift(N_IN, weights=ws), Drift(N_IN)
    assert direct.D is None and full.D is not None
    for a, b in zip(x_fp.split(300), x.split(300), strict=True):
        direct.add(a.float(), b.float())
        full.add(a.float(), b.float())
    got, ref = direct.products(ws)["down"], full.products(ws)["down"]
    exact = ws["down"].double() @ (2 * (x_fp - x).T @ x / x.shape[0])
    assert (got.double() - exact).abs().max() < 1e-4 * exact.abs().max()
    assert (ref.double() - exact).abs().max() < 1e-4 * exact.abs().max()
    assert full.D is None  # released once the products are taken


def test_hessian_factor_reproduces_the_damped_hessian():
    x = _rows(2 * N_IN, 4)
    h = Hessian(N_IN)
    h.add(x.float())
    H = h.H.double().clone()
    fac = factor_hessian(h, 0.01, actorder=True)
    Hd = H[fac.perm][:, fac.perm] + fac.lam * torch.eye(N_IN, dtype=torch.float64)
    R = fac.R.double()
    assert torch.equal(R, R.triu())
    err = (R @ R.T - Hd).abs().max() / Hd.abs().max()
    assert err < 1e-5, err


def test_triangular_products_fp_target_and_norms_equal_the_plain_formulas():
    """fp_target's M Hd⁻¹ (two triangular solves) and weighted_norms' tr(W H Wᵀ) (H's upper triangle only)
    against the plain products."""
    x = _rows(2 * N_IN, 5)
    h = Hessian(N_IN)
    h.add(x.float())
    H = h.H.double().clone()
    W = torch.randn(64, N_IN, generator=torch.Generator().manual_seed(6))
    (got,) = weighted_norms([W], h.H)
    want = float(torch.trace(W.double() @ H @ W.double().T))
    assert abs(got - want) < 1e-5 * abs(want)
    WD = torch.randn(64, N_IN, generator=torch.Generator().manual_seed(7))
    fac = factor_hessian(h, 0.01)
    Hd = H + fac.lam * torch.eye(N_IN, dtype=torch.float64)
    want_t = W.double() + WD.double() @ torch.linalg.inv(Hd)
    got_t = fp_target(W, WD, fac).double()
    assert (got_t - want_t).abs().max() < 1e-4 * want_t.abs().max()
