"""A saved reference in llama-perplexity's --kl-divergence-base format, and drift per dataset.

Oracles: torch's log_softmax (the stored rows), llama-perplexity itself (each side scoring the other's file),
and separate runs (a dataset scored alone gives the numbers it gets beside others)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, TEST_TEXT

from quantkit.cli import cli
from quantkit.errors import QuantkitError
from quantkit.eval.reference import decode_rows, encode_rows, read_reference, row_width

LLAMA_PERPLEXITY = ROOT / "build" / "llama.cpp" / "bin" / "llama-perplexity"
CTX, CHUNKS = 64, 4  # llama-perplexity prints its statistics from 100 scored tokens on
needs_llama = pytest.mark.skipif(not LLAMA_PERPLEXITY.is_file(), reason="llama-perplexity not built (make llama-tools)")


def _run(args: list) -> dict:
    res = CliRunner().invoke(cli, ["-q", *map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _refused(args: list) -> str:
    res = CliRunner().invoke(cli, ["-q", *map(str, args)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantkit: error:"), res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def models(tiny_gemma2, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint, its F32 GGUF, an RTN artifact, and a text both tokenizers cut alike (the tiny
    SentencePiece model turns newlines into spaces, llama.cpp's into byte tokens: one space between words)."""
    d = tmp_path_factory.mktemp("ref")
    for args in (["export", tiny_gemma2, "--type", "f32", "-o", d / "f32.gguf"],
                 ["quantize", tiny_gemma2, "--method", "rtn", "--group", "32", "-o", d / "rtn"]):  # fmt: skip
        assert CliRunner().invoke(cli, ["-q", *map(str, args)]).exit_code == 0
    (d / "flat.txt").write_text(" ".join(TEST_TEXT.read_text(encoding="utf-8")[:30000].split()), encoding="utf-8")
    return {"model": tiny_gemma2, "gguf": d / "f32.gguf", "rtn": d / "rtn", "text": d / "flat.txt", "dir": d}


def _llama_statistics(cmd: list[str], tries: int = 15) -> str:
    """llama-perplexity's output, run until it holds the final statistics: this llama.cpp's logger (a thread,
    never joined: llama.cpp issue 22142) loses the last lines of about half the runs, exit status 0."""
    for _ in range(tries):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        if "Same top p:" in out.stdout + out.stderr:
            return out.stdout + out.stderr
    raise AssertionError(f"llama-perplexity printed no statistics in {tries} runs")


def test_rows_hold_log_softmax():
    """A stored row decodes to log_softmax of its logits within half a code step, over the 16 nats kept."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 301, generator=g) * 4  # odd vocabulary: one padding code per row
    logits[3] = 0.5  # a flat row: scale 0
    rows = encode_rows(logits)
    assert rows.shape == (7, row_width(301)) == (7, 306) and rows[:, -1].max() == 0
    got = decode_rows(rows, 301)
    want = torch.log_softmax(logits, -1)
    scale = torch.from_numpy(rows.view("<f4")[:, :1].copy())
    kept = want > want.max(-1, keepdim=True).values - 16
    assert ((got - want).abs() <= scale / 2 + 1e-5)[kept].all()
    assert torch.allclose(got[3], want[3], atol=1e-6)


@needs_llama
def test_quantkit_scores_a_reference_llama_perplexity_wrote(models, tmp_path):
    """llama-perplexity's base file of the F32 GGUF: quantkit scoring the F32 model against it gives KLD ~ 0,
    the same ppl, and its reference ppl is the model's ppl as quantkit computes it without the file."""
    base = tmp_path / "llama.kld"
    cmd = [LLAMA_PERPLEXITY, "-m", models["gguf"], "-f", models["text"], "-c", CTX, "-b", CTX, "--chunks", CHUNKS,
           "--kl-divergence-base", base, "-t", "2"]  # fmt: skip
    subprocess.run(list(map(str, cmd)), check=True, capture_output=True)
    saved = read_reference(base)
    assert (saved.n_ctx, saved.n_chunk) == (CTX, CHUNKS)
    # --exact: fp32 matmuls, as llama.cpp's on the F32 GGUF (on a CPU with bf16 instructions "auto" would run
    # the bf16 checkpoint's forward in bf16: KLD 1.4e-4 against llama.cpp, measured)
    scored = _run(["eval-ppl", models["model"], "--reference", base, "--quantized", models["gguf"],
                   "--dataset", models["text"], "--exact"])  # fmt: skip
    direct = _run(["eval-ppl", models["model"], "--dataset", models["text"], "--ctx", CTX, "--chunks", CHUNKS,
                   "--exact"])  # fmt: skip
    assert scored["ctx"] == CTX and scored["chunks"] == CHUNKS
    assert scored["kld_mean"] < 1e-4 and abs(scored["delta_ppl_pct"]) < 0.05
    assert scored["quantized"]["ppl"] == pytest.approx(direct["reference"]["ppl"], rel=1e-5)
    assert scored["reference"]["ppl"] == pytest.approx(direct["reference"]["ppl"], rel=1e-3)


