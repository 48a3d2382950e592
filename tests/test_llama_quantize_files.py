"""Whole GGUF files against llama-quantize: for every type quantkit exports, quantkit's ``export --type T`` of a
bf16 checkpoint has the same tensors (by name), with the same ggml types and the same bytes as
``llama-quantize`` run on quantkit's F32 export of that checkpoint (bf16 -> f32 is exact, so both quantize the
same values). Tiny Gemma 2 and Gemma 3 checkpoints, plus one whose rows are not multiples of 256 (hidden 320)
so that llama-quantize's row-length fallbacks are exercised. Needs build/llama.cpp/bin/llama-quantize
(``make llama-tools``)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from make_tiny_checkpoint import make_tiny_checkpoint

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.export import export_gguf
from quantkit.formats.gguf.policy import FILE_TYPES, parse_override, plan_tensors
from quantkit.io.checkpoint import open_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LLAMA_QUANTIZE = ROOT / "build" / "llama.cpp" / "bin" / "llama-quantize"
pytestmark = pytest.mark.skipif(not LLAMA_QUANTIZE.is_file(), reason="llama-quantize not built (make llama-tools)")

# quantkit's pure K types: one type for every weight but the tied embedding, which (being the output too) gets
# what llama-quantize gives it in its non-pure files: Q6_K, or Q8_0 where rows are not a multiple of 256 (an
# explicit --token-embedding-type gets no row-length fallback, so the test names the fallback itself)
PURE = ["--pure", "--token-embedding-type", "{embd}"]
# quantkit --type -> llama-quantize's arguments before the files, and its type argument
LLAMA_TYPES = {
    "q8_0": ([], "Q8_0"),
    "q4_0": ([], "Q4_0"),
    "q4_1": ([], "Q4_1"),
    "q5_0": ([], "Q5_0"),
    "q5_1": ([], "Q5_1"),
    "q4_k": (PURE, "Q4_K_S"),
    "q5_k": (PURE, "Q5_K_S"),
    "q6_k": ([], "Q6_K"),
    "q3_k_m": ([], "Q3_K_M"),
    "q4_k_m": ([], "Q4_K_M"),
    "q5_k_m": ([], "Q5_K_M"),
    "q2_k": ([], "Q2_K"),
    "q3_k_s": ([], "Q3_K_S"),
    "q3_k_l": ([], "Q3_K_L"),
    "q4_k_s": ([], "Q4_K_S"),
    "q5_k_s": ([], "Q5_K_S"),
    "iq4_nl": ([], "IQ4_NL"),
    "iq4_xs": ([], "IQ4_XS"),
    "iq3_xxs": ([], "IQ3_XXS"),
    "iq3_xs": ([], "IQ3_XS"),
    "iq3_s": ([], "IQ3_S"),
    "iq3_m": ([], "IQ3_M"),
    "q1_0": ([], "Q1_0"),
    "q2_0": ([], "Q2_0"),
    "f16": ([], "F16"),
    "bf16": ([], "BF16"),
}
# model -> make_tiny_checkpoint's arguments (the first two are conftest's tiny_gemma2 / tiny_gemma3); hidden 320
# with head_dim 64 gives rows of 320, 256 and 640 elements
MODELS = {
    "gemma2": {"arch": "gemma2"},
    "gemma3": {"arch": "gemma3"},
    "gemma3-h320": {"arch": "gemma3", "hidden": 320, "head_dim": 64, "query_pre_attn_scalar": 64},
    # 16 layers and 4 query heads per KV head (as the 270M): the layer rules (n/8, n/16, use_more_bits, the
    # first 4) and the n_gqa >= 4 ones fire; hidden 128 keeps it small
    "gemma3-l16-gqa4": {
        "arch": "gemma3",
        "hidden": 128,
        "head_dim": 64,
        "num_hidden_layers": 16,
        "num_key_value_heads": 1,
        "intermediate_size": 512,
    },  # fmt: skip
    # two layers of the 256-wide model with a 256-wide MLP: every IQ2 / IQ1 weight on rows of 256, written in
    # seconds (IQ1_S's exhaustive search costs ~3 us per weight)
    "gemma3-l2": {"arch": "gemma3", "num_hidden_layers": 2, "intermediate_size": 256},
}
# which types run on which model, to keep this test short: every type on the 320-wide model (row-length
# fallbacks); on the two plain tiny models one file per encoder and per Gemma generation (the types added
# since add no new tensor or encoder there); on the 16-layer one the types whose rules depend on the layer
# or on n_gqa
LAYER_RULES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "iq4_nl", "iq4_xs"]
PLAIN = ["q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q5_k", "q6_k", "q3_k_m", "q4_k_m", "q5_k_m", "f16", "bf16"]
PLAIN += ["q1_0", "q2_0"]
# The IQ3 files of the 320-wide model spend seconds in IQ4_NL fallbacks: bytes for iq3_xxs (IQ3_S attn_output)
# and iq3_m (Q4_K rules), types only for iq3_xs and iq3_s (the same tensors as iq3_xxs's IQ3_S / IQ4_NL ones)
# and for all four on the 16-layer model, against llama-quantize --dry-run
# Q1_0 has no row-length fallback: both refuse the 320-wide model (test_q1_0_rows_without_a_fallback_are_refused)
H320 = [t for t in LLAMA_TYPES if t not in ("iq3_xs", "iq3_s", "q1_0")]
MODEL_TYPES = {"gemma2": PLAIN, "gemma3": PLAIN, "gemma3-h320": H320, "gemma3-l16-gqa4": LAYER_RULES, "gemma3-l2": []}
# llama-quantize --dry-run: every tensor's type, without quantizing or the imatrix that some types need
DRY_RUN = ["q2_k_s", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m"]
DRY_RUN_LINE = re.compile(r"\] +(\S+) +- \[.*\], type = +(\w+), size = [^(]*(?:\((\w+)\))?\s*$")
# llama-quantize refuses these without an importance matrix (here, with rows of 256: IQ3_XXS files give attn_q
# and attn_k IQ2_S, IQ3_XS files IQ3_XXS); so does quantkit's RTN export
NEED_IMATRIX = {"q2_k_s": "Q2_K_S", "iq3_xxs": "IQ3_XXS", "iq3_xs": "IQ3_XS", "iq1_s": "IQ1_S", "iq1_m": "IQ1_M"}
# every IQ2 file type holds IQ2 weights on rows of 256 or 512 (all but attn_v and the first ffn_down): the
# imatrix cases below write them, --dry-run checks their types
NEED_IMATRIX |= {"iq2_xxs": "IQ2_XXS", "iq2_xs": "IQ2_XS", "iq2_s": "IQ2_S", "iq2_m": "IQ2_M"}
CASES = [(m, t) for m in MODELS for t in MODEL_TYPES[m]]


@pytest.fixture(scope="module")
def f32_files(tmp_path_factory, tiny_gemma2, tiny_gemma3):
    """model -> (bf16 checkpoint, quantkit's F32 GGUF of it), each made once per module."""
    root, made = tmp_path_factory.mktemp("llama-quantize"), {}
    fixtures = {"gemma2": tiny_gemma2, "gemma3": tiny_gemma3}

    def get(model: str) -> tuple[Path, Path]:
        if model not in made:
            ckpt = fixtures.get(model) or make_tiny_checkpoint(root / model, **MODELS[model])
            f32 = root / f"{model}-f32.gguf"
            export_gguf(ckpt, f32, "f32", progress=False)
            made[model] = ckpt, f32
        return made[model]

    return get


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (ggml type, data bytes) of every tensor, as gguf-py reads them (llama-quantize writes the
    tensors in its own order, sorted by layer, so files are compared by name)."""
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def test_every_exported_type_is_compared():
    assert set(LLAMA_TYPES) | set(NEED_IMATRIX) == set(FILE_TYPES) - {"f32"}  # f32 is llama-quantize's input


@pytest.mark.parametrize("model", [m for m in MODELS if m != "gemma3-l2"])  # gemma3's layers
def test_f32_input_holds_the_bf16_values(model, f32_files):
    """The F32 GGUF given to llama-quantize holds the checkpoint's bf16 weights exactly (norms as 1 + w)."""
    ckpt_dir, f32 = f32_files(model)
    ckpt = open_checkpoint(ckpt_dir)
    for t in gguf.GGUFReader(f32).tensors:
        assert t.tensor_type == QT.F32
        hf = next(p.hf_name for p in plan_tensors(ckpt.config, "f32") if p.gguf_name == t.name)
        want = ckpt.get(hf).to(torch.float32) + (1.0 if hf.endswith("norm.weight") else 0.0)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want.numpy(), err_msg=t.name)


