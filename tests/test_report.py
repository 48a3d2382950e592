"""eval-ppl with several --quantized models (packed artifacts and GGUF files) against one reference pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from conftest import TEST_TEXT
from safetensors import safe_open

from quantkit.cli import cli

EVAL = ["--dataset", str(TEST_TEXT), "--ctx", "64", "--chunks", "4"]


def _run(*args: str) -> dict:
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def artifacts(tiny_gemma2, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("report")
    rtn = d / "rtn4"
    _run("quantize", str(tiny_gemma2), "-o", str(rtn), "--method", "rtn", "--group", "32", "--scale-dtype", "float16")
    out = {"rtn4": rtn}
    for src, qtype in ((tiny_gemma2, "f32"), (rtn, "f32"), (tiny_gemma2, "q4_0")):
        path = d / f"{Path(src).name}-{qtype}.gguf"
        _run("export", str(src), "--type", qtype, "-o", str(path))
        out[path.stem] = path
    return out


def test_one_pass_scores_packed_and_gguf(tiny_gemma2, artifacts, tmp_path):
    names = ["rtn4", "gemma2-f32", "rtn4-f32", "gemma2-q4_0"]
    args = [a for n in names for a in ("--quantized", str(artifacts[n]))]
    res = _run("eval-ppl", str(tiny_gemma2), *args, *EVAL, "--plot", str(tmp_path / "q.png"))
    rows = {r["name"]: r for r in res["models"]}
    ref = res["reference"]["ppl"]
    # the reference's own weights in an F32 GGUF: the same distribution (norms pass through 1 + w - 1 in fp32)
    assert rows["gemma2-f32.gguf"]["kld_mean"] < 1e-9
    assert rows["gemma2-f32.gguf"]["top1_agreement"] == 1.0
    assert rows["gemma2-f32.gguf"]["ppl"] == pytest.approx(ref, rel=1e-6)
    # a packed artifact and the F32 GGUF of its dequantized weights score the same
    assert rows["rtn4-f32.gguf"]["ppl"] == pytest.approx(rows["rtn4"]["ppl"], rel=1e-6)
    assert rows["rtn4-f32.gguf"]["kld_mean"] == pytest.approx(rows["rtn4"]["kld_mean"], rel=1e-4, abs=1e-9)
    # quantized models really drift, and the sizes say what they are
    assert rows["rtn4"]["kld_mean"] > 1e-4 and rows["gemma2-q4_0.gguf"]["kld_mean"] > 1e-4
    assert 4.4 < rows["rtn4"]["bits_per_weight"] < 4.6  # int4 + fp16 scale per 32
    assert rows["gemma2-q4_0.gguf"]["bits_per_weight"] == pytest.approx(4.5)  # 18 bytes per 32 weights
    assert rows["gemma2-f32.gguf"]["bits_per_weight"] == 32.0
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GGUF_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _linear_parameters(model_dir: Path) -> int:
    """Weights of the decoder-layer linears, counted from the dense checkpoint's safetensors headers."""
    total = 0
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), "np") as f:
            names = [
                k
                for k in f.keys()
                if k.startswith("model.layers.") and k.endswith(tuple(f"{m}.weight" for m in LINEARS))
            ]
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in names)
    return total


def _stored_linear_bytes(path: Path) -> int:
    """Bytes the file(s) at ``path`` spend on the decoder-layer linears: a GGUF's tensors (read with gguf-py)
    or a packed artifact's codes, scales, zero points and shapes (read with safetensors)."""
    if path.suffix == ".gguf":
        tensors = gguf.GGUFReader(path).tensors
        return sum(
            int(t.n_bytes) for t in tensors if t.name.startswith("blk.") and t.name.split(".")[2] in GGUF_LINEARS
        )
    total = 0
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                if k.startswith("model.layers.") and ".weight_" in k:
                    t = f.get_tensor(k)
                    total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("name", ["gemma2-q4_0", "rtn4"])
def test_single_quantized_reports_its_size_and_drift(tiny_gemma2, artifacts, name):
    """One --quantized model: the row's size and bits per weight equal those counted here from the files
    themselves, and the row repeats the top-level drift numbers."""
    path = artifacts[name]
    res = _run("eval-ppl", str(tiny_gemma2), "--quantized", str(path), *EVAL)
    (row,) = res["models"]
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert row["size_bytes"] == size
    bits = 8 * _stored_linear_bytes(path) / _linear_parameters(tiny_gemma2)
    assert row["bits_per_weight"] == pytest.approx(bits, rel=1e-12)
    assert (row["ppl"], row["kld_mean"], row["top1_agreement"]) == (
        res["quantized"]["ppl"],
        res["kld_mean"],
        res["top1_agreement"],
    )
    assert row["delta_ppl"] == pytest.approx(res["quantized"]["ppl"] - res["reference"]["ppl"], rel=1e-9)


def test_gguf_of_another_model_is_refused(tiny_gemma2, tiny_gemma3, tmp_path):
    path = tmp_path / "g3.gguf"
    _run("export", str(tiny_gemma3), "--type", "f32", "-o", str(path))
    res = CliRunner().invoke(cli, ["eval-ppl", str(tiny_gemma2), "--quantized", str(path), *EVAL])
    assert res.exit_code == 2
    assert "describes a different model" in res.stderr


def test_artifact_without_tokenizer_model_is_scored_with_the_references_tokens(tiny_gemma2, artifacts, tmp_path):
    """transformers 5 saves tokenizer.json only: such an artifact is scored on the reference's tokens."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(artifacts["rtn4"], bare)
    (bare / "tokenizer.model").unlink()
    res = _run("eval-ppl", str(tiny_gemma2), "--quantized", str(bare), "--quantized", str(artifacts["rtn4"]), *EVAL)
    a, b = res["models"]
    assert a["ppl"] == b["ppl"] and a["kld_mean"] == b["kld_mean"]
