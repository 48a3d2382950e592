"""Rebuild the licence-clean texts shipped under data/ (calibration set and extra evaluation domains) from
files on the development machine: CPython 3.13.0's standard library, headers and pydoc topics (PSF licence)
and Vim 9.0's tutors (Vim licence). No network. Every source file is taken whole and unmodified; a one-line
header names it. data/README.md records what each output holds.

Calibration and evaluation never share a source: the evaluation's code (textwrap, heapq, shlex, fractions),
French tutor and odd-numbered pydoc topics are not in any calibration file.

    python scripts/make_texts.py [--python ~/.pyenv/versions/3.13.0] [--vim /usr/share/vim/vim90]
"""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_PY = ["bisect.py", "colorsys.py", "graphlib.py", "json/encoder.py", "json/decoder.py", "contextlib.py"]
CODE_C = ["listobject.h", "pymacro.h", "cpython/listobject.h", "cpython/unicodeobject.h"]
TUTORS = ["de", "es", "it", "ja", "ru", "zh_cn"]  # not fr: the French tutor is an evaluation text
CHAT_LIMIT = 110_000  # characters of pydoc topics per file (whole topics)


def _whole(path: Path, label: str, comment: str) -> str:
    return f"{comment} ==== {label} ====\n{path.read_text(encoding='utf-8')}\n"


def code(py: Path) -> str:
    lib, inc = py / "lib" / "python3.13", py / "include" / "python3.13"
    parts = [_whole(lib / f, f"CPython 3.13.0 Lib/{f}", "#") for f in CODE_PY]
    parts += [_whole(inc / f, f"CPython 3.13.0 Include/{f}", "//") for f in CODE_C]
    return "".join(parts)


def multilingual(vim: Path) -> str:
    return "".join(_whole(vim / "tutor" / f"tutor.{lang}.utf-8", f"Vim 9.0 tutor.{lang}.utf-8", "#") for lang in TUTORS)


def _turn(topic: str, text: str) -> str:
    """One exchange in Gemma's chat format (the markup as text: what a chat prompt holds)."""
    return (
        f"<start_of_turn>user\nExplain Python's {topic!r} from the language reference.<end_of_turn>\n"
        f"<start_of_turn>model\n{text.strip()}<end_of_turn>\n"
    )


def _stretches(text: str, width: int = 160) -> set[str]:
    """Every ``width``-character stretch of the text with whitespace folded."""
    flat = " ".join(text.split())
    return {flat[i : i + width] for i in range(max(1, len(flat) - width + 1))}


def chat(py: Path, parity: int, avoid: str = "") -> str:
    """Whole pydoc topics, even-numbered (parity 0, calibration) or odd-numbered (1, evaluation) in name order,
    leaving out a topic that shares a 160-character stretch with ``avoid`` (the reference repeats passages:
    'async' and 'compound' both hold the async-with equivalence)."""
    topics = runpy.run_path(str(py / "lib" / "python3.13" / "pydoc_data" / "topics.py"))["topics"]
    seen = " ".join(avoid.split())
    out = ""
    for name in sorted(topics)[parity::2]:
        if len(out) > CHAT_LIMIT:
            break
        if not any(s in seen for s in _stretches(topics[name])):
            out += _turn(name, topics[name])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", type=Path, default=Path.home() / ".pyenv/versions/3.13.0")
    ap.add_argument("--vim", type=Path, default=Path("/usr/share/vim/vim90"))
    a = ap.parse_args()
    calib_chat = chat(a.python, 0)
    outputs = {
        ROOT / "data" / "calib" / "code.txt": code(a.python),
        ROOT / "data" / "calib" / "chat.txt": calib_chat,
        ROOT / "data" / "calib" / "multilingual.txt": multilingual(a.vim),
        ROOT / "data" / "chat.pydoc-topics.excerpt.txt": chat(a.python, 1, avoid=calib_chat),
    }
    for path, text in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
