"""Budget mixes (``export --target-bpw`` / ``--max-size``) and --tensor-type on the CLI.

Oracles: exhaustive search for the type choice (small random instances), the written file read back by gguf-py
(every tensor's type and bytes, the losses of its blocks), llama.cpp loading the mix (llama-cpp-python) against
transformers on the same weights (imported back from the file), and a synthetic importance matrix that must
move bits where it says the inputs are large."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT

from quantkit.cli import cli
from quantkit.errors import QuantkitError
from quantkit.formats.gguf.blocks import dequantize_rows, quantize_rows
from quantkit.formats.gguf.imatrix import ImportanceStats, read_imatrix, write_imatrix
from quantkit.formats.gguf.knapsack import BINS, Budget, Choice, choose, pareto
from quantkit.formats.gguf.mix import parse_size, weight_loss
from quantkit.formats.gguf.policy import parse_override, plan_tensors
from quantkit.io.checkpoint import open_checkpoint


def _run(args: list) -> dict:
    res = CliRunner().invoke(cli, ["-q", *map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _refused(args: list, tmp_path: Path) -> str:
    before = sorted(tmp_path.iterdir())
    res = CliRunner().invoke(cli, ["-q", *map(str, args)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantkit: error:"), res.stderr
    assert sorted(tmp_path.iterdir()) == before  # nothing left behind
    return lines[0]


def _options(rng: np.random.Generator, n: int) -> list[Choice]:
    sizes = np.sort(rng.choice(np.arange(10, 100), n, replace=False))
    losses = np.sort(rng.random(n) * 100)[::-1]
    return [Choice(QT.Q4_0, int(b), float(loss)) for b, loss in zip(sizes, losses, strict=True)]


def _exhaustive(opts: dict[str, list[Choice]], budget: int) -> float:
    return min(sum(c.loss for c in combo) for combo in itertools.product(*opts.values())
               if sum(c.nbytes for c in combo) <= budget)  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_choice_is_the_exhaustive_optimum(seed):
    """Budgets under BINS bytes: the least summed loss of all combinations that fit."""
    rng = np.random.default_rng(seed)
    opts = {f"w{i}": _options(rng, 4) for i in range(5)}
    lo, hi = sum(o[0].nbytes for o in opts.values()), sum(o[-1].nbytes for o in opts.values())
    for budget in np.linspace(lo, hi, 7).astype(int):
        got = choose(opts, Budget(int(budget), "test"), 0)
        assert sum(c.nbytes for c in got.values()) <= budget
        assert sum(c.loss for c in got.values()) == pytest.approx(_exhaustive(opts, budget))


@pytest.mark.parametrize("seed", range(3))
def test_choice_in_units_keeps_the_budget(seed):
    """Budgets over BINS bytes are counted in units: the budget holds, and the loss is no worse than the best
    combination within the budget less one unit per weight."""
    rng = np.random.default_rng(seed)
    opts = {k: [Choice(c.qtype, c.nbytes * 100_003, c.loss) for c in o]
            for k, o in {f"w{i}": _options(rng, 4) for i in range(5)}.items()}  # fmt: skip
    lo, hi = sum(o[0].nbytes for o in opts.values()), sum(o[-1].nbytes for o in opts.values())
    for budget in np.linspace(lo, hi, 7).astype(int)[1:]:
        got = choose(opts, Budget(int(budget), "test"), 0)
        assert sum(c.nbytes for c in got.values()) <= budget
        unit = math.ceil(budget / BINS)
        assert sum(c.loss for c in got.values()) <= _exhaustive(opts, budget - 5 * unit) + 1e-9


def test_pareto_drops_dominated_choices():
    a, b, c = Choice(QT.Q2_K, 10, 9.0), Choice(QT.Q3_K, 20, 9.5), Choice(QT.Q8_0, 40, 1)
    assert pareto([c, b, a]) == [a, c]  # b costs more for more loss


def test_too_small_a_budget_is_refused():
    with pytest.raises(QuantkitError, match="smallest mix takes 30 bytes"):
        choose({"w": [Choice(QT.Q2_K, 10, 1.0)]}, Budget(25, "--target-bpw 0.1"), 20)


def test_parse_size():
    assert [parse_size(s) for s in ("180M", "5.2G", "512MiB", "1000", "2kb")] == [
        180 * 10**6,
        52 * 10**8,
        2**29,
        1000,
        2000,
    ]
    for bad in ("", "M", "1.2.3G", "5T", "-1M"):
        with pytest.raises(QuantkitError, match="--max-size"):
            parse_size(bad)


def _relative(w: np.ndarray, q: np.ndarray, d: np.ndarray) -> float:
    """tr((W - Q) D (W - Q)ᵀ) / tr(W D Wᵀ), written out."""
    w, q = w.astype(np.float64), q.astype(np.float64)
    return float(np.einsum("oi,i,oi->", w - q, d, w - q) / np.einsum("oi,i,oi->", w, d, w))


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.IQ4_XS])
def test_weight_loss_is_the_relative_weighted_error_of_the_blocks(qtype):
    """All rows sampled: tr((W - Q) D (W - Q)ᵀ) / tr(W D Wᵀ) from the dequantized blocks (gguf-py's dequantizer);
    fewer rows: the same within sampling error; D scaled: the same."""
    rng = np.random.default_rng(0)
    w, d = rng.standard_normal((64, 512)).astype(np.float32), rng.random(512).astype(np.float32)
    want = _relative(w, dequantize_rows(quantize_rows(w, qtype), qtype), d)
    assert weight_loss(w, qtype, d, sample_rows=64) == pytest.approx(want, rel=1e-9)
    assert weight_loss(w, qtype, 1e3 * d, sample_rows=64) == pytest.approx(want, rel=1e-9)
    assert weight_loss(w, qtype, d, sample_rows=16) == pytest.approx(want, rel=0.15)


@pytest.fixture(scope="module")
def mixes(tiny_gemma3, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("mix")
    out = {"dir": d}
    out["bpw"] = _run(["export", tiny_gemma3, "--type", "q4_k_m", "--target-bpw", "5", "-o", d / "bpw.gguf"])
    out["size"] = _run(["export", tiny_gemma3, "--type", "q4_k_m", "--max-size", "2M", "-o", d / "size.gguf"])
    return out


def test_mix_meets_its_budget_and_the_file_says_so(mixes, tiny_gemma3):
    cfg = open_checkpoint(tiny_gemma3).config
    n_params = sum(math.prod(t.shape) for t in plan_tensors(cfg, "q4_k_m"))
    for key, file in (("bpw", "bpw.gguf"), ("size", "size.gguf")):
        r, path = mixes[key], mixes["dir"] / file
        stored = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors}
        assert {t["name"]: (t["type"], t["bytes"]) for t in r["mix"]["tensors"]} == stored
        types = {t["type"] for t in r["mix"]["tensors"] if t["mixed"]}
        assert len(types) > 1  # a mix, not one type
        assert r["mix"]["tensors"][0]["name"] == "token_embd.weight" and r["mix"]["tensors"][0]["mixed"]
    assert 8 * sum(b for _, b in stored.values()) / n_params <= 5
    assert mixes["bpw"]["bits_per_weight"] <= 5
    assert path.stat().st_size <= 2_000_000


def _check_measured(r: dict, path: Path, ckpt_dir: Path, d: dict[str, np.ndarray] | None) -> None:
    """Each mixed weight's measured loss is the relative weighted error of the blocks in the file."""
    ckpt = open_checkpoint(ckpt_dir)
    hf = {t.gguf_name: t.hf_name for t in plan_tensors(ckpt.config, "f32")}
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for t in [t for t in r["tensors"] if t["mixed"]][:6]:
        w = ckpt.get(hf[t["name"]], torch.float32).numpy()
        s = stored[t["name"]]
        q = dequantize_rows(np.asarray(s.data).view(np.uint8).reshape(w.shape[0], -1), s.tensor_type)
        weights = np.ones(w.shape[1]) if d is None or t["name"] not in d else d[t["name"]]
        uses = 2 if t["name"] == "token_embd.weight" else 1  # the tied embedding: lookup and output projection
        assert t["measured_loss"] == pytest.approx(uses * _relative(w, q, weights), rel=1e-9)
        assert t["predicted_loss"] == pytest.approx(t["measured_loss"], rel=0.25)


def test_measured_loss_is_the_files_and_close_to_predicted(mixes, tiny_gemma3):
    _check_measured(mixes["bpw"]["mix"], mixes["dir"] / "bpw.gguf", tiny_gemma3, None)


def test_llama_cpp_runs_the_mix_as_transformers_does(mixes, tmp_path):
    """llama.cpp loads the mixed file, and its logits are transformers' on the same (dequantized) weights."""
    llama_cpp = pytest.importorskip("llama_cpp")
    transformers = pytest.importorskip("transformers")
    path = mixes["dir"] / "bpw.gguf"
    _run_plain(["import-gguf", path, tmp_path / "hf"])
    ids = [2, *range(100, 130)]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    assert torch.isfinite(theirs).all()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
    assert (theirs - ours).abs().max() <= 0.02 * ours.abs().max()


def _run_plain(args: list) -> None:
    res = CliRunner().invoke(cli, ["-q", *map(str, args)])
    assert res.exit_code == 0, res.output


def test_importance_weighs_the_losses(tiny_gemma3, tmp_path):
    """An importance matrix (random per column, as gguf-py reads it back) weighs every column's error."""
    cfg = open_checkpoint(tiny_gemma3).config
    rng, stats = np.random.default_rng(1), ImportanceStats.empty()
    for t in plan_tensors(cfg, "f32"):
        if t.gguf_name.startswith("blk.") and len(t.shape) == 2:
            stats.sums[t.gguf_name] = (rng.random(t.shape[1]) * 100).astype(np.float32)
            stats.counts[t.gguf_name] = 4
    write_imatrix(tmp_path / "im.gguf", stats, "synthetic", 16)
    d = read_imatrix(tmp_path / "im.gguf")
    assert set(d) == set(stats.sums)
    out = tmp_path / "im-mix.gguf"
    r = _run(["export", tiny_gemma3, "--type", "q4_k_m", "--target-bpw", "5", "--imatrix", tmp_path / "im.gguf",
              "-o", out])  # fmt: skip
    _check_measured(r["mix"], out, tiny_gemma3, d)


def test_an_override_keeps_the_embedding_out_of_the_mix(tiny_gemma3, tmp_path):
    """--tensor-type token_embd=TYPE fixes the embedding's type; the mix chooses the layer weights alone and
    counts the embedding's bytes against the budget."""
    out = tmp_path / "fixed.gguf"
    r = _run(["export", tiny_gemma3, "--type", "q4_k_m", "--tensor-type", "token_embd=q8_0", "--target-bpw", "6",
              "-o", out])  # fmt: skip
    rows = {t["name"]: t for t in r["mix"]["tensors"]}
    assert rows["token_embd.weight"]["type"] == "Q8_0" and not rows["token_embd.weight"]["mixed"]
    assert all(t["mixed"] for n, t in rows.items() if n.startswith("blk.") and not n.endswith("norm.weight"))
    assert r["mix"]["tensor_bytes"] <= r["mix"]["budget_tensor_bytes"]


def test_tensor_type_on_the_cli(tiny_gemma3, tmp_path):
    r = _run(["export", tiny_gemma3, "--type", "q4_k_m", "--tensor-type", "ATTN_V=Q8_0", "-o", tmp_path / "o.gguf"])
    assert r["overrides"] == ["attn_v=q8_0"]
    stored = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "o.gguf").tensors}
    n = open_checkpoint(tiny_gemma3).config.num_hidden_layers
    assert {n: q for n, q in stored.items() if "attn_v" in n} == {f"blk.{i}.attn_v.weight": QT.Q8_0 for i in range(n)}
    want = plan_tensors(open_checkpoint(tiny_gemma3).config, "q4_k_m", overrides=[parse_override("attn_v=q8_0")])
    assert stored == {t.gguf_name: t.qtype for t in want}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--tensor-type", "attn_v"], "expected PATTERN=TYPE"),
        (["--tensor-type", "attn_v=q9_9"], "does not encode 'q9_9'"),
        (["--tensor-type", "(=q8_0"], "not a regular expression"),
        (["--target-bpw", "4", "--max-size", "1M"], "give one budget"),
        (["--max-size", "lots"], "expected a size"),
        (["--imatrix", "x.gguf"], "x.gguf: not found"),  # export uses it without a budget (weighted rounding)
        (["--target-bpw", "0.5"], "smallest mix takes"),
        (["--type", "f16", "--tensor-type", "attn_v=q8_0"], "needs a quantized --type"),
    ],
)
def test_bad_mix_options_are_refused(extra, match, tiny_gemma3, tmp_path):
    args = ["export", tiny_gemma3, "--type", "q4_k_m", *extra, "-o", tmp_path / "x.gguf"]
    if "--type" in extra:
        args[2:4] = []
    assert match in _refused(args, tmp_path)


