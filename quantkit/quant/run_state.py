"""A quantize run's resumable state: where it starts, what it has recorded, and the key that decides whether
a rerun may continue it.

Output goes to a hidden ``.NAME.partial`` directory, and after each layer its tensors (whole shards) and,
for GPTQ, the next layer's inputs are on disk together with a record of the layers done. A run that was
killed outright (SIGKILL, power loss) and is started again with the same command and input (the same
resume key) continues at the next layer and ends with the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from quantkit import __version__
from quantkit.formats.gguf.imatrix import ImportanceStats
from quantkit.formats.packed.write import ArtifactWriter
from quantkit.io.calibration import calibration_files
from quantkit.io.checkpoint import Checkpoint
from quantkit.quant.memory import peak_gpu_bytes, peak_rss_gib
from quantkit.quant.recipes import QuantizeOptions


class RunState:
    """Where a run starts (0, or the layer a killed run had reached) and what it has recorded so far."""

    def __init__(self, writer: ArtifactWriter, device: str, imatrix: bool = False):
        self.device = device
        done = writer.resumed or {}
        self.start: int = done.get("layers_done", 0)
        self.stats: dict[str, dict[str, Any]] = done.get("stats", {})  # per linear path, e.g. weight_rel_err
        self.layers: list[dict[str, Any]] = done.get("layers", [])  # per layer: seconds and memory
        self.imatrix = None  # the importance statistics so far, when an imatrix is written
        if imatrix:
            self.imatrix = ImportanceStats.from_tensors(writer.resumed_tensors() if self.start else {})

    def end_layer(
        self,
        writer: ArtifactWriter,
        i: int,
        seconds: dict[str, Any] | None = None,
        inputs: list[torch.Tensor] | None = None,
        fp: list[torch.Tensor] | None = None,
    ) -> None:
        """Layer i is complete: its tensors go to disk as whole shards, with the next layer's inputs
        (``inputs``) and, with fp_targets, the unquantized model's hidden states (``fp``)."""
        self.layers.append({"layer": i, **(seconds or {}), "peak_rss_gib": peak_rss_gib()})
        gpu = peak_gpu_bytes(self.device)
        if gpu is not None:
            self.layers[-1]["peak_gpu_gib"] = round(gpu / 2**30, 3)
        progress = {"layers_done": i + 1, "stats": self.stats, "layers": self.layers}
        saved = {} if inputs is None else {f"b{j:05d}": h for j, h in enumerate(inputs)}
        saved |= {} if fp is None else {f"f{j:05d}": h for j, h in enumerate(fp)}
        writer.commit(progress, saved | ({} if self.imatrix is None else self.imatrix.to_tensors()))

    @staticmethod
    def saved_inputs(writer: ArtifactWriter, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The next layer's inputs and the unquantized model's hidden states (empty without fp_targets) that
        ``end_layer`` saved, one [B, T, H] per batch."""
        saved = writer.resumed_tensors()
        inputs = [saved[k].to(device) for k in sorted(saved) if k.startswith("b")]
        fp = [saved[k].to(device) for k in sorted(saved) if k.startswith("f")]
        return inputs, fp


def resume_key(ckpt: Checkpoint, opts: QuantizeOptions, sdt: torch.dtype, device: str, *target: Any) -> str:
    """A hash of everything that decides the output: options, device, quantkit's version, and the identity
    (name, size, modification time) of every input file. A rerun resumes only when it is unchanged."""
    files = [ckpt.path / n for n in ("config.json", "tokenizer.model", *ckpt.headers)]
    if opts.method == "gptq":
        files.extend(calibration_files(opts.calib))
    ident = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    blob = {"version": __version__, "options": opts.__dict__, "sdt": str(sdt), "device": device, "files": ident,
            "target": target}  # fmt: skip
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
