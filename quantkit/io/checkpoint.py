"""Read a Hugging Face Gemma checkpoint lazily: config.json, (sharded) safetensors, tokenizer.model.

Tensors are read one at a time with plain file reads (no memory maps); nothing here loads the whole model.
Every check that can be made from the headers alone (missing shards, corrupt or truncated files, names
and shapes against the config) runs when the checkpoint is opened, so bad input fails before any work.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.errors import QuantkitError
from quantkit.io import tensorio
from quantkit.io.config import ModelConfig, load_config
from quantkit.io.dtypes import ELEMENT_BYTES, FLOAT_NAMES
from quantkit.io.tokenizer import check_tokenizer_files
from quantkit.quant.primitives import QuantizedWeight, QuantSpec, unpack_int32

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.model"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Multimodal Gemma 3 checkpoints keep the text model under this prefix; vision tensors are dropped.
_PREFIX_MAP = (("language_model.model.", "model."), ("model.language_model.", "model."))
_DROP_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)

# dtype of each pack-quantized tensor (by its name's last part)
BLOCK_DTYPES = {"ggml_blocks": ("U8",), "ggml_type": ("I32",), "weight_shape": ("I64",)}  # a linear as ggml blocks
PACKED_DTYPES = {"weight_packed": ("I32",), "weight_zero_point": ("I32",), "weight_shape": ("I64", "I32"),
                 "weight_scale": FLOAT_NAMES}  # fmt: skip


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Module name inside a decoder layer -> weight shape, in HF order (norms [H] or [D], linears [O, I])."""
    h, d = cfg.hidden_size, cfg.head_dim
    lin = cfg.linear_shapes()
    shapes: dict[str, tuple[int, ...]] = {"input_layernorm": (h,)}
    shapes |= {n: lin[n] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")}
    if cfg.has_qk_norm:
        shapes |= {"self_attn.q_norm": (d,), "self_attn.k_norm": (d,)}
    shapes |= {"post_attention_layernorm": (h,), "pre_feedforward_layernorm": (h,)}
    shapes |= {n: lin[n] for n in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    shapes["post_feedforward_layernorm"] = (h,)
    return shapes


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for every tensor a Gemma 2/3 text checkpoint must hold (the embedding, which
    may carry padding rows, is checked separately)."""
    shapes: dict[str, tuple[int, ...]] = {"model.norm.weight": (cfg.hidden_size,)}
    per_layer = layer_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        shapes |= {f"{layer_prefix(i)}{n}.weight": s for n, s in per_layer.items()}
    return shapes


def quant_spec_from_config(raw: dict, source: str) -> QuantSpec | None:
    """The weight grid of a compressed-tensors pack-quantized checkpoint, or None for a dense one."""
    qc = raw.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise QuantkitError(f"{source}: quantization_config is {qc!r}, not an object")
    if (qc.get("quant_method"), qc.get("format")) == ("quantkit", "ggml-blocks"):
        return None  # linears stored as ggml blocks (Checkpoint.blocks)
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "pack-quantized":
        raise QuantkitError(
            f"{source}: quantization_config {qc.get('quant_method')!r}/{qc.get('format')!r} is not read; "
            "quantkit reads compressed-tensors pack-quantized checkpoints"
        )
    groups = qc.get("config_groups")
    groups = list(groups.values()) if isinstance(groups, dict) else []
    w = groups[0].get("weights") if len(groups) == 1 and isinstance(groups[0], dict) else None
    if not isinstance(w, dict) or w.get("type") != "int":
        raise QuantkitError(f"{source}: expected one int weight scheme in quantization_config.config_groups")
    bits, sym, group = w.get("num_bits"), w.get("symmetric"), w.get("group_size")
    if w.get("strategy") == "channel":
        group = -1
    elif w.get("strategy") != "group":
        raise QuantkitError(f"{source}: weights strategy {w.get('strategy')!r} is not read (group or channel)")
    for key, value, ok in (
        ("num_bits", bits, isinstance(bits, int) and not isinstance(bits, bool)),
        ("symmetric", sym, isinstance(sym, bool)),
        ("group_size", group, isinstance(group, int) and not isinstance(group, bool)),
    ):
        if not ok:
            raise QuantkitError(f"{source}: quantization_config weights.{key} is {value!r} (missing or mistyped)")
    return QuantSpec(bits=bits, group_size=group, sym=sym)


def _canonical(name: str) -> str | None:
    if name.startswith(_DROP_PREFIXES):
        return None
    for old, new in _PREFIX_MAP:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise QuantkitError(f"tensor {dup!r} is listed twice")
    return dict(pairs)


def _check_entries(path: Path, header: dict, data_len: int) -> None:
    """Each entry: known dtype, shape of non-negative ints, dtype size x elements = byte length, offsets in
    range; together: sorted, non-overlapping spans."""
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise QuantkitError(f"{where}: header entry lacks dtype/shape/data_offsets (corrupt safetensors header)")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dt not in ELEMENT_BYTES:
            raise QuantkitError(f"{where}: unknown dtype {dt!r} (corrupt safetensors header)")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise QuantkitError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise QuantkitError(f"{where}: data_offsets {offs!r} are not two integers")
        begin, end = offs
        if not 0 <= begin <= end:
            raise QuantkitError(f"{where}: data_offsets {offs} are not an increasing pair of byte offsets")
        if end > data_len:
            raise QuantkitError(
                f"{path}: truncated safetensors file, or offsets outside it ({name!r} ends at byte {end} of the "
                f"data section, which has {data_len})"
            )
        numel = 1
        for d in shape:
            numel *= d
        if numel * ELEMENT_BYTES[dt] != end - begin:
            raise QuantkitError(f"{where}: {dt} {shape} needs {numel * ELEMENT_BYTES[dt]} bytes, has {end - begin}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise QuantkitError(f"{path}: tensors {a!r} and {b!r} overlap (corrupt safetensors header)")


def _read_header(path: Path) -> dict:
    """Parse and check a safetensors header ourselves, so a corrupt or truncated file gets a precise message
    before any tensor is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise QuantkitError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise QuantkitError(f"{path}: corrupt safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise QuantkitError(f"{path}: corrupt safetensors header (not valid JSON)") from None
        except QuantkitError as e:
            raise QuantkitError(f"{path}: {e} (corrupt safetensors header)") from None
    if not isinstance(header, dict):
        raise QuantkitError(f"{path}: corrupt safetensors header (not a JSON object)")
    _check_entries(path, header, size - 8 - n)
    return header


def _refuse_pickles(model_dir: Path) -> None:
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise QuantkitError(
            f"{model_dir}: only safetensors checkpoints are read ({pickles[0]} is a pickle-based format, "
            "which quantkit never unpickles); convert it to safetensors first"
        )
    raise QuantkitError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME} found")


def _shard_map(model_dir: Path) -> dict[str, str]:
    """Tensor name (as stored) -> shard file name."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise QuantkitError(f"{index}: not a valid shard index (no weight_map)") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise QuantkitError(f"{index}: weight_map must map tensor names to shard file names (strings)")
        for shard in set(weight_map.values()):
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise QuantkitError(f"{index}: shard {shard!r} is not a .safetensors file name in {model_dir}")
        return dict(weight_map)
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return {name: SINGLE_NAME for name in _read_header(single) if name != "__metadata__"}
    _refuse_pickles(model_dir)
    return {}  # unreachable


@dataclass
class Checkpoint:
    """A validated, lazily read HF checkpoint directory."""

    path: Path
    config: ModelConfig
    raw_config: dict
    # canonical tensor name -> (shard file, name inside the shard)
    locations: dict[str, tuple[str, str]]
    headers: dict[str, dict] = field(repr=False)
    quant_spec: QuantSpec | None = None  # set for a quantized (pack-quantized) checkpoint
    _handles: dict[str, object] = field(default_factory=dict, repr=False)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_NAME

    def names(self) -> list[str]:
        return list(self.locations)

    def dtype_of(self, name: str) -> str:
        shard, key = self.locations[name]
        return self.headers[shard][key]["dtype"]

    def shape_of(self, name: str) -> tuple[int, ...]:
        shard, key = self.locations[name]
        return tuple(self.headers[shard][key]["shape"])

    def _handle(self, shard: str):
        """(open file, offset of its data section) of one shard. Tensors are read with plain file reads,
        not memory maps, so the file pages they touch never count as this process's resident memory."""
        if shard not in self._handles:
            f = open(self.path / shard, "rb", buffering=0)  # noqa: SIM115 (kept open while the checkpoint lives)
            self._handles[shard] = (f, tensorio.header_and_start(f)[1])
        return self._handles[shard]

    def get(self, name: str, dtype: torch.dtype | None = None, check_finite: bool = False) -> torch.Tensor:
        """Read one tensor (a copy, optionally cast). ``check_finite`` refuses NaN/inf values."""
        if name not in self.locations:
            raise QuantkitError(f"{self.path}: tensor {name!r} not in checkpoint")
        shard, key = self.locations[name]
        f, start = self._handle(shard)
        info = self.headers[shard][key]
        t = tensorio.read_tensor(f, start + info["data_offsets"][0], info["dtype"], info["shape"])
        if dtype is not None:
            t = t.to(dtype)
        if check_finite and not tensorio.all_finite(t):
            raise QuantkitError(f"{self.path / shard}: tensor {name!r} contains NaN or inf values")
        return t

    def layer_tensors(
        self, i: int, dtype: torch.dtype | None = None, exclude: set[str] = frozenset(), check_finite: bool = True
    ) -> dict[str, torch.Tensor]:
        """Tensors of decoder layer ``i`` keyed by their name inside the layer (e.g. 'mlp.up_proj.weight'),
        except those named in ``exclude``; NaN/inf values are refused unless ``check_finite`` is false."""
        p = layer_prefix(i)
        names = [n for n in self.locations if n.startswith(p) and n[len(p) :] not in exclude]
        return {n[len(p) :]: self.get(n, dtype, check_finite) for n in names}

    def has_blocks(self, name: str) -> bool:
        """Whether linear ``name`` (a module path) is stored as ggml blocks (quantize --format gguf)."""
        return f"{name}.ggml_blocks" in self.locations

    def blocks(self, name: str) -> tuple[GGMLQuantizationType, np.ndarray]:
        """The ggml type and blocks (uint8 [O, row bytes]) of a linear stored as ggml blocks."""
        qtype = GGMLQuantizationType(int(self.get(f"{name}.ggml_type")[0]))
        return qtype, self.get(f"{name}.ggml_blocks").numpy()

    def is_linear_quantized(self, name: str) -> bool:
        """``name``: a linear's module path, e.g. 'model.layers.0.mlp.up_proj'."""
        return f"{name}.weight_packed" in self.locations

    def quantized_weight(self, name: str) -> QuantizedWeight:
        """Unpack one pack-quantized linear (module path ``name``) into codes, scale and zero point."""
        spec = self.quant_spec
        o, i = (int(v) for v in self.get(f"{name}.weight_shape"))
        codes = unpack_int32(self.get(f"{name}.weight_packed"), spec.bits, i)
        scale = self.get(f"{name}.weight_scale", check_finite=True)
        zero = None
        if not spec.sym:
            zp = self.get(f"{name}.weight_zero_point")  # [ceil(O*b/32), G], packed along O
            zero = unpack_int32(zp.T.contiguous(), spec.bits, o).T.contiguous()
        if codes.shape != (o, i) or scale.shape != (o, spec.groups(i)):
            raise QuantkitError(f"{self.path}: {name} has inconsistent packed/scale shapes")
        return QuantizedWeight(codes, scale, zero, spec)

    def on_disk_bytes(self) -> int:
        return sum((self.path / s).stat().st_size for s in self.headers)

    def num_parameters(self) -> int:
        total = 0
        for name in self.locations:
            n = 1
            for s in self.shape_of(name):
                n *= s
            total += n
        return total


def _check_packed(ckpt: Checkpoint, module: str, shape: tuple[int, ...]) -> set[str]:
    """Dtypes and shapes of one pack-quantized linear's tensors (from the headers); returns their names."""
    spec = ckpt.quant_spec
    parts = [p for p in PACKED_DTYPES if p != "weight_zero_point" or not spec.sym]
    o, i = shape
    want = {
        "weight_packed": (o, -(-i * spec.bits // 32)),
        "weight_scale": (o, spec.groups(i)),
        "weight_shape": (2,),
        "weight_zero_point": (-(-o * spec.bits // 32), spec.groups(i)),
    }
    for part in parts:
        name = f"{module}.{part}"
        if name not in ckpt.locations:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} missing from the quantized checkpoint")
        dt, got = ckpt.dtype_of(name), ckpt.shape_of(name)
        if dt not in PACKED_DTYPES[part]:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} is {dt}; expected {' or '.join(PACKED_DTYPES[part])}")
        if got != want[part]:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} has shape {list(got)}, expected {list(want[part])}")
    got = tuple(int(v) for v in ckpt.get(f"{module}.weight_shape"))
    if got != shape:
        raise QuantkitError(f"{ckpt.path}: {module}.weight_shape is {list(got)}, config.json implies {list(shape)}")
    return {f"{module}.{p}" for p in parts}


def _check_blocks(ckpt: Checkpoint, module: str, shape: tuple[int, ...]) -> set[str]:
    """Dtypes and shapes of one linear stored as ggml blocks; returns their tensor names."""
    names = {part: f"{module}.{part}" for part in BLOCK_DTYPES}
    for part, name in names.items():
        if name not in ckpt.locations:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} missing from the quantized checkpoint")
        dt = ckpt.dtype_of(name)
        if dt not in BLOCK_DTYPES[part]:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} is {dt}; expected {BLOCK_DTYPES[part][0]}")
    got = tuple(int(v) for v in ckpt.get(names["weight_shape"]))
    if got != shape:
        raise QuantkitError(f"{ckpt.path}: {module}.weight_shape is {list(got)}, config.json implies {list(shape)}")
    try:
        qtype = GGMLQuantizationType(int(ckpt.get(names["ggml_type"])[0]))
    except ValueError:
        raise QuantkitError(f"{ckpt.path}: {module}.ggml_type is not a ggml type id") from None
    blk, size = GGML_QUANT_SIZES[qtype]
    if shape[1] % blk or ckpt.shape_of(names["ggml_blocks"]) != (shape[0], shape[1] // blk * size):
        raise QuantkitError(f"{ckpt.path}: {module}.ggml_blocks does not hold {list(shape)} {qtype.name} weights")
    return set(names.values())


def _validate(ckpt: Checkpoint) -> None:
    cfg = ckpt.config
    emb = "model.embed_tokens.weight"
    known = {emb}
    for name, shape in expected_shapes(cfg).items():
        module = name.removesuffix(".weight")
        if ckpt.has_blocks(module):
            known |= _check_blocks(ckpt, module, shape)
            continue
        if ckpt.quant_spec is not None and ckpt.is_linear_quantized(module):
            known |= _check_packed(ckpt, module, shape)
            continue
        known.add(name)
        if name not in ckpt.locations:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} missing from the checkpoint")
        got = ckpt.shape_of(name)
        if got != shape:
            shard = ckpt.locations[name][0]
            raise QuantkitError(
                f"{ckpt.path / shard}: tensor {name!r} has shape {list(got)}, config.json implies {list(shape)}"
            )
    extra = sorted(set(ckpt.locations) - known)
    if extra:
        raise QuantkitError(
            f"{ckpt.path}: unexpected tensor {extra[0]!r} ({len(extra)} in all) for a "
            f"{cfg.num_hidden_layers}-layer {cfg.architecture} (check num_hidden_layers in config.json)"
        )
    if emb not in ckpt.locations:
        raise QuantkitError(f"{ckpt.path}: tensor {emb!r} missing from the checkpoint")
    emb_shape = ckpt.shape_of(emb)
    if len(emb_shape) != 2 or emb_shape[1] != cfg.hidden_size or emb_shape[0] < cfg.vocab_size:
        raise QuantkitError(
            f"{ckpt.path}: {emb} has shape {list(emb_shape)}, config.json implies [{cfg.vocab_size}, {cfg.hidden_size}]"
        )
    for name in known - {n for n in known if n.rsplit(".", 1)[-1] in PACKED_DTYPES | BLOCK_DTYPES}:
        dt = ckpt.dtype_of(name)
        if dt not in FLOAT_NAMES:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} has dtype {dt}; expected BF16, F16 or F32")


