"""Export a Gemma 2 / Gemma 3 checkpoint (dense or pack-quantized) as a llama.cpp GGUF.

Metadata and tensor names follow llama.cpp's converter; the weight types follow llama-quantize:
one type for every 2-D weight, the tied ``token_embd`` as Q6_K in 4/5-bit files, the row-length
fallbacks (Q4_K -> Q5_0, Q6_K -> Q8_0, F16), or the Q4_K_M mix. Norms are stored F32 as 1 + w.

Quantized artifacts go into blocks losslessly where the block grid holds their integer grid: every
32-run of a group becomes one block with d = fp16(scale) and the codes copied, when the group size is a
multiple of 32 and every scale is an fp16 value. Q4_0 takes symmetric codes in [-8, 7]; Q8_0 any codes with
c - zero in [-128, 127]; Q4_1 any 4-bit codes, with m = fp16(-d * zero) its only rounding. Any other weight is
dequantized to fp32 and quantized with ggml's reference quantizer.

The file is written in two passes and streamed: tensor infos come from the config alone, then the tensor
data is cut into jobs of a few million weights (row ranges of one tensor). One thread reads the jobs' raw
bytes from the shards in file order (``os.preadv``: no memory map, so the page cache is not charged to the
process), a pool of one worker per core converts and encodes them, and the main thread writes finished
jobs in file order; a bounded number of jobs is in flight, so peak memory is a few hundred MB whatever the
model size. Reading, encoding and writing overlap. The file appears at ``out_path`` only when complete.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import sentencepiece as spm
import torch
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.blocks import (
    K_QUANTIZERS,
    TORCH_QUANTIZERS,
    NonFiniteError,
    dequantize_rows,
    q4_0_from_codes,
    q4_1_from_codes,
    q8_0_from_codes,
    quantize_rows,
    quantize_rows_torch,
    row_bytes,
)
from quantkit.formats.gguf.names import GGUF_ARCH, LAYERS_27B, SWA_PATTERN
from quantkit.formats.gguf.policy import FILE_TYPES, FLOAT_TYPES, PlannedTensor, plan_tensors
from quantkit.io.atomic import atomic_file
from quantkit.io.checkpoint import Checkpoint, open_checkpoint
from quantkit.io.config import SLIDING, ModelConfig
from quantkit.io.dtypes import ELEMENT_BYTES, FLOAT_NAMES, TORCH_DTYPES
from quantkit.io.tensorio import all_finite
from quantkit.quant.primitives import QuantizedWeight

CHUNK_ELEMENTS = 1 << 24  # rows quantized per step: bounds the fp32 temporaries to ~64 MB
JOB_ELEMENTS = 1 << 22  # weights per streamed job: 8 MB of bf16 in, 16 MB of fp32 while encoding
JOBS_PER_WORKER = 2  # jobs in flight per worker: one encoding, one read ahead


# ------------------------------------------------------------------------------------------- metadata


def check_llamacpp_compatible(cfg: ModelConfig) -> None:
    """Refuse configs llama.cpp would silently run differently: it derives the attention scale and the
    sliding pattern from the architecture, and always soft-caps Gemma 2."""
    p = SWA_PATTERN[cfg.model_type]
    expected = tuple(SLIDING if i % p < p - 1 else "full_attention" for i in range(cfg.num_hidden_layers))
    if cfg.layer_types != expected:
        raise QuantkitError(
            f"llama.cpp assumes {cfg.model_type} layer i slides iff i % {p} < {p - 1}; this config's "
            "layer_types differ, so a GGUF would not run as this model"
        )
    big = cfg.num_hidden_layers == LAYERS_27B[cfg.model_type]
    scalar = cfg.hidden_size // cfg.num_attention_heads if big else cfg.head_dim
    if cfg.query_pre_attn_scalar != scalar:
        raise QuantkitError(
            f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} differs from the {scalar} llama.cpp derives "
            "for this layer count; the attention scale cannot be stored in a GGUF"
        )
    if cfg.model_type == "gemma2" and None in (cfg.attn_logit_softcapping, cfg.final_logit_softcapping):
        raise QuantkitError("llama.cpp always soft-caps gemma2; a config without soft-caps cannot be exported")
    if cfg.model_type == "gemma3_text" and cfg.attn_logit_softcapping is not None:
        raise QuantkitError("llama.cpp's gemma3 has no attention soft-cap; this config sets one")


def add_model_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, name: str, file_type: FT) -> None:
    """general.* and the architecture keys, as convert_hf_to_gguf.py writes them."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    if cfg.model_type == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        return
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_freq_base_swa(cfg.rope_local_base_freq)
    if cfg.rope_scaling_factor != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling_factor)
    if cfg.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)


