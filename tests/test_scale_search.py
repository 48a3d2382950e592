"""Scale search: the best candidate on its own objective (checked by brute force), lower Hessian-weighted output
error on correlated inputs (RTN and GPTQ), bounded rounding error, same options -> same bytes; the scale refit is
the least-squares solution (checked against torch.linalg.lstsq)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import CALIB_TEXT

from quantkit.errors import QuantkitError
from quantkit.quant.gptq import gptq_quantize, output_error
from quantkit.quant.grid_refine import gptq_refined, refit_scales
from quantkit.quant.primitives import (
    QuantSpec,
    choose_qparams,
    dequantize,
    group_range,
    qparams_from_range,
    quantize,
    rtn,
)
from quantkit.quant.quantize import quantize_checkpoint
from quantkit.quant.recipes import resolve_options
from quantkit.quant.scale_search import ScaleSearch, _rounding_error, _weighted_error, rtn_searched, search_qparams

SPECS = [QuantSpec(4, 64, True), QuantSpec(4, 64, False), QuantSpec(3, 32, True)]


def _correlated(o: int = 96, i: int = 256, n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [O, I] with a few outliers and H = 2XᵀX/n [I, I] of inputs with a non-identity covariance."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(i, i, generator=gen) / i**0.5 + torch.eye(i)
    x = torch.randn(n, i, generator=gen) @ mix * (0.2 + 3 * torch.rand(i, generator=gen))  # scaled channels
    w = torch.randn(o, i, generator=gen) * 0.02
    w = torch.where(torch.rand(o, i, generator=gen) < 0.02, 6 * w, w)
    return w, 2 * x.T @ x / n


def test_one_step_is_minmax():
    w, _ = _correlated()
    for spec in SPECS:
        for sdt in (torch.float32, torch.float16, torch.bfloat16):
            got = search_qparams(w, spec, sdt, ScaleSearch("unit", steps=1))
            want = choose_qparams(w, spec, sdt)
            assert torch.equal(got[0], want[0]) and got[0].dtype == want[0].dtype
            assert (got[1] is None) == spec.sym and (spec.sym or torch.equal(got[1], want[1]))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("objective", ["unit", "diag", "block"])
def test_search_finds_the_best_candidate(spec, objective):
    """Per row and group the chosen grid's weighted error is the least over every candidate shrink, each
    scored here by brute force in fp64 (quantize, dequantize, then the objective's own formula)."""
    w, H = _correlated()
    search = ScaleSearch(objective, steps=20)
    h = search.importance(H, slice(None), spec.group_size)
    o, g = w.shape[0], spec.group_size

    def objective_of(scale, zero) -> torch.Tensor:  # [O, G], fp64
        d = (w.double() - dequantize(quantize(w, scale, zero, spec), scale, zero, torch.float64)).reshape(o, -1, g)
        if objective == "unit":
            return (d * d).sum(-1)
        if objective == "diag":
            return (d * d * H.diagonal().double().reshape(1, -1, g)).sum(-1)
        blocks = torch.stack([H[k * g : (k + 1) * g, k * g : (k + 1) * g] for k in range(d.shape[1])]).double()
        return torch.einsum("ogi,gij,ogj->og", d, blocks, d)

    lo, hi = group_range(w, spec)
    shrinks = [1.0 - k * (1.0 - search.min_shrink) / (search.steps - 1) for k in range(search.steps)]
    every = torch.stack([objective_of(*qparams_from_range(lo * p, hi * p, spec)) for p in shrinks])  # [P, O, G]
    s0, z0 = choose_qparams(w, spec)
    s1, z1 = search_qparams(w, spec, torch.float32, search, h)
    got, best, minmax = objective_of(s1, z1), every.min(0).values, objective_of(s0, z0)
    assert torch.allclose(got, best, rtol=1e-5, atol=1e-12), (got - best).abs().max()
    assert got.sum() < 0.97 * minmax.sum(), (got.sum(), minmax.sum())  # and it does find better grids
    assert (s1 <= s0).all()  # only shrinks


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("objective", ["unit", "diag", "block"])
def test_search_in_scratch_buffers_equals_the_plain_loop(spec, objective):
    """The search forms its errors in place; the plain loop over ``_rounding_error`` and ``_weighted_error``
    (fresh tensors) must pick bit-identical scales and zero points, for every scale dtype."""
    w, H = _correlated(o=64, seed=3)
    search = ScaleSearch(objective, steps=20)
    h = search.importance(H, slice(None), spec.group_size)
    hf = None if h is None else h.float()
    for sdt in (torch.float32, torch.float16):
        lo, hi = group_range(w, spec)
        want_s, want_z = qparams_from_range(lo, hi, spec, sdt)
        best = _weighted_error(_rounding_error(w, want_s, want_z, spec), hf)
        for k in range(1, search.steps):
            p = 1.0 - k * (1.0 - search.min_shrink) / (search.steps - 1)
            s, z = qparams_from_range(lo * p, hi * p, spec, sdt)
            err = _weighted_error(_rounding_error(w, s, z, spec), hf)
            better = err < best
            best, want_s = torch.where(better, err, best), torch.where(better, s, want_s)
            want_z = None if z is None else torch.where(better, z, want_z)
        got_s, got_z = search_qparams(w, spec, sdt, search, h)
        assert torch.equal(got_s, want_s) and got_s.dtype == want_s.dtype
        assert (got_z is None) == spec.sym and (spec.sym or torch.equal(got_z, want_z))


@pytest.mark.parametrize("spec", SPECS[:2], ids=str)
def test_weighted_search_lowers_rtn_output_error(spec):
    """On correlated inputs the H-weighted searches beat min-max and the unweighted search in output error."""
    w, H = _correlated()
    err = {"minmax": output_error(w, rtn(w, spec).dequantize(), H)}
    for objective in ("unit", "diag", "block"):
        search = ScaleSearch(objective)
        qw = rtn_searched(w, spec, torch.float32, search, search.importance(H, slice(None), spec.group_size))
        err[objective] = output_error(w, qw.dequantize(), H)
    assert err["unit"] < 0.97 * err["minmax"], err  # measured 0.95 (g64 asym) .. lower (g128 sym)
    assert err["diag"] < err["unit"] and err["block"] < err["unit"], err


@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2]], ids=str)
def test_search_lowers_gptq_output_error(spec, actorder):
    """Symmetric grids (int4-g32-gptq's, int4-g128-gptq-sym's); on asymmetric ones with act-order the gain on
    these synthetic inputs is not reliable."""
    w, H = _correlated()
    base = output_error(w, gptq_quantize(w, H, spec, actorder=actorder).weight.dequantize(), H)
    for objective in ("diag", "block"):
        res = gptq_quantize(w, H, spec, actorder=actorder, search=ScaleSearch(objective))
        err = output_error(w, res.weight.dequantize(), H)
        assert err < 0.95 * base, (objective, err, base)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rounding_error_bounds(spec):
    """Values inside the searched grid's range round to within scale/2; clipped ones lose at most the clipped
    part of the min-max range plus half a step."""
    w, H = _correlated()
    search = ScaleSearch("diag", min_shrink=0.5)
    qw = rtn_searched(w, spec, torch.float32, search, torch.diag(H))
    g = w.shape[1] // qw.scale.shape[1]
    s = qw.scale.float().repeat_interleave(g, 1)
    zp = 0.0 if qw.zero is None else qw.zero.float().repeat_interleave(g, 1)
    err = (w - qw.dequantize()).abs()
    lo, hi = (spec.qmin - zp - 0.5) * s, (spec.qmax - zp + 0.5) * s  # what rounds without clamping
    inside = (w >= lo) & (w <= hi)
    assert inside.float().mean() > 0.9
    assert (err[inside] <= s[inside] / 2 * (1 + 1e-5)).all()
    wg = w.reshape(w.shape[0], -1, g)
    span = (wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)).repeat_interleave(g, 1)
    assert (err[~inside] <= (1 - search.min_shrink) * span[~inside] + s[~inside]).all()


