"""Quantization primitives: exact code round trips, the scale/2 error bound, packing."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from quantkit.errors import QuantkitError
from quantkit.quant.primitives import (
    QuantSpec,
    choose_qparams,
    dequantize,
    pack_int32,
    quantize,
    rtn,
    unpack_int32,
)

SPECS = [QuantSpec(b, g, s) for b in (2, 3, 4, 8) for g in (32, 64, 128, 256, -1) for s in (True, False)]
SCALE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weights(o: int = 24, i: int = 512) -> torch.Tensor:
    w = torch.randn(o, i) * 0.05
    w[0, :40] = 0.0  # an all-zero group
    w[1] = w[1].abs()  # no negative value
    w[2, 7] = 3.0  # an outlier
    return w


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("sdt", SCALE_DTYPES, ids=str)
def test_error_at_most_half_a_step(spec, sdt):
    w = _weights()
    scale, zero = choose_qparams(w, spec, sdt)
    assert scale.dtype == sdt and scale.shape == (24, spec.groups(512))
    codes = quantize(w, scale, zero, spec)
    assert codes.dtype == torch.int8 and int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    step = scale.float().repeat_interleave(512 // scale.shape[1], dim=1)
    err = (w - dequantize(codes, scale, zero)).abs()
    fp32_rounding = 4 * torch.finfo(torch.float32).eps * w.abs()  # of (c - zp) * scale itself
    assert bool((err <= step / 2 + fp32_rounding).all()), float((err / step).max())


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_codes_round_trip_exactly(spec):
    """Quantizing a dequantized weight with the same scale gives back the same codes (idempotence)."""
    qw = rtn(_weights(), spec, torch.bfloat16)
    again = quantize(qw.dequantize(), qw.scale, qw.zero, spec)
    assert torch.equal(again, qw.codes)


def test_zero_is_exact_and_zero_groups_dequantize_to_zero():
    for spec in (QuantSpec(4, 32, True), QuantSpec(4, 32, False)):
        qw = rtn(_weights(), spec)
        deq = qw.dequantize()
        assert torch.equal(deq[0, :32], torch.zeros(32))


def test_symmetric_grid_is_absmax_over_7_5():
    w = torch.tensor([[-1.5, 0.2, 0.75, 0.0] * 8])
    scale, zero = choose_qparams(w, QuantSpec(4, 32, True))
    assert zero is None and scale.item() == pytest.approx(1.5 / 7.5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [32, 77, 256])
def test_pack_matches_compressed_tensors(bits, n):
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (9, n), dtype=torch.int8)
    ours = pack_int32(codes, bits)
    theirs = pack_to_int32(codes, bits)  # CT packs signed codes as c + 2^(b-1), along dim 1
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(ours, bits, n), codes)
    assert torch.equal(unpack_from_int32(theirs, bits, torch.Size((9, n))), codes)


@pytest.mark.parametrize("bad", [dict(bits=5), dict(bits=1), dict(group_size=100), dict(group_size=0)])
def test_bad_specs_are_refused(bad):
    with pytest.raises(QuantkitError):
        QuantSpec(**bad)


def test_group_must_divide_input_dimension():
    with pytest.raises(QuantkitError, match="not a multiple of group size 128"):
        QuantSpec(4, 128).check_divides("mlp.down_proj", 64)
