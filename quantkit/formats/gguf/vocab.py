"""SentencePiece vocabularies <-> GGUF ``tokenizer.ggml.*`` keys, both directions.

Export: the checkpoint's ``tokenizer.model`` plus its added tokens become the token, score and type arrays
that llama.cpp's converter writes (``_create_vocab_sentencepiece``), padded to the config's vocab size.
Import: those arrays become a SentencePiece BPE ModelProto again, plus the tokenizer and generation configs.
Token types use llama.cpp's numbering, which equals SentencePiece's: 1 NORMAL, 2 UNKNOWN, 3 CONTROL,
4 USER_DEFINED, 5 UNUSED, 6 BYTE.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import sentencepiece as spm

from quantkit.errors import QuantkitError
from quantkit.io.checkpoint import Checkpoint

K = gguf.Keys
TT = gguf.TokenType
SPECIAL_ROLES = ("bos", "eos", "unk", "pad")

# ------------------------------------------------------------------------------------ checkpoint -> GGUF


@dataclass(frozen=True)
class GGUFVocab:
    """The arrays a GGUF stores for a SentencePiece vocab."""

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


def build_vocab(ckpt: Checkpoint, tok_config: dict[str, Any]) -> GGUFVocab:
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
    return GGUFVocab(tokens, scores, types, special)


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


# ---------------------------------------------------------------------------------- GGUF -> SentencePiece


@dataclass(frozen=True)
class SpmVocab:
    """A GGUF's vocab as SentencePiece will hold it."""

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

    def special_ids(self) -> dict[str, int]:
        """bos / eos / unk / pad -> id (-1 when absent)."""
        return {"bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id, "pad": self.pad_id}


def read_vocab(reader: gguf.GGUFReader, source: str) -> SpmVocab:
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
    pieces = [
        p.replace(" ", "\u2581") if t == TT.USER_DEFINED else p for p, t in zip(pieces, types.tolist(), strict=True)
    ]
    if len(set(pieces)) != n:
        raise QuantkitError(f"{source}: tokenizer.ggml.tokens has duplicate pieces")
    if types.min() < TT.NORMAL or types.max() > TT.BYTE:
        raise QuantkitError(f"{source}: tokenizer.ggml.token_type has values outside 1..6")
    n_bytes = int((types == TT.BYTE).sum())
    if n_bytes not in (0, 256):
        raise QuantkitError(f"{source}: {n_bytes} BYTE tokens; SentencePiece byte fallback needs all 256")
    unk_id, bos_id, eos_id, pad_id = _special_ids(reader, types, source)
    types[types == TT.UNKNOWN] = TT.CONTROL
    types[unk_id] = TT.UNKNOWN  # Gemma GGUFs mark <unk> CONTROL; SentencePiece needs exactly one UNKNOWN piece
    return SpmVocab(
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
        unknown = np.flatnonzero(types == TT.UNKNOWN)
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
    try:
        return default if field is None else field.contents()
    except UnicodeDecodeError:
        raise QuantkitError(f"{reader.data.filename}: metadata {key!r} holds a string that is not UTF-8") from None


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


def sentencepiece_model_bytes(vocab: SpmVocab) -> bytes:
    """Serialized SentencePiece ModelProto for ``vocab``: BPE (scores are merge priorities), byte fallback,
    no normalization, spaces escaped as U+2581, a leading space only if the GGUF asks for one (Gemma: no)."""
    from sentencepiece import sentencepiece_model_pb2 as pb2  # needs protobuf

    m = pb2.ModelProto()
    for piece, score, kind in zip(vocab.pieces, vocab.scores.tolist(), vocab.types.tolist(), strict=True):
        m.pieces.add(piece=piece, score=score, type=kind)
    spec = m.trainer_spec
    spec.model_type = pb2.TrainerSpec.BPE
    spec.vocab_size = len(vocab.pieces)
    spec.byte_fallback = bool((vocab.types == TT.BYTE).any())  # SentencePiece requires: true iff BYTE pieces
    for role in ("unk", "bos", "eos", "pad"):
        i = vocab.special_ids()[role]
        setattr(spec, f"{role}_id", i)
        if i >= 0:
            setattr(spec, f"{role}_piece", vocab.pieces[i])
    norm = m.normalizer_spec
    norm.name = "identity"  # and no precompiled_charsmap: text is used as is
    norm.add_dummy_prefix = vocab.add_space_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return m.SerializeToString()


def tokenizer_config(vocab: SpmVocab, meta: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json for the imported vocab (special tokens by text, the chat template if any)."""
    config: dict[str, Any] = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
    }
    for role in SPECIAL_ROLES:
        i = vocab.special_ids()[role]
        if i >= 0:
            config[f"{role}_token"] = vocab.pieces[i]
    if K.Tokenizer.CHAT_TEMPLATE in meta:
        config["chat_template"] = meta[K.Tokenizer.CHAT_TEMPLATE]
    return config


def generation_config(vocab: SpmVocab) -> dict[str, Any]:
    """bos/eos/pad ids; eos also lists ``<end_of_turn>`` if present (llama.cpp's end-of-generation set)."""
    eos = [vocab.eos_id] if vocab.eos_id >= 0 else []
    if "<end_of_turn>" in vocab.pieces:
        eos.append(vocab.pieces.index("<end_of_turn>"))
    config: dict[str, Any] = {"bos_token_id": vocab.bos_id, "eos_token_id": eos, "pad_token_id": vocab.pad_id}
    return {k: v for k, v in config.items() if v not in (-1, [])}