# ----------------------------------------------------------------------------------------------- vocab

TT = gguf.TokenType


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]  # gguf.TokenType values
    special: dict[str, int]  # bos / eos / unk / pad -> id


def _looks_special(text: str) -> bool:
    """The converter's list of added tokens that are control tokens even when not flagged special."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _piece_type(sp: spm.SentencePieceProcessor, i: int) -> int:
    if sp.IsUnknown(i):
        return TT.UNKNOWN
    if sp.IsControl(i):
        return TT.CONTROL
    if sp.IsUnused(i):
        return TT.UNUSED
    return TT.BYTE if sp.IsByte(i) else TT.NORMAL


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def build_vocab(ckpt: Checkpoint, tok_config: dict[str, Any]) -> Vocab:
    """tokens / scores / types of length vocab_size as ``_create_vocab_sentencepiece`` builds them."""
    sp = spm.SentencePieceProcessor()
    sp.Load(str(ckpt.tokenizer_path))
    v = ckpt.config.vocab_size
    tokens, scores, types = [f"[PAD{i}]" for i in range(v)], [-10000.0] * v, [int(TT.UNUSED)] * v
    for i in range(min(v, sp.GetPieceSize())):
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), int(_piece_type(sp, i))
    added = ckpt.path / "added_tokens.json"
    for text, i in (json.loads(added.read_text()) if added.is_file() else {}).items():
        if i < v:
            tokens[i], scores[i], types[i] = text, -1000.0, int(TT.USER_DEFINED)
    for key, data in tok_config.get("added_tokens_decoder", {}).items():
        i, text = int(key), data["content"]
        if i >= v:
            continue
        if data.get("special") or _looks_special(text):
            types[i] = int(TT.CONTROL)
        else:  # llama.cpp matches user-defined tokens in raw text
            text, types[i] = text.replace("\u2581", " "), int(TT.USER_DEFINED)
        tokens[i], scores[i] = text, -1000.0
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}
    cfg = ckpt.config
    fallback = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "unk": sp.unk_id(), "pad": cfg.pad_token_id}
    special = {}
    for role, default in fallback.items():
        i = ids.get(_token_text(tok_config.get(f"{role}_token")), default)
        if i is not None and 0 <= i < v:
            special[role] = i
    return Vocab(tokens, scores, types, special)


class VocabWriter(gguf.GGUFWriter):
    """gguf-py's writer, with long uniform arrays (the vocabulary's 256K tokens, scores and types) packed in
    one pass: its generic packing goes item by item, ~3 s for Gemma's vocabulary, before any tensor data
    can be written. Anything else, and any array that is not all str, all float or all int, goes through
    gguf-py unchanged; a test checks the bytes against gguf-py's own packing."""

    def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
        packed = None
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is None and self.endianess == gguf.GGUFEndian.LITTLE:
            packed = _pack_uniform_array(val)
        if packed is None:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        return (struct.pack("<I", vtype) if add_vtype else b"") + packed


