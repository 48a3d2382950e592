"""What a ladder is: its types, one job per type, and the settings that make a directory the same ladder.

A ladder directory holds ``quantkit.json`` (the marker every quantkit output carries) with ``"kind":
"ladder"`` and the settings that decide its files' bytes: the model (its path and the identity of its
files), the method, the calibration (text digest and options) and the torch threads per job. A rerun with
the same settings finishes the types that are missing; a directory of other settings, or one that is not a
ladder, is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats.gguf.policy import FILE_TYPES
from quantkit.io.atomic import ARTIFACT_MARKER, atomic_file
from quantkit.io.checkpoint import Checkpoint
from quantkit.quant.recipes import QuantizeOptions, gguf_defaults

FLOAT_TYPES = ("f32", "f16", "bf16")  # nothing to calibrate: always the plain export
MARKER_KIND = "ladder"


def supported_types() -> list[str]:
    """Every type ``quantize --format gguf`` / ``export`` writes: formats.gguf.policy.FILE_TYPES."""
    return list(FILE_TYPES)


def parse_types(text: str) -> tuple[str, ...]:
    """'q8_0, Q4_K_M' -> ('q8_0', 'q4_k_m'); unknown (e.g. i-quants), repeated or no types are refused."""
    types = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    if not types:
        raise QuantkitError("--types: name at least one type (e.g. --types q8_0,q4_k_m)")
    for t in types:
        if t not in FILE_TYPES:
            raise QuantkitError(f"--types {t}: not supported (supported: {', '.join(supported_types())})")
    repeated = sorted({t for t in types if types.count(t) > 1})
    if repeated:
        raise QuantkitError(f"--types: {', '.join(repeated)} named more than once")
    return types


@dataclass(frozen=True)
class TypeJob:
    """One type of a ladder: what ``quantize --format gguf`` (method "gptq") or ``export`` (method
    "export") command it equals, and the torch threads it runs with."""

    model: str  # absolute path of the unquantized model directory
    qtype: str
    method: str  # "gptq" | "export"
    opts: QuantizeOptions
    threads: int
    file_name: str


def file_name(model: Path, qtype: str) -> str:
    """'gemma-3-270m' + 'q4_k_m' -> 'gemma-3-270m-Q4_K_M.gguf' (the Hub's naming)."""
    return f"{model.name}-{qtype.upper()}.gguf"


def plan_jobs(model: Path, types: tuple[str, ...], method: str, opts: QuantizeOptions, threads: int) -> list[TypeJob]:
    """One job per type: GPTQ into the type's blocks where there is a grid to calibrate (with the type's
    defaults, ``gguf_defaults``), else the export."""
    model = model.resolve()
    return [
        TypeJob(
            model=str(model),
            qtype=t,
            method="gptq" if method == "gptq" and t not in FLOAT_TYPES else "export",
            opts=opts.replace(**gguf_defaults(t)),
            threads=threads,
            file_name=file_name(model, t),
        )
        for t in types
    ]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ladder_settings(ckpt: Checkpoint, method: str, opts: QuantizeOptions, calib: bytes | None, threads: int) -> dict:
    """Everything that decides a ladder's files besides the type (a rerun continues only when equal)."""
    files = [ckpt.path / n for n in ("config.json", "tokenizer.model", *ckpt.headers)]
    ident = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
    settings: dict[str, Any] = {"model": str(ckpt.path.resolve()), "model_files": ident, "method": method}
    if method == "gptq":
        options = {k: v for k, v in opts.__dict__.items() if k != "calib"}
        settings["calibration"] = {"text_sha256": digest(calib or b""), **options}
        settings["threads"] = threads
    settings["quantkit_version"] = __version__
    return settings


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / ARTIFACT_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    diff = [k for k in keys if k != "calibration" and old.get(k) != new.get(k)]
    oc, nc = old.get("calibration") or {}, new.get("calibration") or {}
    return diff + [f"calibration.{k}" for k in sorted(set(oc) | set(nc)) if oc.get(k) != nc.get(k)]


def check_ladder_dir(out: Path, settings: dict) -> bool:
    """Whether ``out`` is already this ladder (True), or absent / empty (False); anything else is refused."""
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"{out}: is a file (name a directory for the ladder)")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    marker = _read_marker(out)
    if marker is None or marker.get("kind") != MARKER_KIND:
        raise QuantkitError(f"{out}: not empty and not a quantkit ladder (choose a new directory)")
    diff = _differences(marker.get("settings", {}), settings)
    if diff:
        raise QuantkitError(
            f"{out}: a ladder of other settings (differs in {', '.join(diff)}); rerun it with its own settings "
            "or choose a new directory"
        )
    return True


def write_marker(out: Path, settings: dict) -> None:
    """Make ``out`` a ladder of ``settings`` (its marker, written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / ARTIFACT_MARKER, overwrite=False) as tmp:
        tmp.write_text(json.dumps({"kind": MARKER_KIND, "settings": settings}, indent=2))
