"""Import a Gemma 2 / Gemma 3 GGUF as a Hugging Face checkpoint directory.

The output directory holds:
- ``config.json``: ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` in the transformers 4.x flat key style plus
  an explicit ``layer_types`` list (read by 4.x and 5.x alike);
- ``model.safetensors``: float32, HF tensor names, every tensor = ``gguf.quants.dequantize`` of the GGUF data,
  norm weights with the GGUF +1 removed in float32. Written one tensor at a time, so peak memory is
  about one dequantized tensor, not the whole model;
- ``tokenizer.model``: a SentencePiece BPE ModelProto rebuilt from ``tokenizer.ggml.*``, plus
  ``tokenizer_config.json`` and ``generation_config.json``.

Hyper-parameters missing from the GGUF take llama.cpp's defaults for that architecture, so the HF model means
what llama.cpp would run. Attention scale: llama.cpp derives it from the layer count, and so do we:
query_pre_attn_scalar = hidden_size // head_count for the 27B models (46-layer gemma2, 62-layer gemma3),
head_dim (= key_length) for every other model.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats.gguf.names import GLOBAL_TENSORS, LAYER_TENSORS
from quantkit.io.atomic import ARTIFACT_MARKER, atomic_dir, check_location
from quantkit.io.checkpoint import expected_shapes
from quantkit.io.config import config_from_dict

K = gguf.Keys


@dataclass(frozen=True)
class _Arch:
    hf_class: str
    model_type: str
    swa_pattern: int  # llama.cpp set_swa_pattern: layer i is sliding iff i % P < P - 1
    sliding_window: int | None  # default when the key is missing (None: the key is required)
    attn_softcap: float | None  # defaults when the soft-cap keys are missing
    final_softcap: float | None
    layers_27b: int  # llama.cpp scales attention by (H / nH)^-0.5 for this layer count


_ARCHS = {
    "gemma2": _Arch("Gemma2ForCausalLM", "gemma2", 2, 4096, 50.0, 30.0, 46),
    "gemma3": _Arch("Gemma3ForCausalLM", "gemma3_text", 6, None, None, None, 62),
}
_ROPE_FREQ_BASE = 10000.0  # llama.cpp default for rope.freq_base and Gemma 3's rope.freq_base_swa

# GGUF tensor names -> HF names: quantkit.formats.gguf.names read right to left.
_GLOBAL_TENSORS = {g: hf for hf, g in GLOBAL_TENSORS.items()}
_LAYER_TENSORS = {g: hf for hf, g in LAYER_TENSORS.items()}
_VOCAB_ARRAYS = (K.Tokenizer.LIST, K.Tokenizer.SCORES, K.Tokenizer.TOKEN_TYPE, K.Tokenizer.MERGES)


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Write the HF checkpoint for a gemma2/gemma3 GGUF to ``out_dir`` (atomically) and return ``out_dir``.

    Raises QuantkitError (one line, naming the file) for a file that is not GGUF, another architecture, a
    non-SentencePiece vocab, missing or mis-shaped tensors, or an untied ``output.weight``."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    _arch(meta, str(gguf_path))  # fail fast on a non-Gemma file
    vocab = read_vocab(reader, str(gguf_path))
    config = build_config(meta, len(vocab.pieces), str(gguf_path))
    plan = _plan_tensors(reader, config, str(gguf_path))
    need = sum(4 * int(np.prod(t.shape, dtype=np.int64)) for t in plan) + 64 * len(vocab.pieces) + (1 << 20)
    check_location(out_dir.resolve(), str(out_dir), need)
    with atomic_dir(out_dir) as tmp:
        _write_safetensors(tmp / "model.safetensors", plan, progress, str(gguf_path))
        (tmp / "tokenizer.model").write_bytes(sentencepiece_model_bytes(vocab))
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(vocab, meta))
        _write_json(tmp / "generation_config.json", _generation_config(vocab))
        _write_json(tmp / ARTIFACT_MARKER, {"quantkit_version": __version__, "source": str(gguf_path)})
    return out_dir


def open_gguf(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise QuantkitError(f"{path}: not found" + (" (a directory, not a GGUF file)" if path.is_dir() else ""))
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError, IndexError, KeyError) as e:
        raise QuantkitError(f"{path}: not a readable GGUF file ({_one_line(e)})") from e


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every KV pair except the vocab arrays, as Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if k not in _VOCAB_ARRAYS}


# --- config.json ----------------------------------------------------------------------------------------


def _arch(meta: dict[str, Any], source: str) -> tuple[str, _Arch]:
    name = meta.get(K.General.ARCHITECTURE)
    if name not in _ARCHS:
        raise QuantkitError(f"{source}: architecture {name!r} is not supported (expected gemma2 or gemma3)")
    return name, _ARCHS[name]


def build_config(meta: dict[str, Any], vocab_size: int, source: str) -> dict[str, Any]:
    """HF config for the GGUF metadata ``meta`` (the architecture keys llama.cpp's converter writes)."""
    arch_name, arch = _arch(meta, source)

    def get(key: str, default: Any = ...) -> Any:
        key = key.format(arch=arch_name)
        if key not in meta and default is ...:
            raise QuantkitError(f"{source}: GGUF key {key!r} is missing")
        value = meta.get(key, default)
        if isinstance(value, list) and key != K.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch_name):
            raise QuantkitError(f"{source}: GGUF key {key!r} is a per-layer array; only scalars are supported")
        return value

    def count(key: str, default: Any = ...) -> int:
        """A positive integer value (llama.cpp reads these as uint32)."""
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise QuantkitError(
                f"{source}: GGUF key {key.format(arch=arch_name)!r} is {value!r}, not a positive integer"
            )
        return int(value)

    def number(key: str, default: Any = ...) -> Any:
        value = get(key, default)
        if value is not None and (isinstance(value, (bool, str)) or not np.isfinite(float(value))):
            raise QuantkitError(f"{source}: GGUF key {key.format(arch=arch_name)!r} is {value!r}, not a finite number")
        return value

    n_layer, hidden = count(K.LLM.BLOCK_COUNT), count(K.LLM.EMBEDDING_LENGTH)
    n_head = count(K.Attention.HEAD_COUNT)
    head_dim = count(K.Attention.KEY_LENGTH, max(hidden // n_head, 1))
    if count(K.Attention.VALUE_LENGTH, head_dim) != head_dim:
        raise QuantkitError(f"{source}: attention.value_length differs from key_length; HF Gemma needs them equal")
    is_swa = _sliding_layers(get(K.Attention.SLIDING_WINDOW_PATTERN, arch.swa_pattern), n_layer, source)
    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": count(K.LLM.FEED_FORWARD_LENGTH),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": count(K.Attention.HEAD_COUNT_KV, n_head),
        "head_dim": head_dim,
        "query_pre_attn_scalar": hidden // n_head if n_layer == arch.layers_27b else head_dim,
        "max_position_embeddings": count(K.LLM.CONTEXT_LENGTH),
        "rms_norm_eps": _f32(number(K.Attention.LAYERNORM_RMS_EPS)),
        "rope_theta": _f32(number(K.Rope.FREQ_BASE, _ROPE_FREQ_BASE)),
        "sliding_window": count(K.Attention.SLIDING_WINDOW, arch.sliding_window),
        "layer_types": ["sliding_attention" if swa else "full_attention" for swa in is_swa],
        "attn_logit_softcapping": _f32_or_none(number(K.LLM.ATTN_LOGIT_SOFTCAPPING, arch.attn_softcap)),
        "final_logit_softcapping": _f32_or_none(number(K.LLM.FINAL_LOGIT_SOFTCAPPING, arch.final_softcap)),
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": _opt_int(meta.get(K.Tokenizer.BOS_ID)),
        "eos_token_id": _opt_int(meta.get(K.Tokenizer.EOS_ID)),
        "pad_token_id": _opt_int(meta.get(K.Tokenizer.PAD_ID)),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if arch_name == "gemma3":
        pattern = get(K.Attention.SLIDING_WINDOW_PATTERN, arch.swa_pattern)
        config["rope_local_base_freq"] = _f32(number(K.Rope.FREQ_BASE_SWA, _ROPE_FREQ_BASE))
        scaling = get(K.Rope.SCALING_TYPE, None), get(K.Rope.SCALING_FACTOR, None)
        config["rope_scaling"] = _rope_scaling(*scaling, source)
        if isinstance(pattern, int):
            config["sliding_window_pattern"] = pattern
    elif meta.get(K.Rope.SCALING_TYPE.format(arch=arch_name)) not in (None, "none"):
        raise QuantkitError(f"{source}: RoPE scaling is not supported for gemma2")
    config_from_dict(config, source)  # the values quantkit's reader will check
    return config


def _sliding_layers(pattern: int | list[bool], n_layer: int, source: str) -> list[bool]:
    """Per-layer sliding flags from llama.cpp's pattern: an int P (0 = all sliding) or a bool per layer."""
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise QuantkitError(f"{source}: sliding_window_pattern has {len(pattern)} entries for {n_layer} layers")
        return [bool(x) for x in pattern]
    if isinstance(pattern, bool) or not isinstance(pattern, (int, np.integer)) or pattern < 0:
        raise QuantkitError(f"{source}: sliding_window_pattern is {pattern!r}, not a non-negative integer")
    p = int(pattern)
    return [p == 0 or i % p < p - 1 for i in range(n_layer)]


def _rope_scaling(kind: str | None, factor: float | None, source: str) -> dict[str, Any] | None:
    if kind in (None, "none"):
        return None
    if kind != "linear" or factor is None:
        raise QuantkitError(f"{source}: RoPE scaling {kind!r} (factor {factor}) is not supported, only linear")
    return {"rope_type": "linear", "factor": _f32(factor)}


def _f32(x: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-06, not 9.999999974752427e-07)."""
    return float(str(np.float32(x)))


def _f32_or_none(x: float | None) -> float | None:
    return None if x is None else _f32(x)


def _opt_int(x: int | None) -> int | None:
    return None if x is None else int(x)


# --- model.safetensors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    hf_name: str
    shape: tuple[int, ...]  # HF (numpy) shape: GGUF dims reversed
    source: gguf.ReaderTensor


def hf_tensor_name(gguf_name: str) -> str | None:
    """``blk.3.ffn_norm.weight`` -> ``model.layers.3.pre_feedforward_layernorm.weight``; None if unknown."""
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[1] == "weight" and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.weight"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        if parts[2] in _LAYER_TENSORS:
            return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.weight"
    return None


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> [out, in] shape for ``config``."""
    cfg = config_from_dict(config)
    return {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), **expected_shapes(cfg)}


def _plan_tensors(reader: gguf.GGUFReader, config: dict[str, Any], source: str) -> list[_Tensor]:
    """Map and shape-check every GGUF tensor; a tied ``output.weight`` copy is dropped."""
    expected = _expected_shapes(config)
    by_name = {t.name: t for t in reader.tensors}
    plan = []
    for t in reader.tensors:
        if t.name == "output.weight":
            _check_tied(t, by_name.get("token_embd.weight"), source)
            continue
        name = hf_tensor_name(t.name)
        if name not in expected:
            raise QuantkitError(f"{source}: unexpected tensor {t.name!r} for {config['architectures'][0]}")
        shape = tuple(int(n) for n in reversed(t.shape))
        if shape != expected[name]:
            raise QuantkitError(f"{source}: tensor {t.name!r} has shape {shape}, config implies {expected[name]}")
        try:
            gguf.quants.dequantize(t.data[:1], t.tensor_type)  # probe one row: is the type supported?
        except NotImplementedError as e:
            raise QuantkitError(f"{source}: gguf-py cannot dequantize {t.name!r} ({t.tensor_type.name})") from e
        plan.append(_Tensor(name, shape, t))
    missing = sorted(expected.keys() - {p.hf_name for p in plan})
    if missing:
        raise QuantkitError(f"{source}: {len(missing)} tensors missing, e.g. {missing[0]!r}")
    return plan


def _check_tied(output: gguf.ReaderTensor, embed: gguf.ReaderTensor | None, source: str) -> None:
    """HF Gemma ties the head to the embedding: accept output.weight only if it equals token_embd."""
    if embed is None or not np.array_equal(_dequantize(output), _dequantize(embed)):
        raise QuantkitError(f"{source}: output.weight differs from token_embd.weight (untied head), not supported")


def _dequantize(t: gguf.ReaderTensor) -> np.ndarray:
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    return values.reshape(tuple(int(n) for n in reversed(t.shape)))


def _hf_values(t: _Tensor) -> np.ndarray:
    """float32 HF value of one planned tensor: dequantized, minus 1 for norms (GGUF stores 1 + w)."""
    values = _dequantize(t.source).astype(np.float32, copy=False)
    if t.hf_name.endswith("norm.weight"):
        values = values - np.float32(1.0)
    return values


def _write_safetensors(path: Path, plan: list[_Tensor], progress: bool, source: str = "GGUF") -> None:
    """Stream ``plan`` into one float32 safetensors file: header from shapes first, then tensor by tensor."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in plan:
        n_bytes = 4 * int(np.prod(t.shape, dtype=np.int64))
        header[t.hf_name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n_bytes],
        }
        offset += n_bytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned
    bar = _progress_bar(offset, progress)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in plan:
            values = np.ascontiguousarray(_hf_values(t), dtype="<f4")
            if not np.isfinite(values).all():
                raise QuantkitError(f"{source}: tensor {t.source.name!r} contains NaN or inf values")
            f.write(values.data)
            bar.update(values.nbytes)
    bar.close()


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="Dequantizing", disable=not enabled)


# --- tokenizer ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocab:
    """The GGUF's SentencePiece-style vocab. Token types use llama.cpp's numbering, which equals
    SentencePiece's: 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE."""

    pieces: list[str]
    scores: np.ndarray  # (V,) float32
    types: np.ndarray  # (V,) int32
    unk_id: int
    bos_id: int  # -1 when absent
    eos_id: int
    pad_id: int
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool


def read_vocab(reader: gguf.GGUFReader, source: str) -> Vocab:
    """The vocab from ``tokenizer.ggml.*``, with the unknown token's type forced to UNKNOWN."""
    model = _field(reader, K.Tokenizer.MODEL, None)
    if model != "llama":
        raise QuantkitError(f"{source}: tokenizer.ggml.model is {model!r}; only SentencePiece ('llama') vocabs")
    tokens = reader.get_field(K.Tokenizer.LIST)
    if tokens is None or len(tokens.data) == 0:
        raise QuantkitError(f"{source}: GGUF key {K.Tokenizer.LIST!r} is missing or empty")
    pieces = [tokens.parts[i].tobytes().decode("utf-8", errors="replace") for i in tokens.data]
    pieces = [p or f"[EMPTY_{i}]" for i, p in enumerate(pieces)]  # as llama.cpp; SentencePiece refuses ""
    n = len(pieces)
    scores = _numeric_array(reader, K.Tokenizer.SCORES, np.zeros(n), np.float32, n, source)
    types = _numeric_array(reader, K.Tokenizer.TOKEN_TYPE, np.ones(n), np.int32, n, source)
    # The converter writes USER_DEFINED pieces with U+2581 turned into " " because llama.cpp matches them in
    # the raw text; SentencePiece matches them after escaping spaces, so turn them back.
    pieces = [p.replace(" ", "\u2581") if t == 4 else p for p, t in zip(pieces, types.tolist(), strict=True)]
    if len(set(pieces)) != n:
        raise QuantkitError(f"{source}: tokenizer.ggml.tokens has duplicate pieces")
    if types.min() < 1 or types.max() > 6:
        raise QuantkitError(f"{source}: tokenizer.ggml.token_type has values outside 1..6")
    n_bytes = int((types == 6).sum())
    if n_bytes not in (0, 256):
        raise QuantkitError(f"{source}: {n_bytes} BYTE tokens; SentencePiece byte fallback needs all 256")
    unk_id, bos_id, eos_id, pad_id = _special_ids(reader, types, source)
    types[types == 2] = 3
    types[unk_id] = 2  # Gemma GGUFs mark <unk> CONTROL; SentencePiece needs exactly one UNKNOWN piece
    return Vocab(
        pieces=pieces,
        scores=scores,
        types=types,
        unk_id=unk_id,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        add_bos=bool(_field(reader, K.Tokenizer.ADD_BOS, True)),
        add_eos=bool(_field(reader, K.Tokenizer.ADD_EOS, False)),
        add_space_prefix=bool(_field(reader, K.Tokenizer.ADD_PREFIX, True)),  # llama.cpp's SPM default
    )


def _special_ids(reader: gguf.GGUFReader, types: np.ndarray, source: str) -> tuple[int, int, int, int]:
    """unk, bos, eos, pad ids (-1 when absent; unk falls back to the only UNKNOWN-typed token)."""
    keys = (K.Tokenizer.UNK_ID, K.Tokenizer.BOS_ID, K.Tokenizer.EOS_ID, K.Tokenizer.PAD_ID)
    unk_id, bos_id, eos_id, pad_id = (_token_id(_field(reader, key, -1), key, source) for key in keys)
    if unk_id < 0:
        unknown = np.flatnonzero(types == 2)
        if len(unknown) != 1:
            raise QuantkitError(f"{source}: no unknown_token_id and {len(unknown)} UNKNOWN-typed tokens")
        unk_id = int(unknown[0])
    for key, i in zip(keys, (unk_id, bos_id, eos_id, pad_id), strict=True):
        if i >= len(types) or i < -1:
            raise QuantkitError(f"{source}: {key} {i} is outside the {len(types)}-token vocab")
    return unk_id, bos_id, eos_id, pad_id


def _token_id(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise QuantkitError(f"{source}: {key} is {value!r}, not a token id")
    return int(value)


def _field(reader: gguf.GGUFReader, key: str, default: Any) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _numeric_array(
    reader: gguf.GGUFReader, key: str, default: np.ndarray, dtype: type, n: int, source: str
) -> np.ndarray:
    field = reader.get_field(key)
    if field is None:
        return default.astype(dtype)
    values = np.concatenate([field.parts[i] for i in field.data]).astype(dtype)
    if len(values) != n:
        raise QuantkitError(f"{source}: {key} has {len(values)} entries for {n} tokens")
    return values


def sentencepiece_model_bytes(vocab: Vocab) -> bytes:
    """Serialized SentencePiece ModelProto for ``vocab``: BPE (scores are merge priorities), byte fallback,
    no normalization, spaces escaped as U+2581, a leading space only if the GGUF asks for one (Gemma: no)."""
    from sentencepiece import sentencepiece_model_pb2 as pb2  # needs protobuf

    m = pb2.ModelProto()
    for piece, score, kind in zip(vocab.pieces, vocab.scores.tolist(), vocab.types.tolist(), strict=True):
        m.pieces.add(piece=piece, score=score, type=kind)
    spec = m.trainer_spec
    spec.model_type = pb2.TrainerSpec.BPE
    spec.vocab_size = len(vocab.pieces)
    spec.byte_fallback = bool((vocab.types == 6).any())  # SentencePiece requires: true iff BYTE pieces exist
    for role, i in (
        ("unk", vocab.unk_id),
        ("bos", vocab.bos_id),
        ("eos", vocab.eos_id),
        ("pad", vocab.pad_id),
    ):
        setattr(spec, f"{role}_id", i)
        if i >= 0:
            setattr(spec, f"{role}_piece", vocab.pieces[i])
    norm = m.normalizer_spec
    norm.name = "identity"  # and no precompiled_charsmap: text is used as is
    norm.add_dummy_prefix = vocab.add_space_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return m.SerializeToString()


def _tokenizer_config(vocab: Vocab, meta: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
    }
    for role, i in (
        ("bos", vocab.bos_id),
        ("eos", vocab.eos_id),
        ("unk", vocab.unk_id),
        ("pad", vocab.pad_id),
    ):
        if i >= 0:
            config[f"{role}_token"] = vocab.pieces[i]
    if K.Tokenizer.CHAT_TEMPLATE in meta:
        config["chat_template"] = meta[K.Tokenizer.CHAT_TEMPLATE]
    return config


def _generation_config(vocab: Vocab) -> dict[str, Any]:
    """bos/eos/pad ids; eos also lists ``<end_of_turn>`` if present (llama.cpp's end-of-generation set)."""
    eos = [vocab.eos_id] if vocab.eos_id >= 0 else []
    if "<end_of_turn>" in vocab.pieces:
        eos.append(vocab.pieces.index("<end_of_turn>"))
    config: dict[str, Any] = {"bos_token_id": vocab.bos_id, "eos_token_id": eos, "pad_token_id": vocab.pad_id}
    return {k: v for k, v in config.items() if v not in (-1, [])}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
