"""GGUF export: tensor bytes read back through gguf-py, metadata, llama-quantize's type choice, lossless
integer artifacts, atomic writes, and llama.cpp itself running the exported files (llama-cpp-python; those
tests are skipped without it). Tiny random models: exactness checks only, never quality claims."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from quantkit.errors import QuantkitError
from quantkit.formats.gguf import export as eg
from quantkit.formats.gguf import policy, stream
from quantkit.formats.gguf.blocks import dequantize_rows, quantize_rows
from quantkit.formats.gguf.encode import encode_tensor
from quantkit.formats.gguf.lowbit import DEQUANTIZERS
from quantkit.formats.gguf.metadata import check_llamacpp_compatible
from quantkit.formats.gguf.names import LAYER_TENSORS
from quantkit.formats.gguf.vocab import VocabWriter, build_vocab
from quantkit.formats.packed.write import ArtifactWriter, quantization_config
from quantkit.io.checkpoint import Checkpoint, open_checkpoint
from quantkit.io.config import config_from_dict
from quantkit.io.tokenizer import Tokenizer
from quantkit.model import LINEAR_NAMES, Gemma, build_model
from quantkit.quant.primitives import QuantSpec, rtn

TEST_TEXT = Path(__file__).resolve().parents[1] / "data" / "wiki.test.excerpt.raw"
N_THREADS = 2
# The fixture tokenizer normalizes with SentencePiece's nmt_nfkc (e.g. "\n" -> " "), which llama.cpp does not
# do; real Gemma tokenizers use identity normalization. So the tokenizer check uses one plain line.
SAMPLE = "Robert Boulter is an English film, television and theatre actor. He had a guest starring role in 2000."


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_gemma2, tiny_gemma3):
    """export(arch, qtype) -> (path, report), each file written once per module."""
    out, cache = tmp_path_factory.mktemp("gguf"), {}

    def get(arch: str, qtype: str) -> tuple[Path, dict]:
        if (arch, qtype) not in cache:
            src = {"gemma2": tiny_gemma2, "gemma3": tiny_gemma3}[arch]
            path = out / f"{arch}-{qtype}.gguf"
            cache[arch, qtype] = path, eg.export_gguf(src, path, qtype, progress=False)
        return cache[arch, qtype]

    return get


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def values(t: gguf.ReaderTensor) -> np.ndarray:
    """gguf-py's float32 dequantization in numpy order ([O, I]: GGUF dims reversed); Q1_0 / Q2_0, which gguf-py
    cannot decode, by quantkit's decoder (checked against libggml's in test_lowbit)."""
    shape = tuple(int(n) for n in reversed(t.shape))
    if t.tensor_type in DEQUANTIZERS:
        return dequantize_rows(np.asarray(t.data), t.tensor_type).reshape(shape)
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)


def fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def make_artifact(src: Path, out: Path, spec: QuantSpec, scale_dtype: torch.dtype) -> Checkpoint:
    """A pack-quantized artifact of ``src``: RTN on every linear (same layout as `quantkit quantize`)."""
    ck = open_checkpoint(src)
    with ArtifactWriter(out) as w:
        for name in ck.names():
            module = name.removesuffix(".weight")
            if module.endswith(LINEAR_NAMES):
                w.add_quantized(module, rtn(ck.get(name), spec, scale_dtype))
            else:
                w.add(name, ck.get(name))
        w.write_json("config.json", ck.raw_config | {"quantization_config": quantization_config(spec)})
        w.copy_tokenizer(ck.path)
    return open_checkpoint(out)


def model_from_gguf(ckpt: Checkpoint, path: Path) -> Gemma:
    """quantkit's fp32 model with every 2-D weight replaced by the GGUF's dequantized tensor."""
    ts = tensors(path)
    model = build_model(ckpt)
    model.load_globals(torch.from_numpy(values(ts["token_embd.weight"])), ckpt.get("model.norm.weight"))
    for i in range(ckpt.config.num_hidden_layers):
        for name in LINEAR_NAMES:
            w = torch.from_numpy(values(ts[f"blk.{i}.{LAYER_TENSORS[name]}.weight"]))
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
            model.set_linear(i, name, lin)
    return model


def llamacpp_ppl():
    return pytest.importorskip("llamacpp_ppl", reason="llama-cpp-python is not installed")


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [T, V] for ids at positions 0..T-1 (fp32 KV cache, so only the weights and
    llama.cpp's own kernels differ from quantkit)."""
    llm = llamacpp_ppl().load_llama(path, n_ctx=128, n_threads=N_THREADS, kv_f32=True)
    return llamacpp_ppl().chunk_logits(llm, ids)


