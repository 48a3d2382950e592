"""Calibration importance as a llama.cpp importance-matrix ("imatrix") file, so that users of
``llama-quantize --imatrix`` can reuse quantkit's calibration.

The statistic is the one llama.cpp collects: for every linear weight, the sum over calibration tokens of the
squared input activation of each input column (``in_sum2``, length I) and the number of tokens summed
(``counts``); llama-quantize divides the two. GPTQ's Hessian carries the same numbers on its diagonal:
H = (2/n) Σ x xᵀ, so in_sum2 = diag(H) · n / 2.

File layout (llama.cpp's GGUF imatrix): ``general.type`` = "imatrix", ``imatrix.datasets`` (string array),
``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32; llama-quantize refuses a file without these three),
and per weight two F32 tensors named after the GGUF weight: ``blk.0.attn_q.weight.in_sum2`` [I] and
``blk.0.attn_q.weight.counts`` [1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.names import LAYER_TENSORS
from quantkit.formats.gguf.read import open_gguf
from quantkit.io.atomic import atomic_file


@dataclass
class ImportanceStats:
    """Running per-column Σx² and token count for each linear, keyed by GGUF weight name."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]

    @classmethod
    def empty(cls) -> ImportanceStats:
        return cls({}, {})

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """As tensors to save with a run's resumable state (``from_tensors`` reads them back)."""
        out = {f"imatrix/{n}": torch.from_numpy(v) for n, v in self.sums.items()}
        return out | {f"imatrix-count/{n}": torch.tensor([c], dtype=torch.int64) for n, c in self.counts.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ImportanceStats:
        sums = {k.removeprefix("imatrix/"): v.numpy() for k, v in tensors.items() if k.startswith("imatrix/")}
        counts = {
            k.removeprefix("imatrix-count/"): int(v[0]) for k, v in tensors.items() if k.startswith("imatrix-count/")
        }
        return cls(sums, counts)

    def add_from_hessian(self, layer: int, module: str, H: torch.Tensor, n_rows: int) -> None:
        """Record linear ``module`` (e.g. 'self_attn.q_proj') of ``layer`` from its Hessian (2/n) Σ x xᵀ."""
        name = gguf_weight_name(layer, module)
        self.sums[name] = (torch.diagonal(H).double().cpu().numpy() * (n_rows / 2.0)).astype(np.float32)
        self.counts[name] = n_rows


def gguf_weight_name(layer: int, module: str) -> str:
    return f"blk.{layer}.{LAYER_TENSORS[module]}.weight"


def write_imatrix(path: str | Path, stats: ImportanceStats, dataset: str, chunk_size: int) -> Path:
    """Write ``stats`` as a GGUF imatrix at ``path`` (atomically). ``chunk_size``: tokens per calibration
    sequence; the chunk count is the largest token count divided by it."""
    if not stats.sums:
        raise QuantkitError(f"{path}: no importance statistics were collected (is the method gptq?)")
    path = Path(path)
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [dataset])
        w.add_uint32("imatrix.chunk_count", max(stats.counts.values()) // max(chunk_size, 1))
        w.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(stats.sums):
            w.add_tensor(f"{name}.in_sum2", stats.sums[name].reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[stats.counts[name]]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


@dataclass(frozen=True)
class Importance:
    """An importance-matrix file as llama-quantize loads it: GGUF weight name -> in_sum2 / counts per input
    column (float32 [I]; all ones where the count is 0), its datasets and chunk count."""

    path: str
    vectors: dict[str, np.ndarray]
    datasets: tuple[str, ...]
    chunk_count: int

    def for_tensor(self, name: str, row_len: int) -> np.ndarray | None:
        """The importance of GGUF weight ``name`` (rows of ``row_len``), None where the file has none. A vector
        of another length is an error, except for the token embedding, which goes without one (llama-quantize)."""
        v = self.vectors.get(name)
        if v is None or v.size == row_len:
            return v
        if name.startswith("token_embd"):
            return None
        raise QuantkitError(f"{self.path}: imatrix size {v.size} is different from tensor size {row_len} for {name}")


def _field(reader: gguf.GGUFReader, key: str) -> object:
    f = reader.fields.get(key)
    try:
        return None if f is None else f.contents()
    except (UnicodeDecodeError, ValueError, IndexError):
        return None


def load_imatrix(path: str | Path) -> Importance:
    """Read a GGUF imatrix as llama-quantize does (counts rounded to integers, in_sum2 / count in float32); a
    file that is not one, or lacks the metadata llama-quantize requires, is refused in one line."""
    reader = open_gguf(Path(path))
    if _field(reader, "general.type") != "imatrix":
        raise QuantkitError(f"{path}: not an importance-matrix GGUF (general.type is not 'imatrix')")
    datasets, chunks = _field(reader, "imatrix.datasets"), _field(reader, "imatrix.chunk_count")
    if not isinstance(datasets, list) or chunks is None or _field(reader, "imatrix.chunk_size") is None:
        raise QuantkitError(f"{path}: missing imatrix metadata (imatrix.datasets, chunk_count, chunk_size)")
    tensors = {}
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise QuantkitError(f"{path}: tensor {t.name!r} is {t.tensor_type.name}, an imatrix holds F32 only")
        tensors[t.name] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    out = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors.get(f"{base}.counts")
        if counts is None or counts.size != 1 or not np.isfinite(counts[0]) or counts[0] < 0:
            raise QuantkitError(f"{path}: {base!r} needs a non-negative {base + '.counts'!r} beside its in_sum2")
        if not np.all(np.isfinite(sums)) or np.any(sums < 0):
            raise QuantkitError(f"{path}: {name!r} holds negative or non-finite sums of squares")
        count = np.float32(np.floor(float(counts[0]) + 0.5))  # C: (float) std::lround(count)
        out[base] = sums / count if count > 0 else np.ones_like(sums)
    return Importance(str(path), out, tuple(str(d) for d in datasets), int(chunks))


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """GGUF weight name -> mean squared activation per input column (in_sum2 / counts), as llama-quantize
    reads it. A file that is not such an importance matrix is refused in one line."""
    return load_imatrix(path).vectors
