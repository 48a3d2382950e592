"""GPTQ towards the unquantized model (``fp_targets``, GPTQ v2): the target weight is exactly W where the two
models still agree, and where the quantized model's inputs have drifted it lowers the error against the
unquantized model's outputs."""

from __future__ import annotations

import torch
from conftest import CALIB_TEXT
from safetensors.torch import load_file

from quantkit.formats.packed import linear as packed
from quantkit.formats.packed.linear import CastLinear, dense_linear
from quantkit.quant.gptq import factor_hessian, fp_target, gptq_quantize
from quantkit.quant.hessian import Drift, Hessian
from quantkit.quant.primitives import QuantSpec
from quantkit.quant.quantize import quantize_checkpoint
from quantkit.quant.recipes import resolve_options

SPEC = QuantSpec(4, 64, True)


def _correlated(n: int, i: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, i, generator=g) @ (torch.randn(i, i, generator=g) / i**0.5)  # [n, I]


def _stats(x_fp: torch.Tensor, x: torch.Tensor) -> tuple[Hessian, Drift]:
    h, d = Hessian(x.shape[1]), Drift(x.shape[1])
    for a, b in zip(x_fp.split(300), x.split(300), strict=True):  # in batches, as calibration does
        h.add(b)
        d.add(a, b)
    return h, d


def test_no_drift_gives_w_itself():
    x = _correlated(1024, 128, 0)
    h, d = _stats(x, x)
    assert torch.count_nonzero(d.D) == 0
    W = torch.randn(32, 128)
    assert torch.equal(fp_target(W, d.times(W), factor_hessian(h, 0.01, actorder=True)), W)


def test_target_is_the_least_squares_weight():
    """W* minimises ‖W X_fp − W* X‖ (up to the damping): its gradient vanishes."""
    x_fp = _correlated(2048, 96, 1)
    x = x_fp + 0.2 * _correlated(2048, 96, 2)
    h, d = _stats(x_fp, x)
    W = torch.randn(16, 96, dtype=torch.float64)
    Ws = fp_target(W.float(), d.times(W.float()), factor_hessian(h, 1e-6)).double()
    grad = (Ws @ x.double().T - W @ x_fp.double().T) @ x.double()  # [O, I]
    assert grad.norm() < 1e-3 * (W @ x_fp.double().T @ x.double()).norm()


def test_lowers_error_against_the_unquantized_outputs():
    x_fp = _correlated(4096, 256, 3)
    x = x_fp + 0.3 * _correlated(4096, 256, 4)  # the quantized model's inputs have drifted
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    h, d = _stats(x_fp, x)

    def err(qw) -> float:
        return float(((x_fp @ W.T - x @ qw.dequantize().T) ** 2).sum())

    plain = gptq_quantize(W, h.H, SPEC, actorder=True)  # H left unchanged
    fac = factor_hessian(h, 0.01, actorder=True)
    v2 = gptq_quantize(fp_target(W, d.times(W), fac), fac, SPEC)
    assert err(v2.weight) < 0.8 * err(plain.weight)


def test_first_subset_unchanged_then_differs(tiny_gemma2, tmp_path):
    """Layer 0's q/k/v read the embedding in both models: identical codes; later linears see drift."""
    opts = resolve_options(None, fast=True, method="gptq", nsamples=4, seqlen=64, calib=str(CALIB_TEXT), group_size=64)
    quantize_checkpoint(tiny_gemma2, tmp_path / "plain", opts, progress=False)
    report = quantize_checkpoint(tiny_gemma2, tmp_path / "v2", opts.replace(fp_targets=True), progress=False)
    a, b = ({} for _ in range(2))
    for d, name in ((a, "plain"), (b, "v2")):
        for f in sorted((tmp_path / name).glob("*.safetensors")):
            d.update(load_file(f))
    p = "model.layers.0."
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert torch.equal(a[f"{p}{m}.weight_packed"], b[f"{p}{m}.weight_packed"]), m
    assert not torch.equal(a[f"{p}mlp.down_proj.weight_packed"], b[f"{p}mlp.down_proj.weight_packed"])
    assert report["options"]["fp_targets"] is True


def test_cast_linear_is_the_linear_of_its_cast_copy(monkeypatch):
    """The unquantized path keeps the checkpoint's bf16 weights and casts per call: the same products, bit
    for bit, as a linear holding the fp32 copy (half the memory for a bf16 checkpoint); wide weights are
    cast a block of rows at a time."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=g).to(torch.bfloat16)
    x = torch.randn(2, 5, 64, generator=g)
    y = CastLinear(w)(x)
    assert CastLinear(w).weight.dtype == torch.bfloat16
    assert y.dtype == torch.float32
    assert torch.equal(y, dense_linear(w.float())(x))
    monkeypatch.setattr(packed, "ROW_BLOCK", 16)  # three row blocks
    torch.testing.assert_close(CastLinear(w)(x), y, rtol=1e-6, atol=1e-6)