@pytest.mark.parametrize(("model", "qtype"), CASES)
def test_export_equals_llama_quantize(model, qtype, f32_files, tmp_path):
    ckpt_dir, f32 = f32_files(model)
    theirs, ours = tmp_path / "llama-quantize.gguf", tmp_path / "quantkit.gguf"
    flags, name = LLAMA_TYPES[qtype]
    embd = "q6_k" if open_checkpoint(ckpt_dir).config.hidden_size % 256 == 0 else "q8_0"
    cmd = [str(LLAMA_QUANTIZE), *(f.format(embd=embd) for f in flags), str(f32), str(theirs), name, "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    export_gguf(ckpt_dir, ours, qtype, progress=False, workers=2)
    want, got = _tensors(theirs), _tensors(ours)
    assert {n: t for n, (t, _) in got.items()} == {n: t for n, (t, _) in want.items()}  # names and types
    differ = [n for n, (_, data) in got.items() if data != want[n][1]]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ from llama-quantize's, e.g. {differ[:4]}"


def _dry_run_types(f32: Path, llama_type: str) -> dict[str, str]:
    """name -> ggml type of every tensor as ``llama-quantize --dry-run`` plans it."""
    run = subprocess.run([str(LLAMA_QUANTIZE), "--dry-run", str(f32), llama_type], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    hits = [DRY_RUN_LINE.search(line) for line in (run.stdout + run.stderr).splitlines()]
    return {m[1]: (m[3] or m[2]).upper() for m in hits if m}


@pytest.mark.parametrize("qtype", DRY_RUN)
@pytest.mark.parametrize("model", ["gemma3", "gemma3-h320", "gemma3-l16-gqa4"])
def test_types_equal_llama_quantize_dry_run(model, qtype, f32_files):
    """The rules without the bytes, also where llama-quantize needs an imatrix to go on (IQ3_XXS and IQ2_S
    weights of rows of 256): on the 4-layer model the IQ3_XS rule for ffn_gate / ffn_up (the middle layers)
    picks IQ3_XXS on layers 0-2 and leaves layer 3 IQ3_S."""
    ckpt_dir, f32 = f32_files(model)
    want = _dry_run_types(f32, LLAMA_TYPES.get(qtype, ([], NEED_IMATRIX.get(qtype)))[1])
    got = {t.gguf_name: t.qtype.name for t in plan_tensors(open_checkpoint(ckpt_dir).config, qtype)}
    assert got == want


@pytest.mark.parametrize("qtype", list(NEED_IMATRIX))
def test_both_refuse_without_an_importance_matrix(qtype, f32_files, tmp_path):
    ckpt_dir, f32 = f32_files("gemma3")
    theirs, ours = tmp_path / "llama-quantize.gguf", tmp_path / "quantkit.gguf"
    run = subprocess.run([str(LLAMA_QUANTIZE), str(f32), str(theirs), NEED_IMATRIX[qtype], "2"], capture_output=True)
    assert run.returncode != 0 and b"requires an imatrix" in run.stderr + run.stdout, run.stderr[-500:]
    with pytest.raises(QuantkitError, match="requires an importance matrix"):
        export_gguf(ckpt_dir, ours, qtype, progress=False, workers=2)
    assert not ours.exists() and list(tmp_path.iterdir()) == ([theirs] if theirs.exists() else [])


def test_q1_0_rows_without_a_fallback_are_refused(f32_files, tmp_path):
    """Rows of 320 are not a multiple of Q1_0's block of 128 and llama-quantize defines no fallback type for
    Q1_0: it stops with an error, and quantkit refuses in one line, writing nothing."""
    ckpt_dir, f32 = f32_files("gemma3-h320")
    theirs, ours = tmp_path / "llama-quantize.gguf", tmp_path / "quantkit.gguf"
    run = subprocess.run([str(LLAMA_QUANTIZE), str(f32), str(theirs), "Q1_0", "2"], capture_output=True, text=True)
    assert run.returncode != 0 and "no tensor type fallback is defined for type q1_0" in run.stdout + run.stderr
    with pytest.raises(QuantkitError, match="defines no fallback type for Q1_0") as e:
        export_gguf(ckpt_dir, ours, "q1_0", progress=False)
    assert "\n" not in str(e.value) and not ours.exists()


@pytest.mark.parametrize("qtype", ["q1_0", "q2_0"])
def test_llama_cpp_loads_the_low_bit_files(qtype, f32_files, tmp_path):
    """llama.cpp (llama-cpp-python) loads quantkit's Q1_0 / Q2_0 files and its logits follow quantkit's
    forward on the same file's weights (it decodes the blocks quantkit wrote as quantkit does)."""
    pytest.importorskip("llama_cpp")
    from conftest import llama_and_quantkit_logits

    ckpt_dir, _ = f32_files("gemma3")
    path = tmp_path / f"{qtype}.gguf"
    export_gguf(ckpt_dir, path, qtype, progress=False, workers=2)
    theirs, ours = llama_and_quantkit_logits(path)
    assert torch.isfinite(theirs).all()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
    assert (theirs - ours).abs().max() <= 0.02 * ours.abs().max()


# ----------------------------------------------------------------------------------- with an importance matrix

# types whose per-tensor choice changes with an imatrix (ffn_down of the first eighth: Q4_0 -> Q4_1, Q5_0 ->
# Q5_1, IQ4_* keep their type) run on the 16-layer model; every weighted encoder (and Q2_K_S, allowed with an
# imatrix) on the 320-wide one, whose row-length fallbacks reach the legacy and IQ4_NL ones too
IMATRIX_TYPES = {**LLAMA_TYPES, **{k: ([], v) for k, v in NEED_IMATRIX.items()}}
# the mixes add no weighted encoder and no imatrix-dependent rule beyond q4_k_m's and q2_k's
MIXES = ("q3_k_m", "q3_k_l", "q4_k_s", "q5_k_s", "q5_k_m", "f16", "bf16")
# IQ3: on the 320-wide model iq3_xxs's weighted IQ3_S attn_output (iq3_xs / iq3_s / iq3_m write no other IQ3
# tensor there); on the 256-wide one iq3_xs, whose attn_q / attn_k / ffn_gate / ffn_up (layers 0-2) are
# IQ3_XXS, which needs the imatrix: its imatrix leaves nothing out
IQ3_LATER = ("iq3_xs", "iq3_s", "iq3_m")
# IQ2: every file type on a 2-layer 256-wide model, where all its IQ2 weights are (on the 320-wide one only
# attn_output is); and iq3_xxs there, whose attn_q / attn_k are IQ2_S
IQ2 = ("iq2_xxs", "iq2_xs", "iq2_s", "iq2_m")
NOT_H320 = (*MIXES, *IQ3_LATER, *IQ2, "q1_0", "iq1_s", "iq1_m")  # Q1_0: no fallback; IQ1: test_iq1_with_imatrix_...
IMATRIX_CASES = [("gemma3-h320", t) for t in IMATRIX_TYPES if t not in NOT_H320] + [
    ("gemma3-l16-gqa4", t) for t in ("q4_0", "q5_0", "iq4_nl", "q2_k_s")
] + [("gemma3", "iq3_xs"), ("gemma3", "q1_0")] + [("gemma3-l2", t) for t in ("iq3_xxs", *IQ2)]  # fmt: skip
SKIPPED = "blk.0.attn_k.weight"  # left out of the imatrix: quantized without one, as llama-quantize does
FULL_IMATRIX = ("gemma3", "gemma3-l2")  # models whose imatrix has every weight


@pytest.fixture(scope="module")
def imatrix_files(f32_files, tmp_path_factory):
    """model -> an imatrix of random activations written by quantkit (the --imatrix-out writer), with an entry
    for every linear weight but SKIPPED (but for FULL_IMATRIX models), and one for the tied token embedding
    (the output's input)."""
    from quantkit.formats.gguf.imatrix import ImportanceStats, write_imatrix

    root, made = tmp_path_factory.mktemp("imatrix"), {}

    def get(model: str) -> Path:
        if model not in made:
            _, f32 = f32_files(model)
            stats, g = ImportanceStats.empty(), np.random.default_rng(len(model))
            for t in gguf.GGUFReader(f32).tensors:
                if len(t.shape) == 2 and (t.name != SKIPPED or model in FULL_IMATRIX):
                    n = int(t.shape[0])  # ne0: the input columns
                    stats.sums[t.name] = (g.standard_normal(n) ** 2 * 96 * g.uniform(0.01, 10)).astype(np.float32)
                    stats.counts[t.name] = 96
            made[model] = write_imatrix(root / f"{model}.imatrix.gguf", stats, "random", 32)
        return made[model]

    return get


@pytest.mark.parametrize(("model", "qtype"), IMATRIX_CASES)
def test_export_with_imatrix_equals_llama_quantize(model, qtype, f32_files, imatrix_files, tmp_path):
    ckpt_dir, f32 = f32_files(model)
    imatrix = imatrix_files(model)
    theirs, ours = tmp_path / "llama-quantize.gguf", tmp_path / "quantkit.gguf"
    flags, name = IMATRIX_TYPES[qtype]
    embd = "q6_k" if open_checkpoint(ckpt_dir).config.hidden_size % 256 == 0 else "q8_0"
    args = [*(f.format(embd=embd) for f in flags), "--imatrix", str(imatrix), str(f32), str(theirs), name, "2"]
    run = subprocess.run([str(LLAMA_QUANTIZE), *args], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    report = export_gguf(ckpt_dir, ours, qtype, progress=False, workers=2, imatrix=imatrix)
    assert report["imatrix"]["tensors"] == report["imatrix"]["entries"]  # every entry matched a weight
    _same_tensors(theirs, ours)
    keys = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count")
    theirs_kv, ours_kv = gguf.GGUFReader(theirs).fields, gguf.GGUFReader(ours).fields
    assert [ours_kv[k].contents() for k in keys] == [theirs_kv[k].contents() for k in keys]
    assert ours_kv["quantize.imatrix.chunks_count"].contents() == theirs_kv["quantize.imatrix.chunks_count"].contents()


def _same_tensors(theirs: Path, ours: Path) -> None:
    want, got = _tensors(theirs), _tensors(ours)
    assert {n: t for n, (t, _) in got.items()} == {n: t for n, (t, _) in want.items()}  # names and types
    differ = [n for n, (_, data) in got.items() if data != want[n][1]]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ from llama-quantize's, e.g. {differ[:4]}"


# --tensor-type: the same options given to both. The 16-layer model makes the overridden weights shift
# llama-quantize's per-kind layer counters (an overridden attn_v / ffn_down is not counted by the rules); the
# 320-wide one sends the overrides through the row-length fallback. First match wins; patterns are regexes.
OVERRIDES = {
    ("gemma3-l16-gqa4", "q4_k_m"): ["blk\\.[0-2]\\.attn_v=q8_0", "blk\\.1[0-9]\\.ffn_down=q2_k", "ffn_up=iq4_nl"],
    ("gemma3-l16-gqa4", "q3_k_m"): ["blk\\.0\\.ffn_down=q4_0", "attn_v=q5_1", "token_embd=q4_k", "attn=q6_k"],
    ("gemma3-h320", "q4_k_m"): ["attn_q=q3_k", "ffn_down=q5_k", "token_embd=q8_0", "ATTN_K=Q6_K"],
}


@pytest.mark.parametrize(("model", "qtype"), list(OVERRIDES))
def test_tensor_type_overrides_equal_llama_quantize(model, qtype, f32_files, tmp_path):
    ckpt_dir, f32 = f32_files(model)
    theirs, ours = tmp_path / "llama-quantize.gguf", tmp_path / "quantkit.gguf"
    flags = [a for o in OVERRIDES[model, qtype] for a in ("--tensor-type", o)]
    cmd = [str(LLAMA_QUANTIZE), *flags, str(f32), str(theirs), LLAMA_TYPES[qtype][1], "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    cfg = open_checkpoint(ckpt_dir).config
    plan = plan_tensors(cfg, qtype, overrides=[parse_override(o) for o in OVERRIDES[model, qtype]])
    assert plan != plan_tensors(cfg, qtype)  # the overrides change something
    export_gguf(ckpt_dir, ours, qtype, progress=False, workers=2, types={t.gguf_name: t.qtype for t in plan})
    _same_tensors(theirs, ours)


def test_tensor_type_with_imatrix_equals_llama_quantize(f32_files, imatrix_files, tmp_path):
    """Both options at once, through the CLI: the imatrix's rules and weighted rounding, then the overrides."""
    from click.testing import CliRunner

    from quantkit.cli import cli

    ckpt_dir, f32 = f32_files("gemma3-l16-gqa4")
    imatrix = imatrix_files("gemma3-l16-gqa4")
    theirs, ours = tmp_path / "llama-quantize.gguf", tmp_path / "quantkit.gguf"
    opts = ["blk\\.[0-3]\\.attn_v=q8_0", "ffn_up=q5_0"]
    flags = [a for o in opts for a in ("--tensor-type", o)]
    cmd = [str(LLAMA_QUANTIZE), *flags, "--imatrix", str(imatrix), str(f32), str(theirs), "Q4_0", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    args = ["export", str(ckpt_dir), "--type", "q4_0", *flags, "--imatrix", str(imatrix), "-o", str(ours)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    _same_tensors(theirs, ours)


# each llama-quantize run of an IQ1 type first builds libggml's IQ1 neighbour tables (~60 s): iq1_m, whose rules
# are iq1_s's, is left to --dry-run (types) and tests/test_iquants_iq1.py (bytes); checked once by hand: equal
@pytest.mark.parametrize("qtype", ["iq1_s"])
def test_iq1_with_imatrix_equals_llama_quantize(qtype, f32_files, imatrix_files, tmp_path):
    """An IQ1_S / IQ1_M file with an imatrix (every weight in it): IQ1 weights, Q2_K attn_v, Q5_K embedding,
    byte for byte. Its IQ2_XXS attn_output (branch iq2) is overridden to Q4_K on both sides."""
    ckpt_dir, f32 = f32_files("gemma3-l2")
    imatrix = imatrix_files("gemma3-l2")
    theirs, ours = tmp_path / "llama-quantize.gguf", tmp_path / "quantkit.gguf"
    flags = ["--tensor-type", "attn_output=q4_k", "--imatrix", str(imatrix)]
    run = subprocess.run([str(LLAMA_QUANTIZE), *flags, str(f32), str(theirs), qtype.upper(), "2"], capture_output=True)
    assert run.returncode == 0, run.stderr[-2000:]
    cfg = open_checkpoint(ckpt_dir).config
    plan = plan_tensors(cfg, qtype, imatrix=True, overrides=[parse_override("attn_output=q4_k")])
    assert {t.qtype for t in plan if len(t.shape) == 2} == {QT[qtype.upper()], QT.Q2_K, QT.Q5_K, QT.Q4_K}
    export_gguf(ckpt_dir, ours, qtype, progress=False, workers=2, imatrix=imatrix,
                types={t.gguf_name: t.qtype for t in plan})  # fmt: skip
    _same_tensors(theirs, ours)