def test_quantize_takes_an_imatrix_only_for_a_budget(tiny_gemma3, tmp_path):
    """GPTQ rounds with its own calibration: there an imatrix only weighs a budget mix's errors."""
    args = ["quantize", tiny_gemma3, "--format", "gguf", "--type", "q4_k_m", "--imatrix", "x.gguf",
            "-o", tmp_path / "x.gguf"]  # fmt: skip
    assert "give --target-bpw or --max-size" in _refused(args, tmp_path)


def test_gptq_writes_a_mix_into_its_blocks(tiny_gemma2, tmp_path):
    """quantize --format gguf with an override and a budget: GPTQ rounds every linear onto the grid of the type
    the mix gave it, and the file holds those blocks as they are (lossless), with the override kept."""
    from conftest import CALIB_TEXT

    out = tmp_path / "gptq-mix.gguf"
    r = _run(["quantize", tiny_gemma2, "--method", "gptq", "--fast", "--nsamples", "8", "--seqlen", "32",
              "--calib", CALIB_TEXT, "--format", "gguf", "--type", "q4_k_m", "--tensor-type", "blk\\.0\\.attn_q=q8_0",
              "--target-bpw", "5", "-o", out])["gguf"]  # fmt: skip
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert stored == {t["name"]: t["type"] for t in r["mix"]["tensors"]}
    assert stored["blk.0.attn_q.weight"] == "Q8_0" and not r["mix"]["tensors"][2]["mixed"]
    assert len({t["type"] for t in r["mix"]["tensors"] if t["mixed"]}) > 1
    n_linear = sum(n.startswith("blk.") and not n.endswith("norm.weight") for n in stored)
    assert r["counts"]["lossless"] == n_linear
    assert r["bits_per_weight"] <= 5


