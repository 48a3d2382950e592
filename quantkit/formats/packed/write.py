"""Write quantized checkpoints in compressed-tensors' ``pack-quantized`` layout (transformers, vLLM).

Per quantized linear P:
    P.weight_packed      int32 [O, ceil(I*b/32)]   unsigned codes c + 2^(b-1), packed along I
    P.weight_scale       scale dtype [O, G]
    P.weight_zero_point  int32 [ceil(O*b/32), G]   asymmetric only, packed along O
    P.weight_shape       int64 [2] = [O, I]
Everything else (embedding, norms) stays dense under its HF name. An asymmetric scheme's config also says
``"dequantize": true`` (see ``LOAD_DEQUANTIZED``). Tensors are streamed into shards of
bounded size inside a temporary directory that is renamed into place when the writer closes cleanly.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from quantkit.formats.gguf.codebook_grid import BlockWeight
from quantkit.io import tensorio
from quantkit.io.atomic import RESUME_KEY, atomic_dir, atomic_file, resumable_dir
from quantkit.quant.primitives import QuantizedWeight, QuantSpec, pack_int32

CT_VERSION = "0.20.0"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def ct_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one linear, ``prefix`` being its module path."""
    bits = qw.spec.bits
    out = {
        f"{prefix}.weight_packed": pack_int32(qw.codes, bits),
        f"{prefix}.weight_scale": qw.scale.contiguous(),
        f"{prefix}.weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
    }
    if qw.zero is not None:
        out[f"{prefix}.weight_zero_point"] = pack_int32(qw.zero.T.contiguous(), bits).T.contiguous()
    return out


GGML_BLOCKS = "ggml-blocks"  # quantkit's own format: linears as the raw blocks of their GGUF types


def block_tensors(prefix: str, gw: BlockWeight) -> dict[str, torch.Tensor]:
    """One linear written by GPTQ onto a ggml type's grid (or a codebook type's points): its blocks as GGUF
    stores them (uint8 [O, row bytes]), the ggml type id and the shape. Only ``export --format gguf`` reads these."""
    return {
        f"{prefix}.ggml_blocks": torch.from_numpy(gw.blocks()),
        f"{prefix}.ggml_type": torch.tensor([int(gw.grid.qtype)], dtype=torch.int32),
        f"{prefix}.weight_shape": torch.tensor(gw.shape, dtype=torch.int64),
    }


def blocks_quantization_config(gguf_type: str) -> dict[str, Any]:
    """config.json ``quantization_config`` of an artifact whose linears are ggml blocks for ``gguf_type``."""
    return {"quant_method": "quantkit", "format": GGML_BLOCKS, "gguf_type": gguf_type}


# transformers 5.23 reads ``dequantize`` from config.json's quantization_config (CompressedTensorsConfig) and
# then decompresses each linear while loading, with compressed-tensors' own PackedQuantizationCompressor,
# which unpacks the zero point above correctly. Without it, transformers first builds the compressed module
# layout on the meta device, where compressed-tensors 0.20 leaves the zero point unpacked ([O, G] int8, its
# ``compress`` skips packing on meta) and the load stops at the size check against our packed [O/8, G] int32.
# Either route ends dense: the compressed route decompresses the whole model on its first forward anyway.
# vLLM and compressed-tensors' QuantizationConfig ignore the key; the tensors stay vLLM's layout.
LOAD_DEQUANTIZED = {"dequantize": True}


def quantization_config(spec: QuantSpec, actorder: bool = False, observer: str = "minmax") -> dict[str, Any]:
    """config.json ``quantization_config`` for compressed-tensors 0.20 (W4A16 / W8A16 style schemes)."""
    strategy = "channel" if spec.group_size == -1 else "group"
    weights: dict[str, Any] = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.sym,
        "strategy": strategy,
        "group_size": None if spec.group_size == -1 else spec.group_size,
        "dynamic": False,
        "actorder": "static" if actorder else None,
        "observer": observer,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "version": CT_VERSION,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        **({} if spec.sym else LOAD_DEQUANTIZED),
    }


