"""The importance-matrix file: what GPTQ's Hessians say, in the layout llama-quantize reads."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT

from quantkit.cli import cli
from quantkit.formats.gguf.imatrix import ImportanceStats, read_imatrix, write_imatrix

LLAMA_QUANTIZE = ROOT / "build" / "llama.cpp" / "bin" / "llama-quantize"


def _stats(hidden: int, layers: int) -> tuple[ImportanceStats, dict[str, np.ndarray]]:
    """Hessians of random inputs, and the mean squared activation llama.cpp would have collected."""
    stats, expected = ImportanceStats.empty(), {}
    g = torch.Generator().manual_seed(0)
    for i in range(layers):
        x = torch.randn(96, hidden, generator=g) * torch.linspace(0.1, 3.0, hidden)
        H = 2.0 / len(x) * x.T @ x
        for module in ("self_attn.q_proj", "mlp.up_proj"):
            stats.add_from_hessian(i, module, H, len(x))
        for kind in ("attn_q", "ffn_up"):
            expected[f"blk.{i}.{kind}.weight"] = (x**2).mean(0).numpy()
    return stats, expected


def test_roundtrip_gives_mean_squared_activations(tmp_path):
    stats, expected = _stats(64, 2)
    path = write_imatrix(tmp_path / "m.imatrix.gguf", stats, "wiki.valid", 48)
    got = read_imatrix(path)
    assert set(got) == set(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(got[name], values, rtol=1e-5)


@pytest.mark.skipif(not LLAMA_QUANTIZE.is_file(), reason="llama-quantize not built (make llama-tools)")
def test_llama_quantize_reads_it(tiny_gemma2, tmp_path):
    src = tmp_path / "f32.gguf"
    res = CliRunner().invoke(cli, ["export", str(tiny_gemma2), "--type", "f32", "-o", str(src), "--json"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tiny_gemma2 / "config.json").read_text())
    stats, _ = _stats(cfg["hidden_size"], cfg["num_hidden_layers"])
    imatrix = write_imatrix(tmp_path / "m.imatrix.gguf", stats, "wiki.valid", 48)
    out = tmp_path / "q.gguf"
    proc = subprocess.run(
        [str(LLAMA_QUANTIZE), "--imatrix", str(imatrix), str(src), str(out), "Q4_0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert f"loaded {2 * cfg['num_hidden_layers']} importance matrix entries" in log
    assert out.is_file()


def test_a_file_that_is_not_an_imatrix_is_refused_in_one_line(tmp_path):
    """Found by the fuzzer: a damaged file reached gguf-py's reader errors (IndexError, ValueError)."""
    from quantkit.errors import QuantkitError

    stats, _ = _stats(64, 1)
    good = write_imatrix(tmp_path / "m.imatrix.gguf", stats, "wiki.valid", 48).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[: len(good) // 3])
    neg = tmp_path / "neg.gguf"
    sums = stats.sums[next(iter(stats.sums))]
    sums[0] = -1.0
    write_imatrix(neg, stats, "wiki.valid", 48)
    for path, says in ((cut, "not a readable GGUF file"), (neg, "negative or non-finite")):
        with pytest.raises(QuantkitError, match=says) as info:
            read_imatrix(path)
        assert "\n" not in str(info.value)
