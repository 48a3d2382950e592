"""Import a Gemma 2 / Gemma 3 GGUF as a Hugging Face checkpoint directory.

The output directory holds:
- ``config.json``: ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` in the transformers 4.x flat key style plus
  an explicit ``layer_types`` list (read by 4.x and 5.x alike);
- ``model.safetensors``: float32, HF tensor names in the GGUF's order, every tensor = ``gguf.quants.dequantize``
  of the GGUF data, norm weights with the GGUF +1 removed in float32. Written one tensor at a time, so peak
  memory is about one dequantized tensor, not the whole model;
- ``tokenizer.model``: a SentencePiece BPE ModelProto rebuilt from ``tokenizer.ggml.*``, plus
  ``tokenizer_config.json`` and ``generation_config.json``.

Hyper-parameters missing from the GGUF take llama.cpp's defaults for that architecture, so the HF model means
what llama.cpp would run (attention scale and sliding pattern included: see ``names.GemmaRules``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats.gguf.read import GGUFTensor, hf_values, read_gguf
from quantkit.formats.gguf.vocab import generation_config, sentencepiece_model_bytes, tokenizer_config
from quantkit.io.atomic import ARTIFACT_MARKER, atomic_dir, check_location
from quantkit.io.tensorio import write_stream


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Write the HF checkpoint for a gemma2/gemma3 GGUF to ``out_dir`` (atomically) and return ``out_dir``.

    Raises QuantkitError (one line, naming the file) for a file that is not GGUF, another architecture, a
    non-SentencePiece vocab, missing or mis-shaped tensors, or an untied ``output.weight``."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    src = read_gguf(gguf_path)
    vocab = src.vocab
    need = sum(4 * int(np.prod(t.shape, dtype=np.int64)) for t in src.tensors) + 64 * len(vocab.pieces) + (1 << 20)
    check_location(out_dir.resolve(), str(out_dir), need)
    with atomic_dir(out_dir) as tmp:
        write_model(tmp / "model.safetensors", src.tensors, progress, str(gguf_path))
        (tmp / "tokenizer.model").write_bytes(sentencepiece_model_bytes(vocab))
        _write_json(tmp / "config.json", src.config)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(vocab, src.meta))
        _write_json(tmp / "generation_config.json", generation_config(vocab))
        _write_json(tmp / ARTIFACT_MARKER, {"quantkit_version": __version__, "source": str(gguf_path)})
    return out_dir


def write_model(path: Path, tensors: list[GGUFTensor], progress: bool, source: str = "GGUF") -> None:
    """Stream the HF values of ``tensors`` into one float32 safetensors file, in the GGUF's order."""
    layout = [(t.hf_name, torch.float32, t.shape) for t in tensors]
    bar = _progress_bar(sum(4 * int(np.prod(t.shape, dtype=np.int64)) for t in tensors), progress)

    def values() -> Iterator[torch.Tensor]:
        for t in tensors:
            v = np.ascontiguousarray(hf_values(t, source), dtype="<f4")
            if not np.isfinite(v).all():
                raise QuantkitError(f"{source}: tensor {t.source.name!r} contains NaN or inf values")
            yield torch.from_numpy(v if v.flags.writeable else v.copy())  # a memory-mapped F32 tensor is read-only
            bar.update(v.nbytes)

    try:
        write_stream(path, layout, values(), {"format": "pt"})
    finally:
        bar.close()


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="Dequantizing", disable=not enabled)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