def test_codebook_types_are_candidates_only_with_calibration():
    """Without an importance matrix llama-quantize refuses most codebook i-quants: a plain export's mix leaves
    them out; GPTQ (or an export's imatrix) takes them, and a 640-wide row still falls back as llama.cpp's."""
    from quantkit.formats.gguf.mix import CODEBOOKS, candidates

    assert not set(CODEBOOKS) & set(candidates(512))
    assert set(CODEBOOKS) <= set(candidates(512, codebooks=True))
    assert candidates(640, codebooks=True) == candidates(640)


def test_gptq_mix_below_q2_k_takes_codebook_types(tiny_gemma2, tmp_path):
    """A GPTQ mix at 2.6 bits per weight, below what Q2_K..Q8_0 reach: IQ2 weights written by LDLQ, within
    budget, and llama.cpp's logits on the file follow quantkit's."""
    from conftest import CALIB_TEXT

    from quantkit.formats.gguf.mix import CODEBOOKS

    out = tmp_path / "low.gguf"
    r = _run(["quantize", tiny_gemma2, "--method", "gptq", "--fast", "--nsamples", "8", "--seqlen", "32",
              "--calib", CALIB_TEXT, "--format", "gguf", "--type", "q4_k_m", "--target-bpw", "2.6",
              "-o", out])["gguf"]  # fmt: skip
    mixed = {t["type"] for t in r["mix"]["tensors"] if t["mixed"]}
    assert mixed & {q.name for q in CODEBOOKS} and r["bits_per_weight"] <= 2.6
    from conftest import llama_and_quantkit_logits

    theirs, ours = llama_and_quantkit_logits(out)
    # mean, not max: on this 4-layer random model llama.cpp's 8-bit activations move single logits by up to
    # 0.4 in every type (measured: plain Q2_K 0.32, this mix 0.43; means 0.038 of 4.0 for both)
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
    assert (theirs - ours).abs().mean() <= 0.02 * ours.abs().mean()


