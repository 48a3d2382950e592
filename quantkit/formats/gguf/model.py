"""A GGUF file read as a dense model, so that eval-ppl can score it beside packed artifacts.

The file is opened with gguf-py's memory-mapped reader and checked exactly as ``import-gguf`` checks it
(architecture, vocab, names, shapes); nothing is written. Each tensor is dequantized when the evaluator asks
for it (one decoder layer at a time), with the GGUF's ``1 + w`` norms turned back into HF's ``w``. The
object offers the read-only part of ``checkpoint.Checkpoint`` that the evaluator uses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.read import hf_values, read_gguf
from quantkit.io.config import ModelConfig, config_from_dict
from quantkit.io.layout import layer_members
from quantkit.io.tensorio import all_finite

# Fields a GGUF cannot carry exactly (or that do not change the forward pass): ignored when a GGUF is
# compared with the HF model it was made from.
_UNSTORED = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "max_position_embeddings")


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def same_forward(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether two configs describe the same forward pass (token ids and dtype aside)."""
    blank = dict.fromkeys(_UNSTORED, None)
    return dataclasses.replace(a, **blank) == dataclasses.replace(b, **blank)


class GGUFModel:
    """A Gemma 2/3 GGUF as a dense, lazily dequantized checkpoint (fp32 values, HF names)."""

    quant_spec = None  # the evaluator treats it as a dense model

    def __init__(self, path: str | Path):
        self.path = Path(path)
        src = read_gguf(self.path)
        self.config: ModelConfig = config_from_dict(src.config, str(self.path))
        self.raw_config = src.config
        self._tensors = {t.hf_name: t for t in src.tensors}
        self.types = {name: t.source.tensor_type.name for name, t in self._tensors.items()}
        self.arch: str = src.rules.gguf_arch
        self._file = src  # keeps the memory map alive

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def is_linear_quantized(self, name: str) -> bool:
        return False

    def has_blocks(self, name: str) -> bool:
        return False

    def get(self, name: str, dtype: torch.dtype | None = None, check_finite: bool = False) -> torch.Tensor:
        if name not in self._tensors:
            raise QuantkitError(f"{self.path}: tensor {name!r} not in the GGUF")
        t = torch.from_numpy(
            np.array(hf_values(self._tensors[name], str(self.path)), dtype=np.float32)
        )  # copy: read-only map
        if check_finite and not all_finite(t):
            raise QuantkitError(f"{self.path}: tensor {name!r} contains NaN or inf values")
        return t if dtype is None else t.to(dtype)

    def layer_tensors(
        self, i: int, dtype: torch.dtype | None = None, exclude: set[str] = frozenset(), check_finite: bool = False
    ) -> dict[str, torch.Tensor]:
        return {k: self.get(n, dtype, check_finite) for k, n in layer_members(self._tensors, i, exclude).items()}

    def num_parameters(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self._tensors.values())

    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def linear_bits_per_weight(self) -> float:
        """Bits per weight of the decoder-layer linears (their stored bytes, block scales included)."""
        linear = [t for n, t in self._tensors.items() if n.startswith("model.layers.") and len(t.shape) == 2]
        n_bytes = sum(int(t.source.n_bytes) for t in linear)
        return 8 * n_bytes / sum(int(np.prod(t.shape)) for t in linear)