def test_options_validate():
    with pytest.raises(QuantkitError, match="scale_search 'mse'"):
        resolve_options("int4-g128-gptq", scale_search="mse")
    with pytest.raises(QuantkitError, match="min_shrink"):
        resolve_options("int4-g128-gptq", search_min_shrink=0.0)
    assert resolve_options("int4-g128-rtn", scale_search="unit").search == ScaleSearch("unit")


def _digests(out) -> dict[str, str]:
    # quantkit.json records time and memory; the card names its directory and says the settings
    files = sorted(p for p in out.iterdir() if p.name not in ("quantkit.json", "README.md"))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("recipe", ["int4-g128-rtn", "int4-g128-gptq"])
def test_same_options_same_bytes(tiny_gemma3, tmp_path, recipe):
    opts = resolve_options(recipe, nsamples=4, seqlen=32, calib=str(CALIB_TEXT), group_size=32)
    opts = opts.replace(scale_search="unit" if opts.method == "rtn" else "block")
    digests = []
    for k in range(2):
        quantize_checkpoint(tiny_gemma3, tmp_path / str(k), opts, progress=False)
        digests.append(_digests(tmp_path / str(k)))
    quantize_checkpoint(tiny_gemma3, tmp_path / "minmax", opts.replace(scale_search="minmax"), progress=False)
    assert digests[0] == digests[1]
    assert _digests(tmp_path / "minmax") != digests[0]


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1]], ids=str)
def test_refit_scales_is_least_squares(spec):
    """For fixed codes the refitted scales give a lower output error than the grid's, and perturbing them
    either way raises it again (a minimum)."""
    w, H = _correlated()
    qw = gptq_quantize(w, H, spec, actorder=True).weight
    s = refit_scales(w, qw.codes, qw.scale, qw.zero, H)

    def err(scale):
        return output_error(w, dequantize(qw.codes, scale, qw.zero), H)

    assert err(s) < err(qw.scale)
    assert err(s) < err(s * 1.01) and err(s) < err(s * 0.99)


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1]], ids=str)
def test_refit_scales_match_lstsq(spec):
    """Row by row, the refitted scales are torch.linalg.lstsq's minimiser of ‖Lᵀ(w − A s)‖² (H = L Lᵀ; A [I, G]
    holds each code, less its zero point, in its group's column): the least-squares fit in H's metric."""
    w, H = _correlated()
    qw = gptq_quantize(w, H, spec, actorder=True).weight
    got = refit_scales(w, qw.codes, qw.scale, qw.zero, H).double()
    L = torch.linalg.cholesky(H.double())
    o, i = w.shape
    G = qw.scale.shape[1]
    group = torch.arange(i) // (i // G)
    for r in range(0, o, 7):
        c = qw.codes[r].double() - (0.0 if qw.zero is None else qw.zero[r].double()[group])
        A = torch.zeros(i, G, dtype=torch.float64)
        A[torch.arange(i), group] = c
        want = torch.linalg.lstsq(L.T @ A, L.T @ w[r].double()[:, None]).solution[:, 0]
        torch.testing.assert_close(got[r], want, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("actorder", [False, True])
def test_refined_gptq_lowers_the_output_error(actorder):
    """Two refit passes on correlated inputs cut GPTQ's H-weighted output error by more than 5% (measured
    8-12%): refitting scales to the codes is a real gain here, not only a pass that is kept when it ties."""
    w, H = _correlated(seed=1)
    spec = SPECS[0]
    base = output_error(w, gptq_quantize(w, H, spec, actorder=actorder).weight.dequantize(), H)
    refined = gptq_refined(w, H, spec, actorder=actorder, iters=2)
    assert output_error(w, refined.weight.dequantize(), H) < 0.95 * base