def _pack_uniform_array(val: Any) -> bytes | None:
    """Little-endian GGUF array payload (item type, count, items) of a list of str, float or int (the item
    types gguf-py infers for them: STRING, FLOAT32, INT32); None for anything else."""
    if not isinstance(val, list) or len(val) < 2:
        return None
    kind = type(val[0])
    if kind not in (str, float, int) or not all(type(v) is kind for v in val):
        return None
    head = struct.pack("<Q", len(val))
    if kind is str:
        items = [v.encode("utf-8") for v in val]
        lengths = np.array([len(b) for b in items], dtype="<u8").tobytes()
        body = b"".join(lengths[8 * i : 8 * i + 8] + b for i, b in enumerate(items))
        return struct.pack("<I", gguf.GGUFValueType.STRING) + head + body
    if kind is float:
        return struct.pack("<I", gguf.GGUFValueType.FLOAT32) + head + np.asarray(val, dtype="<f4").tobytes()
    if not all(-(2**31) <= v < 2**31 for v in val):
        return None
    return struct.pack("<I", gguf.GGUFValueType.INT32) + head + np.asarray(val, dtype="<i4").tobytes()


def add_tokenizer_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint) -> None:
    """SentencePiece vocab ("llama"), special ids, BOS/EOS flags, no space prefix."""
    path = ckpt.path / "tokenizer_config.json"
    tok_config = json.loads(path.read_text()) if path.is_file() else {}
    vocab = build_vocab(ckpt, tok_config)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id}
    for role, i in vocab.special.items():
        (adders.get(role) or w.add_pad_token_id)(i)
    w.add_add_bos_token(bool(tok_config.get("add_bos_token", True)))
    w.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))
    template = tok_config.get("chat_template")
    jinja = ckpt.path / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    if template:
        w.add_chat_template(template)
    w.add_add_space_prefix(False)


# --------------------------------------------------------------------------------------------- tensors


def _fp16_exact(scale: torch.Tensor) -> bool:
    return bool((scale.to(torch.float16).to(scale.dtype) == scale).all())


def blocks_from_codes(qw: QuantizedWeight, qtype: QT) -> np.ndarray | None:
    """``qw``'s codes and scales written straight into ``qtype`` blocks, uint8 [O, row_bytes]; None when
    the blocks cannot hold them exactly (group not a multiple of 32, scale not fp16, codes out of range)."""
    i = qw.shape[1]
    g = i // qw.scale.shape[1]  # group size
    if g % 32 or not _fp16_exact(qw.scale) or qtype not in (QT.Q4_0, QT.Q8_0, QT.Q4_1):
        return None
    runs = g // 32
    scale = qw.scale.float().numpy().repeat(runs, axis=1)  # [O, I/32]
    codes = qw.codes.numpy().astype(np.int16)  # [O, I]
    zero = None if qw.zero is None else qw.zero.numpy().astype(np.int16).repeat(runs, axis=1)
    if qtype == QT.Q4_0 and zero is None and codes.min() >= -8 and codes.max() <= 7:
        return q4_0_from_codes(codes, scale)
    if qtype == QT.Q8_0:
        values = codes if zero is None else codes - zero.repeat(32, axis=1)
        if values.min() >= -128 and values.max() <= 127:
            return q8_0_from_codes(values, scale)
    if qtype == QT.Q4_1 and codes.min() >= -8 and codes.max() <= 7:
        z = np.full_like(scale, 8.0) if zero is None else zero + 8  # unsigned zero of u = c + 8
        return q4_1_from_codes(codes + 8, scale, z)
    return None


