"""GPTQ straight into GGUF blocks (quantize --format gguf): every linear rounded onto its ggml type's fixed grid,
written without re-rounding, run by llama.cpp, and closer to the original model than round-to-nearest."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import CALIB_TEXT, TEST_TEXT

from quantkit.cli import cli
from quantkit.formats.gguf.imatrix import read_imatrix
from quantkit.formats.gguf.model import GGUFModel
from quantkit.formats.gguf.policy import plan_tensors
from quantkit.io.checkpoint import open_checkpoint
from quantkit.model import LINEAR_NAMES, build_model

# plain GPTQ: no shrink of H towards its diagonal (the GGUF default gives up some calibration fit for held-out text)
GPTQ = ["--method", "gptq", "--fast", "--nsamples", "16", "--seqlen", "64", "--calib", str(CALIB_TEXT), "--act-order",
        "--hessian-shrink", "0"]  # fmt: skip


def _cli(*args: str) -> dict:
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def files(tiny_gemma2, tmp_path_factory) -> dict[str, Path | dict]:
    d = tmp_path_factory.mktemp("gguf-gptq")
    out: dict[str, Path | dict] = {}
    for t in ("q3_k_m", "q4_0"):
        out[t] = d / f"gptq-{t}.gguf"
        out[f"{t}-report"] = _cli("quantize", str(tiny_gemma2), *GPTQ, "--format", "gguf", "--type", t,
                                  "--imatrix-out", str(d / f"{t}.imatrix.gguf"), "-o", str(out[t]))  # fmt: skip
        out[f"{t}-imatrix"] = d / f"{t}.imatrix.gguf"
        out[f"rtn-{t}"] = d / f"rtn-{t}.gguf"
        _cli("export", str(tiny_gemma2), "--type", t, "-o", str(out[f"rtn-{t}"]))
    return out


@pytest.mark.parametrize("qtype", ["q3_k_m", "q4_0"])
def test_every_linear_goes_into_its_planned_type_losslessly(files, tiny_gemma2, qtype):
    ckpt = open_checkpoint(tiny_gemma2)
    planned = {t.gguf_name: t.qtype for t in plan_tensors(ckpt.config, qtype, imatrix=True)}
    stored = {t.name: t.tensor_type for t in gguf.GGUFReader(files[qtype]).tensors}
    assert stored == planned
    report = files[f"{qtype}-report"]
    n_linear = len(LINEAR_NAMES) * ckpt.config.num_hidden_layers
    assert report["gguf"]["counts"]["lossless"] == n_linear
    if qtype == "q3_k_m":  # the mix really has several K types
        assert {"Q3_K", "Q4_K", "Q5_K"} <= {v.name for v in planned.values()}
    # on the same grid, GPTQ's output error is well below round-to-nearest's, layer by layer on average
    gptq = np.array([s["output_rel_err"] for s in report["linears"].values()])
    rtn = np.array([s["rtn_output_rel_err"] for s in report["linears"].values()])
    assert gptq.mean() < 0.6 * rtn.mean()


def test_imatrix_covers_every_linear(files, tiny_gemma2):
    cfg = open_checkpoint(tiny_gemma2).config
    im = read_imatrix(files["q3_k_m-imatrix"])
    assert len(im) == len(LINEAR_NAMES) * cfg.num_hidden_layers
    q = im["blk.0.attn_q.weight"]
    assert q.shape == (cfg.hidden_size,) and (q > 0).all()
    np.testing.assert_array_equal(q, im["blk.0.attn_k.weight"])  # q, k, v read the same input


def test_gptq_gguf_drifts_less_than_rtn(files, tiny_gemma2):
    args = [a for n in ("q3_k_m", "rtn-q3_k_m", "q4_0", "rtn-q4_0") for a in ("--quantized", str(files[n]))]
    res = _cli("eval-ppl", str(tiny_gemma2), *args, "--dataset", str(TEST_TEXT), "--ctx", "64", "--chunks", "6")
    kld = {r["name"]: r["kld_mean"] for r in res["models"]}
    assert kld["gptq-q3_k_m.gguf"] < kld["rtn-q3_k_m.gguf"]
    assert kld["gptq-q4_0.gguf"] < kld["rtn-q4_0.gguf"]


def test_llamacpp_runs_the_gptq_k_quants(files, tiny_gemma2):
    """llama.cpp's logits on the GPTQ Q3_K_M file track quantkit's forward on that file's own weights far more
    closely than quantkit's forward on the original weights: llama.cpp runs the blocks we wrote."""
    llamacpp_ppl = pytest.importorskip("llamacpp_ppl", reason="llama-cpp-python is not installed")
    from quantkit.io.tokenizer import Tokenizer

    ck = open_checkpoint(tiny_gemma2)
    ids = Tokenizer(ck.tokenizer_path).encode(TEST_TEXT.read_text()[:2000])[:41]
    llm = llamacpp_ppl.load_llama(files["q3_k_m"], n_ctx=128, n_threads=2, kv_f32=True)
    theirs = llamacpp_ppl.chunk_logits(llm, ids)
    with torch.no_grad():
        ours = build_model(GGUFModel(files["q3_k_m"]))(torch.tensor([ids]))[0].numpy()
        orig = build_model(ck)(torch.tensor([ids]))[0].numpy()
    d, d_orig = np.abs(theirs - ours), np.abs(theirs - orig)
    assert d.mean() < 0.5 * d_orig.mean(), (d.mean(), d_orig.mean())


