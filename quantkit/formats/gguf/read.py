"""Reading a Gemma 2 / Gemma 3 GGUF as Hugging Face tensors: open and check the file, map every GGUF tensor
to its HF name and shape, and dequantize it to the HF value.

The file is opened with gguf-py's memory-mapped reader. A tensor's HF value is ``gguf.quants.dequantize`` of
its data in float32 (quantkit's ``lowbit`` decoders for Q1_0 / Q2_0), with the GGUF's ``1 + w`` norms turned
back into HF's ``w``. The tied ``output.weight`` that some converters write is accepted only when it equals
``token_embd``, and then dropped.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.lowbit import DEQUANTIZERS, dequantize_lowbit
from quantkit.formats.gguf.metadata import build_config, gemma_rules
from quantkit.formats.gguf.names import GLOBAL_TENSORS, LAYER_TENSORS, GemmaRules
from quantkit.formats.gguf.vocab import SpmVocab, read_vocab
from quantkit.io.config import config_from_dict
from quantkit.io.layout import expected_shapes

K = gguf.Keys
_VOCAB_ARRAYS = (K.Tokenizer.LIST, K.Tokenizer.SCORES, K.Tokenizer.TOKEN_TYPE, K.Tokenizer.MERGES)

# GGUF tensor names -> HF modules: the names tables read right to left
_HF_GLOBAL = {g: hf for hf, g in GLOBAL_TENSORS.items()}
_HF_LAYER = {g: hf for hf, g in LAYER_TENSORS.items()}


@dataclass(frozen=True)
class GGUFTensor:
    hf_name: str
    shape: tuple[int, ...]  # HF (numpy) shape: GGUF dims reversed
    source: gguf.ReaderTensor


@dataclass(frozen=True)
class GGUFFile:
    """A checked Gemma GGUF: its reader (which keeps the memory map alive), metadata, vocab, HF config and
    HF tensors in file order."""

    path: Path
    reader: gguf.GGUFReader
    meta: dict[str, Any]
    rules: GemmaRules
    vocab: SpmVocab
    config: dict[str, Any]  # config.json contents
    tensors: list[GGUFTensor]


def read_gguf(path: str | Path) -> GGUFFile:
    """Open and check a GGUF as ``import-gguf`` and ``eval-ppl`` read it. Raises QuantkitError (one line,
    naming the file) for a file that is not GGUF, another architecture, a non-SentencePiece vocab, missing or
    mis-shaped tensors, or an untied ``output.weight``."""
    path = Path(path)
    source = str(path)
    reader = open_gguf(path)
    meta = read_metadata(reader, source)
    rules = gemma_rules(meta, source)  # fail fast on a non-Gemma file
    vocab = read_vocab(reader, source)
    config = build_config(meta, len(vocab.pieces), source)
    return GGUFFile(path, reader, meta, rules, vocab, config, map_tensors(reader, config, source))


def open_gguf(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise QuantkitError(f"{path}: not found" + (" (a directory, not a GGUF file)" if path.is_dir() else ""))
    try:
        check_sizes(path)
        return gguf.GGUFReader(path)
    except (OSError, ValueError, IndexError, KeyError, struct.error) as e:
        raise QuantkitError(f"{path}: not a readable GGUF file ({one_line(e)})") from e


# GGUF value types with a fixed size (bytes); 8 is a string (u64 length + bytes), 9 an array
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _MAX_DIMS = 8, 9, 4


def check_sizes(path: Path) -> None:
    """Walk the header, key-values and tensor infos, checking every declared count and length against the
    bytes the file has, before gguf-py's reader builds anything from them: a corrupt count must be an
    error, not a loop over 2^63 items or a multi-GB allocation. Raises ValueError."""
    size = path.stat().st_size
    with open(path, "rb") as f:

        def take(fmt: str) -> tuple:
            n = struct.calcsize(fmt)
            raw = f.read(n)
            if len(raw) != n:
                raise ValueError("truncated header")
            return struct.unpack(fmt, raw)

        def skip(n: int, what: str) -> None:
            if n > size - f.tell():
                raise ValueError(f"{what} of {n} bytes runs past the end of the file")
            f.seek(n, 1)

        def value(vtype: int, depth: int = 0) -> None:
            if vtype in _FIXED:
                skip(_FIXED[vtype], "a value")
            elif vtype == _STRING:
                skip(take("<Q")[0], "a string")
            elif vtype == _ARRAY and depth == 0:
                etype, count = take("<IQ")
                least = _FIXED.get(etype, 8)  # a string or nested array takes at least its 8-byte length
                if count * least > size - f.tell():
                    raise ValueError(f"an array of {count} items runs past the end of the file")
                if etype in _FIXED:
                    skip(count * least, "an array")
                else:
                    for _ in range(count):
                        value(etype, depth + 1)
            else:
                raise ValueError(f"unknown value type {vtype}")

        magic, _version, n_tensors, n_kv = take("<4sIQQ")
        if magic != b"GGUF":
            raise ValueError("no GGUF magic")
        if (n_tensors + n_kv) * 12 > size:  # each takes at least a name's 8-byte length and a 4-byte type
            raise ValueError(f"{n_tensors} tensors and {n_kv} keys cannot fit in {size} bytes")
        for _ in range(n_kv):
            skip(take("<Q")[0], "a key")
            value(take("<I")[0])
        for _ in range(n_tensors):
            skip(take("<Q")[0], "a tensor name")
            (n_dims,) = take("<I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ValueError(f"a tensor with {n_dims} dimensions")
            dims = take(f"<{n_dims}Q")
            if math.prod(dims) > 8 * size:  # ggml types store at least 1/8 byte per weight
                raise ValueError(f"a tensor of {math.prod(dims)} weights cannot fit in {size} bytes")
            _type, offset = take("<IQ")  # gguf-py checks both against the data section, but adds the offset
            if offset > size:  # to the section's start in uint64 first: a huge one wraps (with a warning)
                raise ValueError(f"a tensor's data offset {offset} lies past the end of the file")


def read_metadata(reader: gguf.GGUFReader, source: str) -> dict[str, Any]:
    """Every KV pair except the vocab arrays, as Python values. GGUF strings are UTF-8: a value that is not
    is a one-line error naming its key."""
    meta = {}
    for k, f in reader.fields.items():
        if k in _VOCAB_ARRAYS:
            continue
        try:
            meta[k] = f.contents()
        except UnicodeDecodeError:
            raise QuantkitError(f"{source}: metadata {k!r} holds a string that is not UTF-8") from None
    return meta


def hf_tensor_name(gguf_name: str) -> str | None:
    """``blk.3.ffn_norm.weight`` -> ``model.layers.3.pre_feedforward_layernorm.weight``; None if unknown."""
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[1] == "weight" and parts[0] in _HF_GLOBAL:
        return f"{_HF_GLOBAL[parts[0]]}.weight"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        if parts[2] in _HF_LAYER:
            return f"model.layers.{int(parts[1])}.{_HF_LAYER[parts[2]]}.weight"
    return None


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> [out, in] shape for ``config``."""
    cfg = config_from_dict(config)
    return {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), **expected_shapes(cfg)}


