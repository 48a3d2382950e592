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
from gguf import GGMLQuantizationType

from . import tensorio
from .config import ModelConfig, load_config
from .errors import QuantkitError
from .primitives import QuantizedWeight, QuantSpec, unpack_int32

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

DTYPE_NAMES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


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
    if not qc or (qc.get("quant_method"), qc.get("format")) == ("quantkit", "ggml-blocks"):
        return None  # dense, or linears stored as ggml blocks (Checkpoint.blocks)
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "pack-quantized":
        raise QuantkitError(
            f"{source}: quantization_config {qc.get('quant_method')!r}/{qc.get('format')!r} is not read; "
            "quantkit reads compressed-tensors pack-quantized checkpoints"
        )
    groups = list(qc.get("config_groups", {}).values())
    if len(groups) != 1 or groups[0].get("weights", {}).get("type") != "int":
        raise QuantkitError(f"{source}: expected one int weight scheme in quantization_config.config_groups")
    w = groups[0]["weights"]
    group = -1 if w.get("strategy") == "channel" else int(w["group_size"])
    return QuantSpec(bits=int(w["num_bits"]), group_size=group, sym=bool(w["symmetric"]))


def _canonical(name: str) -> str | None:
    if name.startswith(_DROP_PREFIXES):
        return None
    for old, new in _PREFIX_MAP:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _read_header(path: Path) -> dict:
    """Parse a safetensors header ourselves so that a corrupt or truncated file gets a precise message."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise QuantkitError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise QuantkitError(f"{path}: corrupt safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QuantkitError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise QuantkitError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + data_len > size:
        raise QuantkitError(f"{path}: truncated safetensors file (needs {8 + n + data_len} bytes, has {size})")
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
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise QuantkitError(f"{index}: not a valid shard index (no weight_map)") from None
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
        if check_finite and not torch.isfinite(t).all():
            raise QuantkitError(f"{self.path / shard}: tensor {name!r} contains NaN or inf values")
        return t

    def layer_tensors(
        self, i: int, dtype: torch.dtype | None = None, exclude: set[str] = frozenset(), check_finite: bool = False
    ) -> dict[str, torch.Tensor]:
        """Tensors of decoder layer ``i`` keyed by their name inside the layer (e.g. 'mlp.up_proj.weight'),
        except those named in ``exclude``; ``check_finite`` refuses NaN/inf values."""
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
        scale = self.get(f"{name}.weight_scale")
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


def _validate(ckpt: Checkpoint) -> None:
    cfg = ckpt.config
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        module = name.removesuffix(".weight")
        if ckpt.has_blocks(module) or (ckpt.quant_spec is not None and ckpt.is_linear_quantized(module)):
            got = tuple(int(v) for v in ckpt.get(f"{module}.weight_shape"))
            if got != shape:
                raise QuantkitError(
                    f"{ckpt.path}: {module}.weight_shape is {list(got)}, config.json implies {list(shape)}"
                )
            continue
        if name not in ckpt.locations:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} missing from the checkpoint")
        got = ckpt.shape_of(name)
        if got != shape:
            shard = ckpt.locations[name][0]
            raise QuantkitError(
                f"{ckpt.path / shard}: tensor {name!r} has shape {list(got)}, config.json implies {list(shape)}"
            )
    emb = "model.embed_tokens.weight"
    if emb not in ckpt.locations:
        raise QuantkitError(f"{ckpt.path}: tensor {emb!r} missing from the checkpoint")
    rows, cols = ckpt.shape_of(emb)
    if cols != cfg.hidden_size or rows < cfg.vocab_size:
        raise QuantkitError(
            f"{ckpt.path}: {emb} has shape {[rows, cols]}, config.json implies [{cfg.vocab_size}, {cfg.hidden_size}]"
        )
    for name in ckpt.locations:
        dt = ckpt.dtype_of(name)
        packed = name.rsplit(".", 1)[-1].startswith(("weight_", "ggml_"))
        if dt not in DTYPE_NAMES and not ((ckpt.quant_spec or ckpt.has_blocks(name.rsplit(".", 1)[0])) and packed):
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} has dtype {dt}; expected BF16, F16 or F32")


def open_checkpoint(model_dir: str | Path, require_tokenizer: bool = True) -> Checkpoint:
    """Open and validate a Gemma 2/3 HF checkpoint directory (headers only; no tensor data is read)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise QuantkitError(f"{model_dir}: not a directory")
    cfg = load_config(model_dir)
    raw_config = json.loads((model_dir / "config.json").read_text())
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
            locations[name] = (shard, stored)
    spec = quant_spec_from_config(raw_config, str(model_dir / "config.json"))
    ckpt = Checkpoint(model_dir, cfg, raw_config, locations, headers, spec)
    _validate(ckpt)
    if require_tokenizer and not ckpt.tokenizer_path.is_file():
        raise QuantkitError(
            f"{ckpt.tokenizer_path}: tokenizer.model not found (quantkit needs the SentencePiece model)"
        )
    return ckpt


def dir_size(path: Path) -> int:
    return (
        sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if path.is_dir() else os.path.getsize(path)
    )
