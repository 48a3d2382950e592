"""Q1_0 / Q2_0 blocks (the pinned llama.cpp's 1- and 2-bit types): quantkit's quantizers byte for byte against
libggml's `quantize_row_q1_0_ref` / `quantize_row_q2_0_ref` and `quantize_q1_0` / `quantize_q2_0` with an
importance vector (which they ignore), quantkit's decoders against libggml's `dequantize_row_*`, and Q2_0 -- which
the installed gguf-py does not name -- written and read back through gguf-py with llama.h's numbers."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from quantkit.formats.gguf.blocks import dequantize_rows, quantize_rows, quantize_rows_weighted, row_bytes
from quantkit.formats.gguf.reference import dequantize_rows_ref, quantize_rows_ref

TYPES = [QT.Q1_0, QT.Q2_0]
VENDOR = Path(__file__).resolve().parents[1] / "build" / "llama.cpp" / "src" / "vendor" / "llama.cpp"


def lowbit_rows(seed: int = 0) -> np.ndarray:
    """[R, 512] rows: gaussian and heavy-tailed, all zero, -0.0, exact ties of x / max |x| at +-1/2, one
    outlier, subnormal and near-fp16-max values."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((48, 512)) * rng.random((48, 1))
    t = rng.standard_t(2, (16, 512))
    ties = rng.integers(-4, 5, (8, 512)) / 8.0  # max |x| 1/2, so x / d lands on +-1/2 and +-1/4
    ties[:, 0] = 0.5
    special = np.stack(
        [
            np.zeros(512),
            np.full(512, -0.0),
            np.where(rng.random(512) < 0.5, -0.0, 0.0),
            np.r_[100.0, rng.standard_normal(511)],
            rng.standard_normal(512) * 1e-40,
            rng.standard_normal(512) * 1e-6,
            rng.standard_normal(512) * 6e4,
            np.abs(rng.standard_normal(512)),
        ]
    )
    return np.concatenate([g, t, ties, special]).astype(np.float32)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_quantizer_matches_libggml(libggml, qtype):
    x = lowbit_rows()
    ours = quantize_rows(x, qtype)
    assert ours.shape == (x.shape[0], row_bytes(qtype, 512))
    assert np.array_equal(ours, quantize_rows_ref(x, qtype, libggml))
    # llama-quantize --imatrix calls quantize_<type>(..., imatrix), which ignores it: the same bytes
    qw = (10 ** (3 * np.random.default_rng(1).random(512))).astype(np.float32)
    assert np.array_equal(quantize_rows_weighted(x, qtype, qw), quantize_rows_ref(x, qtype, libggml, imatrix=qw))
    assert np.array_equal(quantize_rows_ref(x, qtype, libggml, imatrix=qw), ours)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decoder_matches_libggml(libggml, qtype):
    """Random blocks (every bit pattern of the codes, any finite fp16 d) and the quantizer's own blocks."""
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, (32, row_bytes(qtype, 1024)), dtype=np.uint8)
    d = rng.standard_normal(data.size // 18) * 10.0 ** rng.integers(-7, 4, data.size // 18)
    data.reshape(-1, 18)[:, :2] = d.astype("<f2").reshape(-1, 1).view(np.uint8)
    for blocks in (data, quantize_rows(lowbit_rows(3), qtype)):
        ours, ref = dequantize_rows(blocks, qtype), dequantize_rows_ref(blocks, qtype, libggml)
        assert np.array_equal(ours, ref, equal_nan=True)  # NaN: 0 * d where d overflowed fp16


def test_q2_0_round_trip_error_is_bounded():
    """Q2_0 stores d = max |x| and rounds x / d onto -1, 0, 1: every value within d / 2 (plus d's fp16
    rounding); Q1_0 keeps every sign."""
    x = lowbit_rows()[:64]
    y = dequantize_rows(quantize_rows(x, QT.Q2_0), QT.Q2_0)
    amax = np.abs(x).reshape(64, -1, 64).max(-1, keepdims=True)
    assert (np.abs(x - y).reshape(64, -1, 64) <= amax * (0.5 + 2.0**-10)).all()
    z = dequantize_rows(quantize_rows(x, QT.Q1_0), QT.Q1_0)
    assert ((z >= 0) == (x >= 0))[np.abs(x).reshape(64, -1, 128).sum(-1).repeat(128, 1) > 0].all()


def _enum_value(header: Path, name: str) -> int:
    return int(re.search(rf"\b{name}\s*=\s*(\d+)", header.read_text()).group(1))


def test_q2_0_has_llama_cpp_numbers_and_gguf_py_reads_it(tmp_path):
    """quantkit's Q2_0 / MOSTLY_Q2_0 are ggml.h's and llama.h's numbers; a GGUF with Q1_0 and Q2_0 tensors goes
    through gguf-py's writer and reader with its types, shapes and bytes."""
    if (VENDOR / "ggml").is_dir():
        assert int(QT.Q2_0) == _enum_value(VENDOR / "ggml/include/ggml.h", "GGML_TYPE_Q2_0")
        assert int(QT.Q1_0) == _enum_value(VENDOR / "ggml/include/ggml.h", "GGML_TYPE_Q1_0")
        assert int(FT.MOSTLY_Q2_0) == _enum_value(VENDOR / "include/llama.h", "LLAMA_FTYPE_MOSTLY_Q2_0")
    x = lowbit_rows()[:16]
    blocks = {t: quantize_rows(x, t) for t in TYPES}
    path = tmp_path / "lowbit.gguf"
    w = gguf.GGUFWriter(path, arch="test")
    for t, b in blocks.items():
        w.add_tensor(t.name.lower(), b, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    read = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for t, b in blocks.items():
        r = read[t.name.lower()]
        assert r.tensor_type == t and list(r.shape) == [512, 16]
        assert np.array_equal(np.asarray(r.data).reshape(b.shape), b)