def map_tensors(reader: gguf.GGUFReader, config: dict[str, Any], source: str) -> list[GGUFTensor]:
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
            _values(t.data[:1], t.tensor_type)  # probe one row: is the type supported?
        except NotImplementedError as e:
            raise QuantkitError(f"{source}: gguf-py cannot dequantize {t.name!r} ({t.tensor_type.name})") from e
        except ValueError as e:  # rows that do not fit the type tag's block size
            raise QuantkitError(
                f"{source}: tensor {t.name!r} is not valid {t.tensor_type.name} data ({one_line(e)})"
            ) from None
        plan.append(GGUFTensor(name, shape, t))
    missing = sorted(expected.keys() - {p.hf_name for p in plan})
    if missing:
        raise QuantkitError(f"{source}: {len(missing)} tensors missing, e.g. {missing[0]!r}")
    return plan


def _check_tied(output: gguf.ReaderTensor, embed: gguf.ReaderTensor | None, source: str) -> None:
    """HF Gemma ties the head to the embedding: accept output.weight only if it equals token_embd."""
    if embed is None or not np.array_equal(_dequantize(output), _dequantize(embed)):
        raise QuantkitError(f"{source}: output.weight differs from token_embd.weight (untied head), not supported")


def _values(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """gguf-py's dequantization; quantkit's for Q1_0 / Q2_0, which gguf-py cannot decode."""
    if qtype in DEQUANTIZERS:
        return dequantize_lowbit(np.asarray(data), qtype)
    return gguf.quants.dequantize(data, qtype)


def _dequantize(t: gguf.ReaderTensor) -> np.ndarray:
    values = _values(t.data, t.tensor_type)
    return values.reshape(tuple(int(n) for n in reversed(t.shape)))


def hf_values(t: GGUFTensor, source: str = "GGUF") -> np.ndarray:
    """float32 HF value of one mapped tensor: dequantized, minus 1 for norms (GGUF stores 1 + w)."""
    try:
        values = _dequantize(t.source).astype(np.float32, copy=False)
    except ValueError as e:  # data that does not fit the type tag's block size
        raise QuantkitError(
            f"{source}: tensor {t.source.name!r} is not valid {t.source.tensor_type.name} data ({one_line(e)})"
        ) from None
    if t.hf_name.endswith("norm.weight"):
        values = values - np.float32(1.0)
    return values


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