@needs_llama
def test_llama_perplexity_scores_a_reference_quantkit_wrote(models, tmp_path):
    """quantkit's base file of the checkpoint: llama-perplexity --kl-divergence on the F32 GGUF gives KLD ~ 0,
    and reads the same base ppl that quantkit reports."""
    base = tmp_path / "qk.kld"
    res = _run(["eval-ppl", models["model"], "--dataset", models["text"], "--ctx", CTX, "--chunks", CHUNKS,
                "--save-reference", base, "--exact"])  # fmt: skip
    assert res["saved_reference"] == str(base)
    cmd = [LLAMA_PERPLEXITY, "-m", models["gguf"], "-c", CTX, "-b", CTX, "--kl-divergence",
           "--kl-divergence-base", base, "-t", "2"]  # fmt: skip
    log = _llama_statistics(list(map(str, cmd)))

    def stat(label: str) -> float:
        return float(re.search(re.escape(label) + r"\s*:\s*(-?[\d.]+)", log).group(1))

    assert stat("Mean    KLD") < 1e-4
    assert stat("Mean PPL(base)") == pytest.approx(res["reference"]["ppl"], rel=1e-3)
    assert stat("Mean PPL(Q)") == pytest.approx(res["reference"]["ppl"], rel=1e-3)


def test_saved_reference_scores_like_the_model(models, tmp_path):
    """Scoring against the saved file gives the quantized model's own numbers unchanged and the drift of the
    in-memory reference up to the file's 16-bit rounding; the file's tokens are the text's."""
    base = tmp_path / "base.kld"
    common = ["--quantized", models["rtn"], "--dataset", TEST_TEXT]
    live = _run(["eval-ppl", models["model"], *common, "--ctx", 32, "--chunks", 4, "--save-reference", base])
    saved = _run(["eval-ppl", models["model"], *common, "--reference", base])
    assert saved["reference_source"] == str(base) and live["reference_source"] == "model"
    assert saved["quantized"] == live["quantized"]
    assert saved["reference"]["ppl"] == pytest.approx(live["reference"]["ppl"], rel=1e-3)
    assert saved["kld_mean"] == pytest.approx(live["kld_mean"], rel=0.02, abs=1e-5)
    ref = read_reference(base)
    assert ref.tokens.shape == (4, 32) and ref.tokens[0, 0] == 2 and ref.tokens[1, 0] != 2


def test_reference_refusals(models, tmp_path):
    base = tmp_path / "base.kld"
    _run(["eval-ppl", models["model"], "--dataset", TEST_TEXT, "--ctx", 32, "--chunks", 2, "--save-reference", base])
    q = ["--quantized", models["rtn"]]
    assert "its tokens differ from" in _refused(["eval-ppl", models["model"], *q, "--reference", base,
                                                 "--dataset", "code"])  # fmt: skip
    assert "computed with ctx 32, not 64" in _refused(["eval-ppl", models["model"], *q, "--reference", base,
                                                       "--dataset", TEST_TEXT, "--ctx", 64])  # fmt: skip
    assert "fewer than the 3 asked" in _refused(["eval-ppl", models["model"], *q, "--reference", base,
                                                 "--dataset", TEST_TEXT, "--chunks", 3])  # fmt: skip
    assert "give one --dataset" in _refused(["eval-ppl", models["model"], "--dataset", "wiki", "--dataset", "code",
                                             "--save-reference", tmp_path / "two.kld"])  # fmt: skip
    assert not (tmp_path / "two.kld").exists()
    raw = base.read_bytes()
    (tmp_path / "cut.kld").write_bytes(raw[:-1])
    (tmp_path / "huge.kld").write_bytes(raw[:16] + struct.pack("<i", 2**31 - 1) + raw[20:])
    for bad in ("cut.kld", "huge.kld"):
        with pytest.raises(QuantkitError, match="truncated or damaged"):
            read_reference(tmp_path / bad)
    data = 20 + 4 * 32 * 2  # the first row's min_log_prob, -1e30 (fuzzer: an infinite ppl, a traceback)
    (tmp_path / "low.kld").write_bytes(raw[: data + 4] + struct.pack("<f", -1e30) + raw[data + 8 :])
    assert "minimum log-probability is not in" in _refused(["eval-ppl", models["model"], *q, "--reference",
                                                            tmp_path / "low.kld", "--dataset", TEST_TEXT])  # fmt: skip
    assert "existing file is in the way" in _refused(["eval-ppl", models["model"], "--dataset", TEST_TEXT, "--ctx", 32,
                                         "--save-reference", base])  # fmt: skip


