"""eval-ppl against a direct transformers computation; the dequantizing linear; streamed == whole-model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import TEST_TEXT
from transformers import AutoModelForCausalLM

import quantkit.formats.packed.linear as packed
from quantkit.cli import cli
from quantkit.eval.evaluate import evaluate
from quantkit.io.checkpoint import open_checkpoint
from quantkit.io.texts import perplexity_chunks
from quantkit.io.tokenizer import Tokenizer
from quantkit.quant.primitives import QuantSpec, rtn

CTX, CHUNKS = 64, 6


def _hf_scores(path, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nll [n, S] and log-probs [n, S, V] at llama-perplexity's scored positions, straight from transformers."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(chunks).logits.float()
    ctx = chunks.shape[1]
    first = ctx // 2
    lp = F.log_softmax(logits[:, first : ctx - 1], dim=-1)
    nll = -lp.gather(-1, chunks[:, first + 1 :, None]).squeeze(-1)
    return nll, lp


@pytest.fixture(scope="module")
def quantized(tiny_gemma2, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "rtn4"
    args = [
        "quantize",
        str(tiny_gemma2),
        "-o",
        str(out),
        "--method",
        "rtn",
        "--group",
        "32",
        "--scale-dtype",
        "float32",
    ]
    assert CliRunner().invoke(cli, args).exit_code == 0
    return out


def test_eval_ppl_equals_transformers(tiny_gemma2, quantized):
    res = CliRunner().invoke(
        cli,
        [
            "eval-ppl",
            str(tiny_gemma2),
            "--quantized",
            str(quantized),
            "--dataset",
            str(TEST_TEXT),
            "--ctx",
            str(CTX),
            "--chunks",
            str(CHUNKS),
            "--exact",  # fp32 forwards on any machine (auto may pick bf16 for this bf16 checkpoint)
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    chunks = perplexity_chunks(Tokenizer(tiny_gemma2 / "tokenizer.model"), TEST_TEXT, CTX, CHUNKS)
    assert torch.all(chunks[:, 0] == 2)
    nll_ref, lp_ref = _hf_scores(tiny_gemma2, chunks)
    nll_q, lp_q = _hf_scores(quantized, chunks)
    assert r["tokens_scored"] == nll_ref.numel() == CHUNKS * (CTX - 1 - CTX // 2)
    assert r["reference"]["ppl"] == pytest.approx(math.exp(nll_ref.double().mean()), rel=1e-4)
    assert r["quantized"]["ppl"] == pytest.approx(math.exp(nll_q.double().mean()), rel=1e-4)
    kl = (lp_ref.exp() * (lp_ref - lp_q)).sum(-1)
    assert r["kld_mean"] == pytest.approx(float(kl.mean()), rel=1e-3)
    assert r["top1_agreement"] == pytest.approx(float((lp_ref.argmax(-1) == lp_q.argmax(-1)).float().mean()))
    sd = nll_ref.double().std(unbiased=False)
    se = math.exp(nll_ref.double().mean()) * float(sd) / math.sqrt(nll_ref.numel() - 1)
    assert r["reference"]["ppl_se"] == pytest.approx(se, rel=1e-3)
    assert r["delta_ppl"] == pytest.approx(r["quantized"]["ppl"] - r["reference"]["ppl"])


def test_reference_alone(tiny_gemma3):
    """eval-ppl of one model: its perplexity and standard error from transformers' logits on the same chunks."""
    res = CliRunner().invoke(
        cli,
        [
            "eval-ppl",
            str(tiny_gemma3),
            "--dataset",
            str(TEST_TEXT),
            "--ctx",
            "32",
            "--chunks",
            "2",
            "--exact",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert "quantized" not in r and r["chunks"] == 2
    nll, _ = _hf_scores(tiny_gemma3, perplexity_chunks(Tokenizer(tiny_gemma3 / "tokenizer.model"), TEST_TEXT, 32, 2))
    assert r["tokens_scored"] == nll.numel() == 2 * (32 - 1 - 32 // 2)
    nll = nll.double()
    assert r["reference"]["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-9)
    se = math.exp(nll.mean()) * float(nll.std(unbiased=False)) / math.sqrt(nll.numel() - 1)
    assert r["reference"]["ppl_se"] == pytest.approx(se, rel=1e-6)


def test_layer_streamed_equals_whole_model(tiny_gemma3, tmp_path):
    out = tmp_path / "q"
    assert CliRunner().invoke(cli, ["quantize", str(tiny_gemma3), "-o", str(out), "--method", "rtn"]).exit_code == 0
    ref, q = open_checkpoint(tiny_gemma3), open_checkpoint(out)
    chunks = perplexity_chunks(Tokenizer(ref.tokenizer_path), TEST_TEXT, 32, 5)
    whole = evaluate(ref, chunks, q, stream=False, batch_size=2, progress=False)
    streamed = evaluate(ref, chunks, q, stream=True, batch_size=2, progress=False)
    for key in ("delta_ppl", "kld_mean", "kld_p99", "top1_agreement"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-9), key
    assert streamed["reference"] == pytest.approx(whole["reference"], rel=1e-6)
    # groups of one batch (3 groups for 5 chunks): memory bounded by a group, the same numbers
    grouped = evaluate(ref, chunks, q, stream=True, batch_size=2, progress=False, group_bytes=1)
    for key in ("reference", "quantized", "kld_mean", "kld_p99", "kld_p999", "top1_agreement", "tokens_scored"):
        assert grouped[key] == streamed[key], key


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_packed_linear_equals_dense_linear(bits, group, sym, monkeypatch):
    w = torch.randn(100, 512)
    qw = rtn(w, QuantSpec(bits, group, sym), torch.bfloat16)
    layer = packed.PackedLinear(qw)
    x = torch.randn(3, 7, 512)
    assert torch.equal(layer.quantized_weight().codes, qw.codes)
    expected = F.linear(x, qw.dequantize())
    assert torch.equal(layer(x), expected)  # exact in fp32
    assert not any(b.dtype.is_floating_point and b.numel() == w.numel() for b in layer.buffers())
    monkeypatch.setattr(packed, "ROW_BLOCK", 48)  # the row-blocked path for wide layers
    blocks = [F.linear(x, qw.dequantize()[r : r + 48]) for r in range(0, 100, 48)]
    got = layer(x)
    assert torch.equal(got, torch.cat(blocks, dim=-1))  # bit-exact to F.linear on the same row blocks
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)  # BLAS may block the full product differently


def test_automatic_mode_streams_when_logits_and_weights_exceed_half_the_memory(tiny_gemma3, monkeypatch):
    """The automatic choice counts every model's weights and its batch of logits (the vocabulary makes them
    as large as a small model): it streams when they exceed half of the available memory."""
    import quantkit.eval.evaluate as ev

    ref = open_checkpoint(tiny_gemma3)
    chunks = perplexity_chunks(Tokenizer(ref.tokenizer_path), TEST_TEXT, 32, 2)
    need = ev.whole_model_bytes([(ref, False)], torch.float32, 1, 15)
    assert need == ref.num_parameters() * 4 + 3 * 15 * ref.config.vocab_size * 4
    modes = {}
    for avail in (2 * need + 1, 2 * need - 1):
        monkeypatch.setattr(ev, "available_memory", lambda unknown, a=avail: a)
        modes[avail > 2 * need] = evaluate(ref, chunks, progress=False)["mode"]
    assert modes == {True: "whole-model", False: "layer-streamed"}
