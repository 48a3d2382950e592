"""Token streams for calibration (random windows of a calibration text) and evaluation (llama-perplexity
chunks of an evaluation text). Calibrate on WikiText-2 validation, evaluate on WikiText-2 test: never both."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.io.tokenizer import Tokenizer


def read_text(path: str | Path, what: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"{path}: {what} file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuantkitError(f"{path}: {what} file is not UTF-8 text") from None
    if not text.strip():
        raise QuantkitError(f"{path}: {what} file is empty")
    return text


def calibration_windows(tok: Tokenizer, path: str | Path, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows [N, seqlen] of the tokenized text, each starting with BOS (seeded)."""
    ids = torch.tensor(tok.encode(read_text(path, "calibration"), bos=False), dtype=torch.long)
    span = seqlen - 1
    if len(ids) <= span:
        raise QuantkitError(f"{path}: calibration text has {len(ids)} tokens, need more than {span}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - span, (nsamples,), generator=g)
    windows = torch.stack([ids[s : s + span] for s in starts.tolist()])
    bos = torch.full((nsamples, 1), tok.bos_id, dtype=torch.long)
    return torch.cat([bos, windows], dim=1)


def text_tokens(tok: Tokenizer, path: str | Path, ctx: int, max_chunks: int | None = None) -> torch.Tensor:
    """The text's tokens cut as llama-perplexity cuts them [n_chunk, ctx]: the whole text tokenized once with
    BOS (after removing one trailing newline), the first n_chunk * ctx tokens (what its reference file holds)."""
    text = read_text(path, "evaluation")
    if text.endswith("\n"):
        text = text[:-1]
    ids = torch.tensor(tok.encode(text, bos=True), dtype=torch.long)
    if len(ids) < 2 * ctx:
        raise QuantkitError(f"{path}: {len(ids)} tokens; need at least 2*ctx = {2 * ctx}")
    n = len(ids) // ctx if max_chunks is None else min(max_chunks, len(ids) // ctx)
    return ids[: n * ctx].reshape(n, ctx).clone()


def with_bos(tokens: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Chunks [n, ctx] as they are evaluated: each one's first token replaced by BOS."""
    chunks = tokens.clone()
    chunks[:, 0] = bos_id
    return chunks


def perplexity_chunks(tok: Tokenizer, path: str | Path, ctx: int, max_chunks: int | None = None) -> torch.Tensor:
    """llama-perplexity's chunks [n_chunk, ctx]: ``text_tokens``, each chunk's first token replaced by BOS."""
    return with_bos(text_tokens(tok, path, ctx, max_chunks), tok.bos_id)


# packaged name -> top-level directory of the source tree (pyproject.toml maps one onto the other)
_SHIPPED = {"recipes": "recipes", "texts": "data"}


def shipped(name: str) -> Path:
    """A directory shipped with quantkit: ``quantkit/NAME`` inside an installed wheel, else its top-level
    source directory (a source checkout, or an editable install, which maps nothing into the package)."""
    inside = resources.files("quantkit") / name
    if inside.is_dir():
        return Path(str(inside))
    return Path(__file__).resolve().parents[2] / _SHIPPED[name]


def default_calibration_text() -> Path:
    """The WikiText-2 validation excerpt shipped with quantkit (pass ``--calib`` for the full text)."""
    return shipped("texts") / "wiki.valid.excerpt.txt"


def default_evaluation_text() -> Path:
    """The WikiText-2 test (raw) excerpt shipped with quantkit (pass ``--dataset`` for the full text)."""
    return shipped("texts") / "wiki.test.excerpt.raw"


# --dataset NAME: evaluation texts shipped with quantkit (data/README.md says where each comes from)
SHIPPED_TEXTS = {
    "wiki": "wiki.test.excerpt.raw",
    "code": "code.cpython-lib.excerpt.txt",
    "fr": "fr.vim-tutor.excerpt.txt",
    "chat": "chat.pydoc-topics.excerpt.txt",
}


def resolve_dataset(spec: str) -> tuple[str, Path]:
    """(label, path) of a ``--dataset`` value: ``NAME=PATH`` labels PATH; a shipped text's name (``wiki``,
    ``code``, ...) selects it; anything else is a path, labelled by its file name."""
    label, sep, rest = spec.partition("=")
    if sep and label and "/" not in label:
        if not rest:
            raise QuantkitError(f"--dataset {spec}: no path after '=' (NAME=PATH)")
        return label, Path(rest)
    if spec in SHIPPED_TEXTS:
        return spec, shipped("texts") / SHIPPED_TEXTS[spec]
    return Path(spec).name or spec, Path(spec)