def test_gptq_onto_q2_0_blocks(tiny_gemma2, tmp_path, libggml):
    """quantize --method gptq --format gguf --type q2_0: every linear goes into Q2_0 blocks as GPTQ rounded it
    (libggml decodes the stored bytes to the values quantkit reads back), well below round-to-nearest's output
    error on the same grid (measured 0.31 of it; Q1_0 0.53, docs/lowbit.md)."""
    from quantkit.formats.gguf.read import hf_values, read_gguf
    from quantkit.formats.gguf.reference import dequantize_rows_ref

    out = tmp_path / "gptq-q2_0.gguf"
    report = _cli("quantize", str(tiny_gemma2), *GPTQ, "--format", "gguf", "--type", "q2_0", "-o", str(out))
    ckpt = open_checkpoint(tiny_gemma2)
    planned = {t.gguf_name: t.qtype for t in plan_tensors(ckpt.config, "q2_0", imatrix=True)}
    assert {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors} == planned
    assert report["gguf"]["counts"]["lossless"] == len(LINEAR_NAMES) * ckpt.config.num_hidden_layers
    for t in read_gguf(out).tensors:
        if t.source.tensor_type == gguf.GGMLQuantizationType.Q2_0:
            ref = dequantize_rows_ref(np.asarray(t.source.data), t.source.tensor_type, libggml)
            np.testing.assert_array_equal(hf_values(t), ref.reshape(t.shape))
    gptq = np.array([s["output_rel_err"] for s in report["linears"].values()])
    rtn = np.array([s["rtn_output_rel_err"] for s in report["linears"].values()])
    assert gptq.mean() < 0.6 * rtn.mean()


def test_gptq_files_take_llama_quantizes_imatrix_rules(tiny_gemma2):
    """GPTQ always calibrates, so its files hold the types llama-quantize gives with an importance matrix: for
    iq3_xxs its ffn_down is IQ3_XXS there, Q3_K / Q4_K without one."""
    from quantkit.formats.gguf.mix import choose_types
    from quantkit.quant.quantize import gptq_block_types

    ckpt = open_checkpoint(tiny_gemma2)

    def plan(imatrix: bool) -> dict:
        return {t.gguf_name: t.qtype for t in plan_tensors(ckpt.config, "iq3_xxs", imatrix=imatrix)}

    assert plan(True) != plan(False)
    assert choose_types(ckpt, "iq3_xxs", calibrated=True).types == plan(True)
    assert choose_types(ckpt, "iq3_xxs").types == plan(False)
    hf = {t.hf_name: t.qtype for t in plan_tensors(ckpt.config, "iq3_xxs", imatrix=True)}
    got = gptq_block_types(ckpt, "iq3_xxs")
    assert got == {n: hf[n] for n in got} and "IQ3_XXS" in {q.name for q in got.values()}


def test_output_errors_measured_on_a_sample_of_rows(files, tiny_gemma2, tmp_path, monkeypatch):
    """The report's output errors on DIAGNOSTIC_ROWS evenly spaced rows of each linear: the same weights as
    measuring every row (the diagnostics never touch them), each row's GPTQ error from the solver and the
    ratios near the exact ones."""
    import quantkit.quant.calibrate as calibrate

    monkeypatch.setattr(calibrate, "DIAGNOSTIC_ROWS", 16)
    out = tmp_path / "sampled.gguf"
    report = _cli("quantize", str(tiny_gemma2), *GPTQ, "--format", "gguf", "--type", "q4_0", "-o", str(out))
    exact = files["q4_0-report"]["linears"]
    a, b = gguf.GGUFReader(files["q4_0"]), gguf.GGUFReader(out)
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors, strict=True))
    assert min(s["error_rows"] for s in exact.values()) > 16  # measured whole there, sampled here
    for name, s in report["linears"].items():
        assert s["error_rows"] == 16
        for key in ("output_rel_err", "rtn_output_rel_err"):  # estimates from 1/16 to 1/32 of the rows
            assert 0.5 * exact[name][key] < s[key] < 2.0 * exact[name][key]
