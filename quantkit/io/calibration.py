"""Calibration sets: the texts GPTQ's calibration windows are drawn from, and in what proportion.

A set is written as one string, the value of ``--calib`` (given several times, the values are joined with
commas): comma-separated sources, each ``SOURCE[:WEIGHT]``. A SOURCE is a text file, or the name of a text
shipped with quantkit (``wiki``, ``code``, ``chat``, ``multilingual``), or ``mix``, all four with weight 1.
The windows are split among the sources in proportion to their weights (largest remainders; ties to the
earlier source) and drawn from each as from a single text, with seed ``seed + index``. One source gives
exactly the windows of that text alone, so a set of one is the old single-file calibration.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.io.texts import calibration_windows, read_text, shipped
from quantkit.io.tokenizer import Tokenizer

# name -> file under the shipped texts (data/README.md says where each comes from; none is an evaluation text)
SHIPPED_CALIB = {
    "wiki": "wiki.valid.excerpt.txt",
    "code": "calib/code.txt",
    "chat": "calib/chat.txt",
    "multilingual": "calib/multilingual.txt",
}
SHIPPED_SETS = {"mix": ("wiki", "code", "chat", "multilingual")}
# chosen for the worst domain (docs/calibration.md): calibrated on WikiText alone, quantkit's GPTQ Q4_0 of the 270M
# had 1.20x llama-quantize + imatrix's KLD on French and 1.06x on code; on the mix, 0.74x at worst
DEFAULT_CALIB = "mix"


@dataclass(frozen=True)
class CalibSource:
    label: str  # the shipped name, or the file's name
    path: Path
    weight: float


def _source(item: str) -> list[CalibSource]:
    name, sep, w = item.rpartition(":")
    weight = 1.0
    if sep and name and not Path(item).is_file():
        try:
            weight = float(w)
        except ValueError:
            name = item
        else:
            if not (math.isfinite(weight) and weight > 0):
                raise QuantkitError(f"--calib {item}: the weight after ':' must be a positive number")
    else:
        name = item
    if name in SHIPPED_SETS:
        return [s for n in SHIPPED_SETS[name] for s in _source(f"{n}:{weight}")]
    if name in SHIPPED_CALIB and not Path(name).is_file():
        return [CalibSource(name, shipped("texts") / SHIPPED_CALIB[name], weight)]
    return [CalibSource(Path(name).name, Path(name), weight)]


def calibration_sources(spec: str | None) -> list[CalibSource]:
    """The sources of a ``--calib`` value (None: ``DEFAULT_CALIB``, the shipped mix)."""
    items = [s.strip() for s in (spec or DEFAULT_CALIB).split(",")]
    if not all(items):
        raise QuantkitError(f"--calib {spec!r}: an empty source between commas")
    sources = [s for item in items for s in _source(item)]
    if len({s.path.resolve() for s in sources}) != len(sources):
        raise QuantkitError(f"--calib {spec!r}: a text is named twice (give it one weight)")
    return sources


def check_sources(spec: str | None) -> list[CalibSource]:
    """The sources, each checked to be a readable, non-empty UTF-8 text (one-line errors otherwise)."""
    sources = calibration_sources(spec)
    for s in sources:
        read_text(s.path, "calibration")
    return sources


def split_samples(weights: list[float], n: int) -> list[int]:
    """``n`` windows in proportion to ``weights``: floors, then one more to the largest remainders."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def calibration_set_windows(tok: Tokenizer, spec: str | None, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] calibration windows, each starting with BOS, source after source."""
    sources = check_sources(spec)
    counts = split_samples([s.weight for s in sources], nsamples)
    parts = [
        calibration_windows(tok, s.path, c, seqlen, seed + i)
        for i, (s, c) in enumerate(zip(sources, counts, strict=True))
        if c
    ]
    return torch.cat(parts)


def calibration_label(spec: str | None) -> str:
    """What the set is called in metadata and cards: sources by name (never a local path) with weights."""
    return ",".join(s.label if s.weight == 1 else f"{s.label}:{s.weight:g}" for s in calibration_sources(spec))


def calibration_files(spec: str | None) -> list[Path]:
    return [s.path for s in calibration_sources(spec)]


def calibration_digest(spec: str | None) -> str:
    """sha256 over every source's name, weight and bytes: what a ladder's resume key records."""
    h = hashlib.sha256()
    for s in check_sources(spec):
        h.update(f"{s.label}:{s.weight!r}\n".encode())
        h.update(s.path.read_bytes())
    return h.hexdigest()
