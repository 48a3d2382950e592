"""The compute dtype (docs/speed.md): what "auto" picks, weights held for a pass (the same products, made once),
and calibration in bf16: the same bytes on every run, and no worse than fp32 beyond bf16's rounding."""

from __future__ import annotations

import pytest
import torch

import quantkit.io.dtypes as dtypes
from quantkit.formats.packed.linear import ROW_BLOCK, CastLinear, PackedLinear, holding_weights
from quantkit.io.checkpoint import open_checkpoint
from quantkit.io.layout import layer_prefix
from quantkit.model import LINEAR_NAMES, Gemma
from quantkit.quant.calibrate import Calibration, LayerCalibrator
from quantkit.quant.primitives import QuantSpec, rtn
from quantkit.quant.quantize import resolved_compute
from quantkit.quant.recipes import QuantizeOptions


def test_cpu_flags_as_linux_lists_them(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: x\n")
    assert dtypes.cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16"}
    assert dtypes.cpu_flags(str(tmp_path / "none")) == set()


@pytest.mark.parametrize(("flags", "stored", "want"), [
    ({"avx2", "fma"}, "BF16", "float32"),  # no bf16 instructions: software bf16 is slower than fp32
    ({"avx2", "avx512_bf16"}, "BF16", "bfloat16"),
    ({"amx_bf16"}, "bfloat16", "bfloat16"),
    ({"avx512_bf16"}, "F32", "float32"),  # fp32 weights stay fp32
])  # fmt: skip
def test_auto_is_bf16_only_for_bf16_weights_on_bf16_hardware(monkeypatch, flags, stored, want):
    monkeypatch.setattr(dtypes, "cpu_flags", lambda path="": flags)
    assert dtypes.compute_dtype("auto", stored, "cpu") == want
    assert dtypes.compute_dtype("float32", stored, "cpu") == "float32"  # given: as given
    assert dtypes.compute_dtype("bfloat16", stored, "cpu") == "bfloat16"


@pytest.mark.parametrize("kind", ["packed", "cast"])
def test_held_weights_give_the_same_products_made_once(kind, monkeypatch):
    """Wider than ROW_BLOCK (blocked products); fp32 and bf16 inputs; the float weight is made once per dtype."""
    w = torch.randn(ROW_BLOCK + 40, 64) * 0.02
    m = PackedLinear(rtn(w, QuantSpec(4, 32, False), torch.float16)) if kind == "packed" else CastLinear(w.bfloat16())
    xs = [torch.randn(2, 3, 64, dtype=dt) for dt in (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16)]
    want = [m(x) for x in xs]
    made = []
    rows_in = type(m).rows_in
    monkeypatch.setattr(type(m), "rows_in", lambda self, rows, dt: made.append(dt) or rows_in(self, rows, dt))
    with holding_weights([torch.nn.Sequential(m)]):
        got = [m(x) for x in xs]
    assert made == [torch.float32, torch.bfloat16] and m.held is None
    for g, x in zip(got, want, strict=True):
        assert g.dtype == x.dtype and torch.equal(g, x)


def _calibrate_layer(ckpt, calib_dtype: str) -> tuple[dict, list[torch.Tensor]]:
    """GPTQ of layer 0 on embedded random tokens [2, 40] x 3 batches: the emitted weights and the outputs."""
    cfg, dtype = ckpt.config, dtypes.torch_dtype(calib_dtype)
    ids = torch.randint(4, cfg.vocab_size, (6, 40), generator=torch.Generator().manual_seed(5))
    model = Gemma(cfg, dtype)
    with torch.no_grad():
        hs = [model.embed(b, ckpt.get("model.embed_tokens.weight")) for b in ids.split(2)]
    model.load_layer_norms(0, ckpt.layer_tensors(0, exclude={f"{n}.weight" for n in LINEAR_NAMES}))
    emitted = {}
    cal = Calibration(ckpt, QuantizeOptions(group_size=64, calib_dtype=calib_dtype), torch.float32, "cpu")
    hs, _ = LayerCalibrator(model, 0, cal, emitted.__setitem__).run(hs)
    return emitted, hs


def test_bf16_calibration_is_deterministic_and_within_bf16_rounding_of_fp32(tiny_gemma2):
    """GPTQ of one layer from bf16 activations: the same codes, scales and outputs on a second run; each
    linear's output error ‖(W − Q)X‖ on fp32 inputs X within 10% of GPTQ's from fp32 activations (same
    tokens); the layer outputs within a few % of the fp32 calibration's."""
    ckpt = open_checkpoint(tiny_gemma2)
    q32, h32 = _calibrate_layer(ckpt, "float32")
    q16, h16 = _calibrate_layer(ckpt, "bfloat16")
    again, h16b = _calibrate_layer(ckpt, "bfloat16")
    p = layer_prefix(0)
    for n in LINEAR_NAMES:
        a, b = q16[p + n], again[p + n]
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and a.zero is b.zero is None
    assert all(torch.equal(a, b) for a, b in zip(h16, h16b, strict=True))
    assert not all(torch.equal(q32[p + n].codes, q16[p + n].codes) for n in LINEAR_NAMES)  # really bf16
    x = torch.randn(256, ckpt.config.hidden_size, generator=torch.Generator().manual_seed(7))
    for n in ("self_attn.q_proj", "mlp.gate_proj"):
        w = ckpt.get(f"{p}{n}.weight").float()
        err = {k: float(((w - q[p + n].dequantize()) @ x.T).norm()) for k, q in (("fp32", q32), ("bf16", q16))}
        assert err["bf16"] < 1.1 * err["fp32"], (n, err)
    for got, want in zip(h16, h32, strict=True):
        assert float((got.float() - want).norm() / want.norm()) < 0.05


def test_auto_resolves_before_the_run_and_is_recorded(tiny_gemma3, monkeypatch):
    """The tiny checkpoint is bf16: auto is bfloat16 with bf16 instructions, float32 without."""
    ckpt = open_checkpoint(tiny_gemma3)
    for flags, want in (({"avx2"}, "float32"), ({"avx2", "amx_bf16"}, "bfloat16")):
        monkeypatch.setattr(dtypes, "cpu_flags", lambda path="", flags=flags: flags)
        assert resolved_compute(QuantizeOptions(), ckpt, "cpu").calib_dtype == want
