"""The full WikiText-2 texts for the demo and the benchmarks: ``../shared/data`` beside a source checkout.

The library knows only its shipped excerpts (``quantkit.io.texts``); these scripts pass the full texts
explicitly, and say so when they fall back to the excerpts (a checkout without ``../shared``)."""

from __future__ import annotations

import sys
from pathlib import Path

from quantkit.io.texts import default_calibration_text, default_evaluation_text

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI_VALID = SHARED_DATA / "wikitext-2" / "valid.txt"  # calibration only
WIKI_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"  # evaluation only


def _or_excerpt(full: Path, excerpt: Path) -> Path:
    if full.is_file():
        return full
    print(f"note: {full} not found; using the shipped excerpt {excerpt.name}", file=sys.stderr)
    return excerpt


def calibration_text() -> Path:
    return _or_excerpt(WIKI_VALID, default_calibration_text())


def evaluation_text() -> Path:
    return _or_excerpt(WIKI_TEST, default_evaluation_text())