def open_checkpoint(model_dir: str | Path, require_tokenizer: bool = True) -> Checkpoint:
    """Open and validate a Gemma 2/3 HF checkpoint directory (headers only; no tensor data is read)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise QuantkitError(f"{model_dir}: not a directory")
    cfg = load_config(model_dir)
    raw_config = json.loads((model_dir / "config.json").read_bytes())
    shard_of = _shard_map(model_dir)
    headers: dict[str, dict] = {}
    for shard in sorted(set(shard_of.values())):
        shard_path = model_dir / shard
        if not shard_path.is_file():
            raise QuantkitError(f"{shard_path}: shard named in {INDEX_NAME} is missing")
        headers[shard] = _read_header(shard_path)
    locations: dict[str, tuple[str, str]] = {}
    for stored, shard in shard_of.items():
        if stored not in headers[shard]:
            raise QuantkitError(f"{model_dir / shard}: tensor {stored!r} listed in the index is not in this shard")
        name = _canonical(stored)
        if name is not None and name != "lm_head.weight":  # the head is tied to the embedding
            if name in locations:
                raise QuantkitError(f"{model_dir / shard}: tensor {name!r} is stored twice (as {stored!r})")
            locations[name] = (shard, stored)
    spec = quant_spec_from_config(raw_config, str(model_dir / "config.json"))
    ckpt = Checkpoint(model_dir, cfg, raw_config, locations, headers, spec)
    _validate(ckpt)
    if require_tokenizer and not ckpt.tokenizer_path.is_file():
        raise QuantkitError(
            f"{ckpt.tokenizer_path}: tokenizer.model not found (quantkit needs the SentencePiece model)"
        )
    if ckpt.tokenizer_path.is_file():
        check_tokenizer_files(model_dir, cfg.vocab_size)
    return ckpt


def dir_size(path: Path) -> int:
    return (
        sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if path.is_dir() else os.path.getsize(path)
    )
