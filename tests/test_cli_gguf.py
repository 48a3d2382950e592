"""The GGUF commands end to end: export of a GPTQ artifact, and quantize --format gguf."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner
from conftest import CALIB_TEXT
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from quantkit.cli import cli
from quantkit.io.checkpoint import open_checkpoint

GPTQ = ["--method", "gptq", "--fast", "--nsamples", "8", "--seqlen", "64", "--calib", str(CALIB_TEXT)]


def _gguf_weight(path, name: str) -> np.ndarray:
    t = next(t for t in GGUFReader(path).tensors if t.name == name)
    return dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]), t.tensor_type


def test_export_writes_gptq_codes_without_rerounding(tiny_gemma2, tmp_path):
    art, out = tmp_path / "w4g32", tmp_path / "m.gguf"
    res = CliRunner().invoke(cli, ["quantize", str(tiny_gemma2), "-o", str(art), "--group", "32", "--sym", *GPTQ])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["export", str(art), "--format", "gguf", "--type", "q4_0", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["counts"]["lossless"] == 7 * 4 and report["counts"]["requantized"] == 1  # token_embd -> Q6_K
    q = open_checkpoint(art)
    got, qtype = _gguf_weight(out, "blk.3.ffn_down.weight")
    assert qtype == GGMLQuantizationType.Q4_0
    assert np.array_equal(got, q.quantized_weight("model.layers.3.mlp.down_proj").dequantize().numpy())


def test_quantize_format_gguf(tiny_gemma3, tmp_path):
    out = tmp_path / "m.gguf"
    args = ["quantize", str(tiny_gemma3), "-o", str(out), "--format", "gguf", "--type", "q8_0", "--bits", "8"]
    res = CliRunner().invoke(cli, [*args, "--group", "32", *GPTQ, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {s["ggml_type"] for s in report["linears"].values()} == {"Q8_0"}  # GPTQ rounded onto Q8_0's grid
    assert report["gguf"]["counts"]["lossless"] == 7 * 6
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # the intermediate artifact is gone
    assert GGUFReader(out).get_field("general.name").contents() == tiny_gemma3.name  # not the hidden artifact's
    w, qtype = _gguf_weight(out, "blk.0.attn_q.weight")
    assert qtype == GGMLQuantizationType.Q8_0
    dense = open_checkpoint(tiny_gemma3).get("model.layers.0.self_attn.q_proj.weight", torch.float32).numpy()
    assert np.abs(w - dense).max() <= np.abs(dense).max() / 127 * 4  # GPTQ moves weights by a few steps at most


def test_gptq_onto_codebooks(tiny_gemma3, tmp_path):
    """quantize --method gptq --format gguf --type iq2_m: on rows of 256 its weights are IQ2_S and IQ3_S
    (attn_v, ffn_down of the first layers): GPTQ chooses their points (block LDLQ), below the encoder's output
    error on the same scales, and the GGUF holds the types llama-quantize's rules give with an imatrix (GPTQ
    calibrates)."""
    from quantkit.formats.gguf.policy import plan_tensors

    out = tmp_path / "iq2_m.gguf"
    args = ["quantize", str(tiny_gemma3), "-o", str(out), "--format", "gguf", "--type", "iq2_m", *GPTQ, "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    lin = report["linears"].values()
    assert {s["ggml_type"] for s in lin} == {"IQ2_S", "IQ3_S"}
    assert sum(s["output_rel_err"] for s in lin) < 0.9 * sum(s["rtn_output_rel_err"] for s in lin)
    plan = {t.gguf_name: t.qtype for t in plan_tensors(open_checkpoint(tiny_gemma3).config, "iq2_m", imatrix=True)}
    assert {t.name: t.tensor_type for t in GGUFReader(out).tensors} == plan
    assert [p.name for p in tmp_path.iterdir()] == ["iq2_m.gguf"]
    # llama.cpp decodes the points GPTQ chose as quantkit does: its logits follow quantkit's on the file
    from conftest import llama_and_quantkit_logits

    theirs, ours = llama_and_quantkit_logits(out)
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
    assert (theirs - ours).abs().max() <= 0.02 * ours.abs().max()