def test_drift_per_dataset(models, tmp_path):
    """Two datasets in one run: each one's numbers are those of a run on it alone; "all" pools their tokens."""
    args = ["eval-ppl", models["model"], "--quantized", models["rtn"], "--quantized", models["gguf"], "--ctx", 32,
            "--chunks", 2]  # fmt: skip
    both = _run([*args, "--dataset", f"wiki={TEST_TEXT}", "--dataset", "code", "--plot", tmp_path / "d.png"])
    assert list(both["datasets"]) == ["wiki", "code"] and Path(both["plot"]).stat().st_size > 0
    counts = {}
    for label, spec in (("wiki", str(TEST_TEXT)), ("code", "code")):
        alone = _run([*args, "--dataset", spec])
        mine = both["datasets"][label]
        assert mine["quantized"]["ppl"] == pytest.approx(alone["quantized"]["ppl"], rel=1e-6)
        assert mine["kld_mean"] == pytest.approx(alone["kld_mean"], rel=1e-6)
        for row, solo in zip(mine["models"], alone["models"], strict=True):
            assert row["kld_p99"] == pytest.approx(solo["kld_p99"], rel=1e-6)
        counts[label] = (alone["tokens_scored"], alone["reference"]["nll"])
    n = sum(c for c, _ in counts.values())
    pooled = sum(c * nll for c, nll in counts.values()) / n
    assert both["tokens_scored"] == n and both["reference"]["nll"] == pytest.approx(pooled, rel=1e-9)
    assert both["datasets"]["code"]["reference"]["ppl"] != pytest.approx(both["datasets"]["wiki"]["reference"]["ppl"])
    text = CliRunner().invoke(cli, ["-q", *map(str, args), "--dataset", "wiki", "--dataset", "fr"]).stdout
    assert [line.split("|")[1].strip() for line in text.splitlines()[2:]] == ["wiki"] * 3 + ["fr"] * 3 + ["all"] * 3


def test_shipped_texts_tokenize():
    """Every shipped evaluation text is UTF-8 and long enough for 40 chunks of 512 of the real tokenizer's
    neighbour (about 4 bytes a token): the names --dataset offers resolve."""
    from quantkit.io.texts import SHIPPED_TEXTS, resolve_dataset

    for name in SHIPPED_TEXTS:
        label, path = resolve_dataset(name)
        assert label == name and len(path.read_text(encoding="utf-8")) > 35_000
    assert resolve_dataset("x=a/b.txt") == ("x", Path("a/b.txt"))
    assert resolve_dataset("a/b.txt") == ("b.txt", Path("a/b.txt"))


def test_card_gets_a_table_per_dataset(models, tmp_path):
    """--card with two datasets: the artifact's card holds one evaluation table for each, with its numbers."""
    art = tmp_path / "rtn"
    shutil.copytree(models["rtn"], art)
    res = _run(["eval-ppl", models["model"], "--quantized", art, "--ctx", 32, "--chunks", 1, "--dataset", "wiki",
                "--dataset", "code", "--card"])  # fmt: skip
    card = (art / "README.md").read_text()
    for label, name in (("wiki", "wiki.test.excerpt.raw"), ("code", "code.cpython-lib.excerpt.txt")):
        assert f"## Evaluation: {name} (sha256" in card
        assert f"{res['datasets'][label]['models'][0]['kld_mean']:.5f}" in card
