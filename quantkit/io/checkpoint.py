"""Open a Hugging Face Gemma checkpoint directory lazily: config.json, (sharded) safetensors, tokenizer.model.

Tensors are read one at a time with plain file reads (no memory maps); nothing here loads the whole model.
Every check that can be made from the headers alone (missing shards, corrupt or truncated files, names
and shapes against the config) runs when the checkpoint is opened, so bad input fails before any work.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from quantkit.errors import QuantkitError
from quantkit.io import tensorio
from quantkit.io.config import ModelConfig, load_config
from quantkit.io.dtypes import ELEMENT_BYTES
from quantkit.io.layout import canonical_name, check_layout, layer_members, quant_spec_from_config
from quantkit.io.safetensors_header import read_header, tensor_names
from quantkit.io.tokenizer import check_tokenizer_files
from quantkit.quant.primitives import QuantizedWeight, QuantSpec, unpack_int32

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.model"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
        return dict.fromkeys(tensor_names(read_header(single)), SINGLE_NAME)
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

    @property
    def is_quantized(self) -> bool:
        """Whether config.json declares quantized linears (packed or ggml blocks): a quantize output."""
        return bool(self.raw_config.get("quantization_config"))

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

    def get_rows(self, name: str, rows: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``rows`` [S] (ascending) of a tensor [O, ...] as [S, prod(...)], read alone: a sample of a large
        embedding, or a slab of it."""
        shard, key = self.locations[name]
        f, start = self._handle(shard)
        info = self.headers[shard][key]
        width = math.prod(info["shape"][1:])
        row_bytes = width * ELEMENT_BYTES[info["dtype"]]
        base = start + info["data_offsets"][0]
        rows = np.asarray(rows, dtype=np.int64)
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)  # consecutive rows: one read each
        t = torch.cat([tensorio.read_tensor(f, base + int(r[0]) * row_bytes, info["dtype"], [len(r), width])
                       for r in runs if len(r)])  # fmt: skip
        return t if dtype is None else t.to(dtype)

    def layer_tensors(
        self, i: int, dtype: torch.dtype | None = None, exclude: set[str] = frozenset(), check_finite: bool = True
    ) -> dict[str, torch.Tensor]:
        """Tensors of decoder layer ``i`` keyed by their name inside the layer (e.g. 'mlp.up_proj.weight'),
        except those named in ``exclude``; NaN/inf values are refused unless ``check_finite`` is false."""
        return {k: self.get(n, dtype, check_finite) for k, n in layer_members(self.locations, i, exclude).items()}

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
        return sum(math.prod(self.shape_of(name)) for name in self.locations)


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
        headers[shard] = read_header(shard_path)
    locations: dict[str, tuple[str, str]] = {}
    for stored, shard in shard_of.items():
        if stored not in headers[shard]:
            raise QuantkitError(f"{model_dir / shard}: tensor {stored!r} listed in the index is not in this shard")
        name = canonical_name(stored)
        if name is not None:
            if name in locations:
                raise QuantkitError(f"{model_dir / shard}: tensor {name!r} is stored twice (as {stored!r})")
            locations[name] = (shard, stored)
    spec = quant_spec_from_config(raw_config, str(model_dir / "config.json"))
    ckpt = Checkpoint(model_dir, cfg, raw_config, locations, headers, spec)
    check_layout(ckpt)
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