def eval_ids(ckpt: Checkpoint) -> list[int]:
    """BOS + 40 tokens: longer than the tiny models' sliding window of 16."""
    return Tokenizer(ckpt.tokenizer_path).encode(TEST_TEXT.read_text()[:2000])[:41]


def quantkit_logits(model: Gemma, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def ggml_gelu_table() -> torch.Tensor:
    """llama.cpp's CPU GELU: a table of fp16(gelu(x)) over all fp16 inputs x, computed in float32."""
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    f = np.float32
    with np.errstate(all="ignore"):
        inner = f(0.7978845608028654) * x * (f(1.0) + f(0.044715) * x * x)
        y = f(0.5) * x * (f(1.0) + np.tanh(inner))
    return torch.from_numpy(y.astype(np.float16).astype(np.float32))


def table_gelu(table: torch.Tensor):
    def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        y = table[x.half().view(torch.int16).long() & 0xFFFF]
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    return gelu


# --------------------------------------------------------------------------------------- bytes and names


# q2_k_s, iq3_xxs, iq3_xs, iq2_* and iq1_* need an importance matrix here (test_llama_quantize_files checks the
# refusal); iq3_s / iq3_m would take seconds per file (IQ3_S on every weight): test_llama_quantize_files
# compares their bytes with llama-quantize's on smaller models
@pytest.mark.parametrize(
    "qtype", [q for q in policy.FILE_TYPES if not q.startswith(("q2_k_s", "iq3_", "iq2_", "iq1_"))]
)
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_tensors_read_back_exactly(export, arch, qtype, tiny_gemma2, tiny_gemma3):
    path, report = export(arch, qtype)
    ck = open_checkpoint({"gemma2": tiny_gemma2, "gemma3": tiny_gemma3}[arch])
    ts = tensors(path)
    plan = policy.plan_tensors(ck.config, qtype)
    assert list(ts) == [t.gguf_name for t in plan]
    assert "output.weight" not in ts
    assert len(ts) == 2 + ck.config.num_hidden_layers * (13 if arch == "gemma3" else 11)
    for t, entry in zip(plan, report["tensors"], strict=True):
        r = ts[t.gguf_name]
        assert (r.tensor_type, entry["type"]) == (t.qtype, t.qtype.name)
        assert [int(n) for n in r.shape] == list(reversed(t.shape))  # ne0 = in
        src = ck.get(t.hf_name, torch.float32)[: t.shape[0]].numpy()
        if t.is_norm:  # 1 + w in fp32
            assert r.tensor_type == QT.F32
            np.testing.assert_array_equal(values(r), src + np.float32(1))
        else:
            expected = dequantize_rows(quantize_rows(src, t.qtype), t.qtype)
            np.testing.assert_array_equal(values(r), expected, err_msg=t.gguf_name)
            assert entry["method"] == ("lossless" if np.array_equal(expected, src) else "requantized")
    assert report["file_size"] == path.stat().st_size


def test_tensor_names_follow_llamacpp(export):
    names = set(tensors(export("gemma3", "f32")[0]))
    for kind in ("attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
        assert f"blk.5.{kind}.weight" in names
    plan = {t.hf_name: t.gguf_name for t in policy.plan_tensors(synthetic_config("gemma3_text"), "f32")}
    assert plan["model.layers.0.pre_feedforward_layernorm.weight"] == "blk.0.ffn_norm.weight"
    assert plan["model.layers.0.post_attention_layernorm.weight"] == "blk.0.post_attention_norm.weight"
    assert plan["model.layers.0.post_feedforward_layernorm.weight"] == "blk.0.post_ffw_norm.weight"


# ------------------------------------------------------------------------------------------------ metadata


def test_gemma2_metadata(export):
    path, _ = export("gemma2", "q4_0")
    f = fields(path)
    expected = {
        "general.architecture": "gemma2",
        "general.type": "model",
        "general.file_type": 2,  # MOSTLY_Q4_0
        "general.quantization_version": 2,
        "gemma2.context_length": 8192,
        "gemma2.embedding_length": 256,
        "gemma2.block_count": 4,
        "gemma2.feed_forward_length": 512,
        "gemma2.attention.head_count": 4,
        "gemma2.attention.head_count_kv": 2,
        "gemma2.attention.key_length": 128,
        "gemma2.attention.value_length": 128,
        "gemma2.attention.sliding_window": 16,
        "gemma2.attn_logit_softcapping": 4.0,
        "gemma2.final_logit_softcapping": 6.0,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
    }
    assert {k: f.get(k) for k in expected} == expected
    assert f["gemma2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    assert not any(k.startswith("gemma2.rope") for k in f)  # llama.cpp's defaults are Gemma 2's


def test_gemma3_metadata(export):
    f = fields(export("gemma3", "q4_k_m")[0])
    expected = {
        "general.architecture": "gemma3",
        "general.file_type": 15,  # MOSTLY_Q4_K_M
        "gemma3.block_count": 6,
        "gemma3.attention.key_length": 128,
        "gemma3.attention.value_length": 128,
        "gemma3.attention.sliding_window": 16,
        "gemma3.rope.freq_base": 1e6,
        "gemma3.rope.freq_base_swa": 1e4,
        "gemma3.rope.scaling.type": "linear",
        "gemma3.rope.scaling.factor": 8.0,
        "tokenizer.ggml.add_space_prefix": False,
    }
    assert {k: f.get(k) for k in expected} == expected
    assert "gemma3.attn_logit_softcapping" not in f and "gemma3.final_logit_softcapping" not in f


@pytest.mark.parametrize(("qtype", "file_type"), [("f32", 0), ("f16", 1), ("bf16", 32), ("q8_0", 7), ("q6_k", 18)])
def test_file_type(export, qtype, file_type):
    assert fields(export("gemma2", qtype)[0])["general.file_type"] == file_type


def test_vocab_matches_sentencepiece(export, tiny_gemma2):
    f = fields(export("gemma2", "f32")[0])
    sp = Tokenizer(Path(tiny_gemma2) / "tokenizer.model").sp
    assert len(f["tokenizer.ggml.tokens"]) == len(f["tokenizer.ggml.scores"]) == 512
    assert f["tokenizer.ggml.tokens"] == [sp.IdToPiece(i) for i in range(512)]
    np.testing.assert_array_equal(f["tokenizer.ggml.scores"], [sp.GetScore(i) for i in range(512)])
    types = f["tokenizer.ggml.token_type"]
    assert types[:4] == [3, 3, 3, 2]  # <pad> <eos> <bos> CONTROL, <unk> UNKNOWN
    assert types[sp.PieceToId("<0x0A>")] == 6 and types[sp.PieceToId("\u2581the")] == 1


def test_vocab_padded_to_config_size(tmp_path, tiny_gemma2):
    ck = open_checkpoint(tiny_gemma2)
    bigger = dataclasses.replace(ck, config=dataclasses.replace(ck.config, vocab_size=520))
    vocab = build_vocab(bigger, {})
    assert len(vocab.tokens) == 520 and vocab.tokens[515] == "[PAD515]" and vocab.types[515] == 5


# --------------------------------------------------------------------------------------------- type choice


def synthetic_config(model_type: str, hidden: int = 256, ff: int = 512, layers: int = 6):
    return config_from_dict(
        {
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": ff,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "vocab_size": 1024,
        }
    )


def test_type_choice_with_row_fallbacks():
    cfg = synthetic_config("gemma3_text", hidden=640, ff=2048, layers=18)  # Gemma 3 270M shapes
    types = {t.gguf_name: t.qtype for t in policy.plan_tensors(cfg, "q4_k_m")}
    assert types["token_embd.weight"] == QT.Q8_0  # Q6_K, but 640 % 256 != 0
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == QT.Q5_0  # Q4_K fallback
    assert types["blk.0.attn_output.weight"] == QT.Q4_K  # in = 4 * 256
    assert types["blk.0.ffn_down.weight"] == QT.Q6_K and types["blk.3.ffn_down.weight"] == QT.Q4_K
    assert types["blk.0.attn_v.weight"] == QT.Q8_0 and types["blk.3.attn_v.weight"] == QT.Q5_0
    assert types["blk.0.attn_norm.weight"] == QT.F32
    q4_0 = {t.gguf_name: t.qtype for t in policy.plan_tensors(cfg, "q4_0")}
    assert q4_0["token_embd.weight"] == QT.Q8_0 and q4_0["blk.0.ffn_down.weight"] == QT.Q4_0
    q6_k = {t.gguf_name: t.qtype for t in policy.plan_tensors(cfg, "q6_k")}
    assert q6_k["blk.0.attn_q.weight"] == QT.Q8_0 and q6_k["blk.0.ffn_down.weight"] == QT.Q6_K


@pytest.mark.parametrize(
    ("qtype", "embd", "odd_row"),
    [
        ("f32", QT.F32, QT.F32),
        ("bf16", QT.BF16, QT.BF16),
        ("q8_0", QT.Q8_0, QT.F16),
        ("q4_0", QT.Q6_K, QT.F16),
        ("q5_0", QT.Q6_K, QT.F16),
        ("q4_k", QT.Q6_K, QT.F16),
        ("q4_k_m", QT.Q6_K, QT.F16),
    ],
)
def test_tied_embedding_type(qtype, embd, odd_row):
    """llama-quantize treats the tied token_embd as the output tensor."""
    assert policy.weight_type(qtype, "token_embd", None, 42, 3584) == embd
    assert policy.weight_type(qtype, "token_embd", None, 42, 100) == odd_row  # 32 does not divide 100


def test_unknown_type_and_unsupported_configs(tiny_gemma2, tmp_path):
    with pytest.raises(QuantkitError, match="not supported"):
        eg.export_gguf(tiny_gemma2, tmp_path / "x.gguf", "q3_k")
    cfg = open_checkpoint(tiny_gemma2).config
    with pytest.raises(QuantkitError, match="slides"):
        check_llamacpp_compatible(dataclasses.replace(cfg, layer_types=cfg.layer_types[::-1]))
    with pytest.raises(QuantkitError, match="query_pre_attn_scalar"):
        check_llamacpp_compatible(dataclasses.replace(cfg, query_pre_attn_scalar=144.0))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------- lossless artifacts


ARTIFACTS = {  # name -> (spec, scale dtype)
    "int4-g32-sym": (QuantSpec(4, 32, True), torch.float16),
    "int4-g128-sym": (QuantSpec(4, 128, True), torch.float16),
    "int8-g32-sym": (QuantSpec(8, 32, True), torch.float16),
    "int4-g32-asym": (QuantSpec(4, 32, False), torch.float16),
    "int4-g32-sym-bf16": (QuantSpec(4, 32, True), torch.bfloat16),  # bf16 scales of this size are fp16 values
    "int4-g32-sym-fp32": (QuantSpec(4, 32, True), torch.float32),  # fp32 scales are not: requantized
}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_gemma2):
    out, cache = tmp_path_factory.mktemp("artifacts"), {}

    def get(name: str) -> Checkpoint:
        if name not in cache:
            cache[name] = make_artifact(tiny_gemma2, out / name, *ARTIFACTS[name])
        return cache[name]

    return get


@pytest.mark.parametrize(
    ("name", "qtype", "lossless"),
    [
        ("int4-g32-sym", "q4_0", True),
        ("int4-g128-sym", "q4_0", True),
        ("int8-g32-sym", "q8_0", True),
        ("int4-g32-asym", "q4_1", True),
        ("int4-g32-sym", "q8_0", True),  # 4-bit codes fit Q8_0's grid
        ("int4-g32-sym", "q4_1", True),  # m = -8 d is exact
        ("int4-g32-asym", "q8_0", True),  # c - z in [-15, 15]
        ("int4-g32-sym-bf16", "q4_0", True),
        ("int4-g32-asym", "q4_0", False),  # Q4_0 has no zero point
        ("int8-g32-sym", "q4_0", False),
        ("int4-g32-sym-fp32", "q4_0", False),
        ("int4-g32-sym", "q4_k_m", False),
    ],
)
def test_quantized_artifact_into_blocks(artifact, tmp_path, name, qtype, lossless):
    ck = artifact(name)
    path = tmp_path / "a.gguf"
    report = eg.export_gguf(ck, path, qtype, progress=False)
    ts = tensors(path)
    linears = [e for e in report["tensors"] if e["hf_name"].removesuffix(".weight").endswith(LINEAR_NAMES)]
    assert len(linears) == 7 * ck.config.num_hidden_layers
    for e in linears:
        assert e["method"] == ("lossless" if lossless else "requantized"), e["name"]
        qw = ck.quantized_weight(e["hf_name"].removesuffix(".weight"))
        got, want = values(ts[e["name"]]), qw.dequantize(torch.float32).numpy()
        if not lossless:  # dequantized to fp32, then ggml's reference quantizer
            want = dequantize_rows(quantize_rows(want, ts[e["name"]].tensor_type), ts[e["name"]].tensor_type)
        if qtype == "q4_1" and not e["exact"]:
            assert np.all(np.abs(got - want) <= q4_1_bound(qw.scale, qw.zero, want)), e["name"]
        else:
            np.testing.assert_array_equal(got, want, err_msg=e["name"])
    assert report["counts"]["lossless" if lossless else "requantized"] >= len(linears)


def q4_1_bound(scale: torch.Tensor, zero: torch.Tensor, want: np.ndarray) -> np.ndarray:
    """Q4_1 stores m = fp16(-d * z): half an fp16 ulp of m, plus the fp32 rounding of d * u + m. [O, I]"""
    m = np.abs(scale.float().numpy() * (zero.numpy() + 8.0)).repeat(want.shape[1] // scale.shape[1], axis=1)
    half_ulp = np.where(m < 2.0**-14, 2.0**-25, 2.0 ** (np.floor(np.log2(np.maximum(m, 2.0**-14))) - 11))
    return half_ulp + np.abs(want) * 2.0**-23


# ------------------------------------------------------------------------------------------- streaming


def whole_tensor(ck: Checkpoint, t: policy.PlannedTensor) -> tuple[np.ndarray, str]:
    """The tensor read whole with ``Checkpoint.get`` and encoded in one piece (the path a quantized
    artifact's linears take): its bytes and its report method."""
    data, entry = encode_tensor(ck, t)
    return np.ascontiguousarray(data).view(np.uint8).reshape(-1), entry["method"]


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k_m", "q5_0", "f16", "bf16", "f32"])
def test_streamed_jobs_equal_whole_tensor_encoding(tiny_gemma3, tmp_path, monkeypatch, qtype):
    """Tensors cut into many row-range jobs (3-7 rows each) and encoded by 3 threads, out of order: every
    tensor's bytes equal encoding it whole, and dense tensors are read only as row ranges by the shard
    reader's positional reads, never whole through ``Checkpoint.get``."""
    ck = open_checkpoint(tiny_gemma3)
    monkeypatch.setattr(stream, "JOB_ELEMENTS", 1800)
    expected = {t.gguf_name: whole_tensor(ck, t) for t in policy.plan_tensors(ck.config, qtype)}
    jobs = list(stream.plan_jobs(ck, policy.plan_tensors(ck.config, qtype), stream.ShardReader(ck)))
    assert len(jobs) > 3 * len(expected)

    def no_whole_reads(*args, **kwargs):
        raise AssertionError("dense tensors must not go through Checkpoint.get")

    monkeypatch.setattr(Checkpoint, "get", no_whole_reads)
    report = eg.export_gguf(ck, tmp_path / "m.gguf", qtype, progress=False, workers=3)
    ts = tensors(tmp_path / "m.gguf")
    for name, (data, _) in expected.items():
        np.testing.assert_array_equal(ts[name].data.view(np.uint8).reshape(-1), data, err_msg=name)
    assert [e["method"] for e in report["tensors"]] == [m for _, m in expected.values()]
    if qtype in ("f32", "bf16"):  # bf16 weights: stored as they are
        assert {e["method"] for e in report["tensors"]} == {"lossless", "norm"}


def test_shard_reader_reads_rows_and_refuses_truncation(tiny_gemma2, tmp_path):
    ck = open_checkpoint(tiny_gemma2)
    reader = stream.ShardReader(ck)
    name = "model.layers.1.mlp.down_proj.weight"
    whole = ck.get(name)
    assert reader.rows(name, 0, whole.shape[0]).dtype == torch.bfloat16
    torch.testing.assert_close(reader.rows(name, 5, 9), whole[5:9], rtol=0, atol=0)
    norm = ck.get("model.norm.weight")  # 1-D: rows are elements
    torch.testing.assert_close(reader.rows("model.norm.weight", 3, 7), norm[3:7], rtol=0, atol=0)
    reader.close()
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in tiny_gemma2.iterdir():
        (cut / f.name).write_bytes(f.read_bytes())
    ck2 = open_checkpoint(cut)
    shard, key = ck2.locations[name]
    reader2 = stream.ShardReader(ck2)
    raw = reader2.locate(name)
    end = raw.offset + 2 * math.prod(raw.shape)
    with open(cut / shard, "r+b") as f:  # the header still promises the bytes: only reading finds out
        f.truncate(end - 10)
    with pytest.raises(QuantkitError, match="truncated"):
        reader2.rows(name, 0, raw.shape[0])
    reader2.close()


# ------------------------------------------------------------------------------------------- atomicity


def test_failed_export_leaves_no_file(tiny_gemma2, tmp_path, monkeypatch):
    dest = tmp_path / "model.gguf"
    real, calls = eg.encode_job, []

    def failing(ckpt, job, src, *rest):  # fails inside a worker thread, with later jobs already in flight
        calls.append(job.tensor.gguf_name)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(ckpt, job, src, *rest)

    monkeypatch.setattr(eg, "encode_job", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        eg.export_gguf(tiny_gemma2, dest, "q8_0", progress=False)
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    dest.write_bytes(b"previous")  # an existing file is replaced only by a complete one
    calls.clear()
    with pytest.raises(RuntimeError):
        eg.export_gguf(tiny_gemma2, dest, "q8_0", progress=False)
    assert dest.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [dest]


# -------------------------------------------------------------------------------------- llama.cpp itself


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_llamacpp_tokenizer_matches_sentencepiece(export, arch, tiny_gemma2, tiny_gemma3):
    llm = llamacpp_ppl().load_llama(export(arch, "q8_0")[0], n_ctx=128, n_threads=N_THREADS)
    tok = Tokenizer(Path({"gemma2": tiny_gemma2, "gemma3": tiny_gemma3}[arch]) / "tokenizer.model")
    assert llamacpp_ppl().tokenize(llm, SAMPLE) == tok.encode(SAMPLE)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_llamacpp_f32_matches_quantkit(export, arch, tiny_gemma2, tiny_gemma3, monkeypatch):
    """Same fp32 weights and an fp32 KV cache: what remains is llama.cpp's GELU, an fp16 lookup table, which
    quantkit's forward emulates here, and fp32 rounding. Measured max |dlogit| 7.8e-4 (gemma2, logits capped
    at 6) and 1.0e-3 (gemma3, |logits| up to 130), median 2.9e-6 / 1.1e-5; single spikes are an input that
    lands in a neighbouring fp16 bucket of the table. Exact GELU instead: max 2.2e-3 / 3.8e-3."""
    ck = open_checkpoint({"gemma2": tiny_gemma2, "gemma3": tiny_gemma3}[arch])
    ids = eval_ids(ck)
    ours_model = build_model(ck)
    monkeypatch.setattr(torch.nn.functional, "gelu", table_gelu(ggml_gelu_table()))
    ours = quantkit_logits(ours_model, ids)
    theirs = llama_logits(export(arch, "f32")[0], ids)
    d = np.abs(theirs - ours)
    assert d.max() < 3e-3 and np.median(d) < 5e-5, (d.max(), np.median(d))


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_llamacpp_quantized_matches_quantkit_on_gguf_weights(export, arch, qtype, tiny_gemma2, tiny_gemma3):
    """llama.cpp's CPU matmuls quantize activations to 8-bit blocks (Q8_0 for Q8_0/Q4_0 weights, Q8_K for the
    Q6_K token_embd), which this random model amplifies. Measured, llama.cpp vs
    quantkit on the dequantized GGUF weights: max |dlogit| 0.25 / 0.48 (gemma2 q8_0 / q4_0), 0.37 / 0.50
    (gemma3); mean 0.027 / 0.035 and 0.061 / 0.081. The mean distance to quantkit on the *original* weights
    is 1.5x (q8_0) and 7x (q4_0) larger, which shows llama.cpp runs the quantized weights we wrote."""
    ck = open_checkpoint({"gemma2": tiny_gemma2, "gemma3": tiny_gemma3}[arch])
    ids = eval_ids(ck)
    path = export(arch, qtype)[0]
    theirs = llama_logits(path, ids)
    d = np.abs(theirs - quantkit_logits(model_from_gguf(ck, path), ids))
    d_orig = np.abs(theirs - quantkit_logits(build_model(ck), ids))
    assert d.max() < 0.75 and d.mean() < 0.15, (d.max(), d.mean())
    assert d.mean() < {"q8_0": 0.8, "q4_0": 0.3}[qtype] * d_orig.mean(), (d.mean(), d_orig.mean())


def test_llamacpp_perplexity_matches_quantkit(export, tiny_gemma2):
    """scripts/llamacpp_ppl.py's recipe on llama.cpp's logits vs the same recipe on quantkit's forward, same
    tokens: measured |d mean NLL| 3e-7 (gemma2, F32 GGUF, fp32 KV cache)."""
    ppl = llamacpp_ppl()
    n_ctx, n_chunks = 64, 3
    llm = ppl.load_llama(export("gemma2", "f32")[0], n_ctx=n_ctx, n_threads=N_THREADS, kv_f32=True)
    tokens = ppl.tokenize(llm, ppl.read_text(TEST_TEXT))
    result = ppl.perplexity(llm, tokens, n_ctx, n_chunks)
    assert (result.n_chunks, result.n_scored) == (n_chunks, n_chunks * (n_ctx - 1 - n_ctx // 2))
    chunks = torch.tensor([tokens[k * n_ctx : (k + 1) * n_ctx] for k in range(n_chunks)])
    chunks[:, 0] = llm.token_bos()
    logits = quantkit_logits_batch(build_model(open_checkpoint(tiny_gemma2)), chunks)
    first = n_ctx // 2
    nll = np.concatenate(
        [ppl.token_nll(logits[k, first : n_ctx - 1], chunks[k, first + 1 :].numpy()) for k in range(n_chunks)]
    )
    assert abs(math.log(result.ppl) - nll.mean()) < 1e-4
    se = result.ppl * math.sqrt((np.mean(nll**2) - nll.mean() ** 2) / (len(nll) - 1))
    assert result.se == pytest.approx(se, rel=1e-3)


def quantkit_logits_batch(model: Gemma, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(ids).numpy()


def test_vocab_writer_packs_arrays_as_gguf_py_does(tmp_path: Path) -> None:
    """The one-pass array packing writes the same bytes as gguf-py's item-by-item packing: tokens with
    non-ASCII text, float scores, int types, and arrays it leaves to gguf-py (bools, a single item)."""
    rng = np.random.default_rng(0)
    alphabet = list("abcé漢<>▁ ")
    tokens = ["".join(rng.choice(alphabet, size=int(rng.integers(0, 9)))) for _ in range(5000)]
    scores, types = rng.normal(size=5000).tolist(), rng.integers(1, 7, 5000).tolist()

    def write(cls: type, path: Path) -> bytes:
        w = cls(path, "gemma2")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_array("test.bools", [True, False])
        w.add_array("test.one", [3])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        return path.read_bytes()

    assert write(VocabWriter, tmp_path / "ours.gguf") == write(gguf.GGUFWriter, tmp_path / "gguf_py.gguf")