def test_a_mix_below_q2_k_without_calibration_takes_q1_0_and_q2_0(tiny_gemma3, tmp_path):
    """Plain export at 2.5 bits per weight, below Q2_K's 2.625 and with no codebook type on offer (no
    calibration): only the pinned llama.cpp's Q1_0 / Q2_0 reach it. The file keeps the budget, its Q2_0
    weights are on searched scales (predicted loss = the file's), and llama.cpp runs it as quantkit's forward
    does (the embedding included, whatever type it took)."""
    from conftest import llama_and_quantkit_logits

    out = tmp_path / "low.gguf"
    r = _run(["export", tiny_gemma3, "--type", "q4_k_m", "--target-bpw", "2.5", "-o", out])
    mixed = {t["type"] for t in r["mix"]["tensors"] if t["mixed"]}
    assert mixed & {"Q1_0", "Q2_0"} and r["bits_per_weight"] <= 2.5
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert {t["name"]: t["type"] for t in r["mix"]["tensors"]} == stored
    _check_measured(r["mix"], out, tiny_gemma3, None)
    # Q2_0 weights go onto searched scales: below llama.cpp's own encoder's error on the same rows
    ckpt, blocks = open_checkpoint(tiny_gemma3), {t.name: t for t in gguf.GGUFReader(out).tensors}
    hf = {t.gguf_name: t.hf_name for t in plan_tensors(ckpt.config, "f32")}
    q2 = [n for n, q in stored.items() if q == "Q2_0"]
    assert q2
    for name in q2:
        w = ckpt.get(hf[name], torch.float32).numpy()
        ours_q = dequantize_rows(np.asarray(blocks[name].data).view(np.uint8).reshape(w.shape[0], -1), QT.Q2_0)
        llama_q = dequantize_rows(quantize_rows(w, QT.Q2_0), QT.Q2_0)
        assert _relative(w, ours_q, np.ones(w.shape[1])) < 0.5 * _relative(w, llama_q, np.ones(w.shape[1]))
    theirs, ours = llama_and_quantkit_logits(out)
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
    assert (theirs - ours).abs().mean() <= 0.02 * ours.abs().mean()


def test_sensitivity_reads_sampled_rows_alone(tiny_gemma2):
    """Checkpoint.get_rows (how the mix samples a weight, so a 9B embedding is never read whole): scattered and
    consecutive rows equal those rows of the whole tensor, in its dtype or cast."""
    ckpt = open_checkpoint(tiny_gemma2)
    name = "model.embed_tokens.weight"
    whole = ckpt.get(name)
    for rows in ([0, 3, 4, 5, 9, whole.shape[0] - 1], list(range(2, 40))):
        got = ckpt.get_rows(name, np.array(rows))
        assert got.dtype == whole.dtype and torch.equal(got, whole[rows])
    assert torch.equal(ckpt.get_rows(name, np.array([1, 2]), torch.float32), whole[1:3].float())