def quantize_weight(w: np.ndarray, qtype: QT) -> tuple[np.ndarray, bool]:
    """float32 [O, I] -> (uint8 [O, row_bytes], whether it dequantizes to exactly ``w``), in row chunks."""
    o, i = w.shape
    out = np.empty((o, row_bytes(qtype, i)), dtype=np.uint8)
    exact = qtype in FLOAT_TYPES
    step = max(1, CHUNK_ELEMENTS // i)
    for r in range(0, o, step):
        x = np.ascontiguousarray(w[r : r + step], dtype=np.float32)
        out[r : r + step] = quantize_rows(x, qtype)
        if exact and qtype != QT.F32:
            exact = bool(np.array_equal(dequantize_rows(out[r : r + step], qtype), x))
    return out, exact


def encode_tensor(ckpt: Checkpoint, t: PlannedTensor) -> tuple[np.ndarray, dict[str, Any]]:
    """The bytes of one planned tensor and its report entry."""
    entry: dict[str, Any] = {"name": t.gguf_name, "hf_name": t.hf_name, "type": t.qtype.name}
    if t.is_norm:  # 1 + w in fp32, stored F32
        data = (ckpt.get(t.hf_name, torch.float32, check_finite=True) + 1.0).numpy()
        return data.view(np.uint8), entry | {"method": "norm", "exact": True}
    module = t.hf_name.removesuffix(".weight")
    if ckpt.has_blocks(module):  # GPTQ wrote this tensor's blocks: copied when the planned type is theirs
        qtype, blocks = ckpt.blocks(module)
        if qtype == t.qtype:
            return blocks, entry | {"method": "lossless", "exact": True}
        w = dequantize_rows(blocks, qtype)
    elif ckpt.quant_spec is not None and ckpt.is_linear_quantized(module):
        qw = ckpt.quantized_weight(module)
        blocks = blocks_from_codes(qw, t.qtype)
        if blocks is not None:
            exact = t.qtype != QT.Q4_1 or _q4_1_exact(qw)
            return blocks, entry | {"method": "lossless", "exact": exact}
        w = qw.dequantize(torch.float32).numpy()
    else:
        w = ckpt.get(t.hf_name, torch.float32, check_finite=True)[: t.shape[0]].numpy()  # drop embedding padding rows
    data, exact = quantize_weight(w, t.qtype)
    return data, entry | {"method": "lossless" if exact else "requantized", "exact": exact}


def _q4_1_exact(qw: QuantizedWeight) -> bool:
    """Whether every Q4_1 m = -d * zero is an fp16 value (then the blocks dequantize exactly)."""
    z = 8.0 if qw.zero is None else qw.zero.numpy().astype(np.float32) + 8
    m = -(qw.scale.float().numpy() * z)
    return bool(np.array_equal(m.astype(np.float16).astype(np.float32), m))


# ----------------------------------------------------------------------------------------- streaming


@dataclass(frozen=True)
class RawTensor:
    """Where one tensor's bytes lie: shard file, absolute offset of element 0, dtype, shape."""

    path: Path
    offset: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Job:
    """Rows [start, stop) of one planned tensor (all rows for norms and quantized artifacts)."""

    tensor: PlannedTensor
    start: int
    stop: int

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.tensor.shape[0]


class ShardReader:
    """Reads row ranges of dense tensors straight from their safetensors shards with positioned reads
    (thread-safe: no shared file position), without safetensors' memory maps."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._fds: dict[str, int] = {}
        self._data_start: dict[str, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _open(self, shard: str) -> int:
        if shard not in self._fds:  # opened from the main thread (plan_jobs) before any worker runs
            fd = os.open(self.ckpt.path / shard, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):  # jobs read each shard front to back: ask for deep read-ahead
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            self._fds[shard], self._data_start[shard] = fd, 8 + n
        return self._fds[shard]

    def locate(self, name: str) -> RawTensor:
        shard, key = self.ckpt.locations[name]
        self._open(shard)
        info = self.ckpt.headers[shard][key]
        if info["dtype"] not in FLOAT_NAMES:
            raise QuantkitError(
                f"{self.ckpt.path / shard}: tensor {name!r} has dtype {info['dtype']}, not F32/F16/BF16"
            )
        start = self._data_start[shard] + info["data_offsets"][0]
        return RawTensor(self.ckpt.path / shard, start, info["dtype"], tuple(info["shape"]))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a dense tensor in its stored dtype, [stop - start, row_len] (1-D: elements)."""
        raw = self.locate(name)
        dtype, size = TORCH_DTYPES[raw.dtype], ELEMENT_BYTES[raw.dtype]
        row = int(np.prod(raw.shape[1:], dtype=np.int64))
        buf = torch.empty((stop - start) * row, dtype=dtype)
        view = memoryview(buf.view(torch.uint8).numpy())
        fd, offset, done = self._fds[self.ckpt.locations[name][0]], raw.offset + start * row * size, 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise QuantkitError(f"{raw.path}: truncated while reading {name!r}")
            done += n
        return buf.view(stop - start, row) if len(raw.shape) > 1 else buf


def _dense(ckpt: Checkpoint, t: PlannedTensor) -> bool:
    """Whether ``t`` is read raw from the shards (everything but the linears of a quantized artifact)."""
    module = t.hf_name.removesuffix(".weight")
    if ckpt.has_blocks(module):
        return False
    return t.is_norm or ckpt.quant_spec is None or not ckpt.is_linear_quantized(module)


def plan_jobs(ckpt: Checkpoint, plan: list[PlannedTensor], reader: ShardReader) -> Iterator[Job]:
    """Row-range jobs in file order: ~JOB_ELEMENTS weights each for dense 2-D weights, else one per tensor."""
    for t in plan:
        if t.is_norm or not _dense(ckpt, t):
            yield Job(t, 0, t.shape[0])
            continue
        reader.locate(t.hf_name)  # opens the shard from this (the main) thread
        step = max(1, JOB_ELEMENTS // t.shape[1])
        for start in range(0, t.shape[0], step):
            yield Job(t, start, min(start + step, t.shape[0]))


def encode_rows(src: torch.Tensor, qtype: QT) -> tuple[np.ndarray, bool]:
    """Rows [R, n] in any float dtype -> (uint8 [R, row_bytes], whether they decode to exactly ``src``)."""
    same = {QT.BF16: torch.bfloat16, QT.F16: torch.float16, QT.F32: torch.float32}
    if same.get(qtype) == src.dtype:  # bf16 -> BF16 etc.: the stored bytes as they are
        return src.view(torch.uint8).numpy(), True
    if qtype in TORCH_QUANTIZERS or qtype in K_QUANTIZERS:  # converted to float32 chunk by chunk
        return quantize_rows_torch(src, qtype).numpy(), False
    x = src.float()
    if qtype in same:
        y = x.to(same[qtype])
        return y.view(torch.uint8).numpy(), bool(torch.equal(y.float(), x))
    return quantize_rows(x.numpy(), qtype), False


def read_job(ckpt: Checkpoint, reader: ShardReader, job: Job) -> torch.Tensor | None:
    """A dense job's rows as stored (None for a quantized artifact's linear, which encode_job reads)."""
    return reader.rows(job.tensor.hf_name, job.start, job.stop) if _dense(ckpt, job.tensor) else None


def encode_job(ckpt: Checkpoint, job: Job, src: torch.Tensor | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The bytes of one job (``src``: its rows from read_job) and the facts its tensor's report entry needs
    (method, exact)."""
    t = job.tensor
    bad = QuantkitError(f"{ckpt.path}: tensor {t.hf_name!r} contains NaN or inf values")
    # these quantizers see NaN/inf themselves
    checked = (t.qtype in TORCH_QUANTIZERS or t.qtype in K_QUANTIZERS) and not t.is_norm
    if src is not None and not checked and not all_finite(src):
        raise bad
    if src is None:
        data, entry = encode_tensor(ckpt, t)
        return data, {"method": entry["method"], "exact": entry["exact"]}
    if t.is_norm:  # 1 + w in fp32, stored F32
        return (src.float() + 1.0).numpy().view(np.uint8), {"method": "norm", "exact": True}
    try:
        data, exact = encode_rows(src, t.qtype)
    except NonFiniteError:
        raise bad from None
    return data, {"method": "lossless" if exact else "requantized", "exact": exact}


def default_workers() -> int:
    """One encoding worker per usable core (reads run on their own thread)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Each worker runs single-threaded torch ops: the pool is the parallelism (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _in_order(jobs: Iterator[Job], submit: Any, depth: int) -> Iterator[tuple[Job, tuple[np.ndarray, dict]]]:
    """Results of submit(job) (a Future) in job order, with at most ``depth`` jobs submitted ahead."""
    pending: deque[tuple[Job, Future]] = deque()
    try:
        for job in jobs:
            pending.append((job, submit(job)))
            if len(pending) >= depth:
                head, fut = pending.popleft()
                yield head, fut.result()
        while pending:
            head, fut = pending.popleft()
            yield head, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()


def write_tensor_data(
    ckpt: Checkpoint, plan: list[PlannedTensor], fout: Any, align: int, workers: int, bar: Any
) -> list[dict[str, Any]]:
    """Encode every planned tensor and write its bytes (each padded to ``align``) to ``fout``, in order."""
    entries: list[dict[str, Any]] = []
    reader = ShardReader(ckpt)
    exact = True
    try:
        # OpenMP's thread count is per thread: each worker sets its own
        one = functools.partial(torch.set_num_threads, 1)
        with (
            _torch_threads(1),
            ThreadPoolExecutor(1, thread_name_prefix="gguf-read") as reads,
            ThreadPoolExecutor(workers, thread_name_prefix="gguf", initializer=one) as pool,
        ):

            def submit(job: Job) -> Future:
                """One thread reads the jobs in file order (sequential I/O, ahead of the encoders)."""
                rows = reads.submit(read_job, ckpt, reader, job)
                return pool.submit(lambda: encode_job(ckpt, job, rows.result()))

            results = _in_order(plan_jobs(ckpt, plan, reader), submit, workers * JOBS_PER_WORKER)
            for job, (data, facts) in results:
                t = job.tensor
                if job.first:
                    fout.write(bytes(-fout.tell() % align))
                    exact = True
                fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                exact = exact and facts["exact"]
                bar.update(data.nbytes)
                if job.last:  # a dense weight is lossless when every one of its jobs was
                    method = facts["method"]
                    if method != "norm" and _dense(ckpt, t):
                        method = "lossless" if exact else "requantized"
                    entry = {"name": t.gguf_name, "hf_name": t.hf_name, "type": t.qtype.name}
                    entries.append(entry | {"method": method, "exact": exact})
        fout.write(bytes(-fout.tell() % align))
    finally:
        reader.close()
    return entries


# -------------------------------------------------------------------------------------------- export


def export_gguf(
    src: Checkpoint | str | Path, out_path: str | Path, qtype: str, *, progress: bool = True, workers: int = 0
) -> dict:
    """Write ``src`` as a ``qtype`` GGUF at ``out_path`` (atomically) and return a report dict.
    ``workers``: encoding threads (0: one per usable core)."""
    start = time.perf_counter()
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src)
    cfg, out_path = ckpt.config, Path(out_path)
    check_llamacpp_compatible(cfg)
    plan = plan_tensors(cfg, qtype)
    with atomic_file(out_path) as tmp:
        writer = VocabWriter(tmp, GGUF_ARCH[cfg.model_type])
        try:
            add_model_metadata(writer, cfg, ckpt.path.name, FILE_TYPES[qtype][1])
            add_tokenizer_metadata(writer, ckpt)
            for t in plan:
                writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            fout = writer.fout[0]
            with _progress(sum(t.nbytes for t in plan), progress) as bar:
                entries = write_tensor_data(ckpt, plan, fout, writer.data_alignment, workers or default_workers(), bar)
        finally:
            writer.close()
    return _report(ckpt, out_path, qtype, plan, entries, time.perf_counter() - start)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="Writing GGUF", disable=not enabled)


def _report(
    ckpt: Checkpoint, path: Path, qtype: str, plan: list[PlannedTensor], entries: list[dict], seconds: float
) -> dict[str, Any]:
    counts = {m: sum(e["method"] == m for e in entries) for m in ("lossless", "requantized", "norm")}
    types: dict[str, int] = {}
    for t in plan:
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    n_params = sum(int(np.prod(t.shape)) for t in plan)
    spec = ckpt.quant_spec
    return {
        "path": str(path),
        "qtype": qtype,
        "file_type": int(FILE_TYPES[qtype][1]),
        "arch": GGUF_ARCH[ckpt.config.model_type],
        "source": "dense" if spec is None else f"int{spec.bits} g{spec.group_size} {'sym' if spec.sym else 'asym'}",
        "file_size": path.stat().st_size,
        "n_params": n_params,
        "bits_per_weight": 8 * sum(t.nbytes for t in plan) / n_params,
        "counts": counts,
        "types": types,
        "seconds": seconds,
        "tensors": entries,
    }
