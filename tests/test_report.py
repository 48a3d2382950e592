"""eval-ppl with several --quantized models (packed artifacts and GGUF files) against one reference pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TEST_TEXT

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


def test_single_quantized_keeps_its_fields(tiny_gemma2, artifacts):
    res = _run("eval-ppl", str(tiny_gemma2), "--quantized", str(artifacts["gemma2-q4_0"]), *EVAL)
    assert {"reference", "quantized", "kld_mean", "top1_agreement", "models"} <= set(res)
    assert res["models"][0]["kld_mean"] == res["kld_mean"]


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