class ArtifactWriter:
    """Streams tensors into ``model-XXXXX.safetensors`` shards inside a temporary directory.

    Use as a context manager; on a clean exit the index, config and tokenizer files are written and the
    directory is renamed to ``out_dir``. On any error nothing appears at ``out_dir``.

    With ``resume_key`` the temporary directory is ``.NAME.partial`` (``atomic.resumable_dir``) and
    ``commit`` records progress there: after ``commit(progress, tensors)`` returns, every tensor added so far
    is in complete shards on disk, ``tensors`` (e.g. the next layer's inputs) are saved beside them, and a
    rerun of the same command finds ``progress`` in ``resumed`` and those tensors in ``resumed_tensors()``.
    """

    def __init__(self, out_dir: str | Path, shard_bytes: int = 2 << 30, resume_key: str | None = None):
        self.out_dir, self.shard_bytes, self.resume_key = Path(out_dir), shard_bytes, resume_key
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._stack = ExitStack()
        self.tmp: Path | None = None
        self.total_bytes = 0
        self.resumed: dict[str, Any] | None = None

    def __enter__(self) -> ArtifactWriter:
        if self.resume_key is None:
            self.tmp = self._stack.enter_context(atomic_dir(self.out_dir))
            return self
        self.tmp = self._stack.enter_context(resumable_dir(self.out_dir, self.resume_key))
        state = self.tmp / STATE_NAME
        if state.is_file():
            saved = json.loads(state.read_text())
            self._shards, self.total_bytes, self.resumed = saved["shards"], saved["total_bytes"], saved["progress"]
        keep = {STATE_NAME, STATE_TENSORS, RESUME_KEY} | {_shard_name(i) for i in range(1, len(self._shards) + 1)}
        for p in self.tmp.iterdir():  # whatever a killed run wrote after its last commit
            if p.name not in keep:
                p.unlink()
        return self

    def __exit__(self, *exc) -> bool:
        if exc[0] is None:
            try:
                self.flush()
                for name in (STATE_NAME, STATE_TENSORS):
                    (self.tmp / name).unlink(missing_ok=True)
                self._write_index()
            except BaseException as e:  # e.g. disk full: the temporary directory must still go
                if not self._stack.__exit__(type(e), e, e.__traceback__):
                    raise
                return False
        return self._stack.__exit__(*exc)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        self._pending[name] = t
        self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def add_quantized(self, prefix: str, qw: QuantizedWeight | BlockWeight) -> None:
        tensors = ct_tensors(prefix, qw) if isinstance(qw, QuantizedWeight) else block_tensors(prefix, qw)
        for name, t in tensors.items():
            self.add(name, t)

    def flush(self) -> None:
        """Write the pending tensors as one shard (a shard boundary), streamed from the tensors themselves."""
        if not self._pending:
            return
        path = self.tmp / _shard_name(len(self._shards) + 1)
        with atomic_file(path, overwrite=True) as part:  # our own work-in-progress files
            tensorio.write_file(part, self._pending, metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def commit(self, progress: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Flush, save ``tensors`` (replacing the previous ones), then record ``progress``: each file is
        renamed into place complete, the record last, so a kill at any point leaves a consistent state."""
        if self.resume_key is None:
            self.flush()
            return
        self.flush()
        with atomic_file(self.tmp / STATE_TENSORS, overwrite=True) as part:
            tensorio.write_file(part, tensors or {})
        state = {"shards": self._shards, "total_bytes": self.total_bytes, "progress": progress}
        with atomic_file(self.tmp / STATE_NAME, overwrite=True) as part:
            part.write_text(json.dumps(state))

    def resumed_tensors(self) -> dict[str, torch.Tensor]:
        return tensorio.read_file(self.tmp / STATE_TENSORS)

    def _write_index(self) -> None:
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.tmp / _shard_name(i)).rename(self.tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def write_json(self, name: str, obj: Any) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=2) + "\n")

    def write_text(self, name: str, text: str) -> None:
        """A small text file beside the shards (the model card), published with them."""
        (self.tmp / name).write_text(text, encoding="utf-8")

    def copy_tokenizer(self, src_dir: Path) -> None:
        for name in TOKENIZER_FILES:
            if (src_dir / name).is_file():
                shutil.copyfile(src_dir / name, self.tmp / name)


STATE_NAME = "resume-state.json"
STATE_TENSORS = "resume-tensors.safetensors"


def _shard_name(i: int) -> str:
    return f"model-{i:05d}.safetensors"
