"""A saved reference: the unquantized model's log-probabilities in llama-perplexity's ``--kl-divergence-base``
format, so that quantized models are scored without the unquantized weights, by quantkit or by llama.cpp.

The file (llama.cpp tools/perplexity/perplexity.cpp: ``perplexity`` writes it, ``kl_divergence`` reads it),
little-endian, no padding between parts:

    "_logits_"                          8 bytes
    n_ctx                               uint32
    n_vocab, n_chunk                    int32, int32
    tokens                              int32 [n_chunk, n_ctx]   the text's tokens (BOS first), before each
                                                                 chunk's first token is replaced by BOS
    per chunk, per scored position      uint16 [n_ctx - 1 - n_ctx/2, nv], nv = 2*((n_vocab + 1)/2) + 4
      (positions n_ctx/2 .. n_ctx-2)    a row: float32 scale, float32 min_log_prob, then n_vocab codes
                                        (and one zero code when n_vocab is odd)

A row is made from the logits l: max m, floor f = max(min(l), m - 16), scale = (m - f) / 65535,
min_log_prob = f - m - log(sum(exp(l - m))), code_i = round((l_i - f) / scale) where l_i > f, else 0; the
log-probability it stands for is scale * code_i + min_log_prob. llama.cpp's KL divergence skips the terms
whose stored log-probability is -16 or lower (``FLOOR``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.io.atomic import atomic_file

MAGIC = b"_logits_"
HEADER = struct.Struct("<8sIii")  # magic, n_ctx, n_vocab, n_chunk
FLOOR = -16.0  # llama.cpp's KL divergence leaves out base log-probabilities <= FLOOR
_SPAN = np.float32(16.0)  # codes cover [max - 16, max] of the logits
_LEVELS = np.float32(65535.0)


def row_width(n_vocab: int) -> int:
    """uint16 values per scored position: two float32 (4 values) and the codes, padded to an even count."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored_positions(n_ctx: int) -> int:
    """Scored positions per chunk: n_ctx/2 .. n_ctx-2 (predicting tokens n_ctx/2+1 .. n_ctx-1)."""
    return n_ctx - 1 - n_ctx // 2


def file_size(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    """The exact size in bytes of a file with these counts."""
    return HEADER.size + 4 * n_chunk * n_ctx + 2 * n_chunk * scored_positions(n_ctx) * row_width(n_vocab)


def encode_rows(logits: torch.Tensor) -> np.ndarray:
    """[S, V] logits -> [S, nv] uint16 rows, the arithmetic of llama.cpp's ``log_softmax`` (float32, rounding
    half to even as its ``nearest_int``; the sum of exponentials in float32 pairwise sums where llama.cpp adds
    them one by one in float64: the same to float32 precision)."""
    x = logits.detach().to("cpu", torch.float32)
    s, v = x.shape
    mx = x.amax(-1, keepdim=True)
    mn = torch.maximum(x.amin(-1, keepdim=True), mx - float(_SPAN))
    lse = (x - mx).exp_().sum(-1, keepdim=True).log_()
    min_log_prob = (mn - mx) - lse
    scale = (mx - mn) / float(_LEVELS)
    inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    codes = (x - mn).mul_(inv).round_().clamp_(0, float(_LEVELS))  # l <= floor: 0; the top rounds to 65535
    out = np.zeros((s, row_width(v)), dtype="<u2")
    heads = out.view("<f4")  # [S, nv/2]
    heads[:, 0], heads[:, 1] = scale[:, 0].numpy(), min_log_prob[:, 0].numpy()
    out[:, 4 : 4 + v] = codes.numpy()
    return out


def decode_rows(rows: np.ndarray, n_vocab: int) -> torch.Tensor:
    """[S, nv] uint16 rows -> [S, V] float32 log-probabilities (scale * code + min_log_prob)."""
    heads = torch.from_numpy(np.ascontiguousarray(rows).view("<f4")[:, :2].copy())  # [S, 2]
    codes = torch.from_numpy(rows[:, 4 : 4 + n_vocab]).to(torch.float32)
    return codes.mul_(heads[:, :1]).add_(heads[:, 1:2])


@dataclass(frozen=True)
class Reference:
    """An opened reference file: its counts, its tokens [n_chunk, n_ctx], and where the rows begin."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # [n_chunk, n_ctx] int64

    @property
    def data_offset(self) -> int:
        return HEADER.size + 4 * self.n_chunk * self.n_ctx

    def chunk_bytes(self) -> int:
        return 2 * scored_positions(self.n_ctx) * row_width(self.n_vocab)

    def log_probs(self, start: int, stop: int) -> torch.Tensor:
        """Stored log-probabilities [stop - start, S, V] of chunks start .. stop-1."""
        s, nv = scored_positions(self.n_ctx), row_width(self.n_vocab)
        out = []
        with open(self.path, "rb") as f:
            f.seek(self.data_offset + start * self.chunk_bytes())
            for c in range(start, stop):
                raw = bytearray(self.chunk_bytes())  # writable: torch shares it
                if f.readinto(raw) != len(raw):
                    raise QuantkitError(f"{self.path}: reference file ends inside chunk {c} (it changed meanwhile?)")
                rows = np.frombuffer(raw, dtype="<u2").reshape(s, nv)
                _check_heads(rows.view("<f4")[:, :2], self.n_vocab, f"{self.path}: chunk {c}")
                out.append(decode_rows(rows, self.n_vocab))
        return torch.stack(out)


def _check_heads(heads: np.ndarray, n_vocab: int, where: str) -> None:
    """Refuse a row's (scale, min_log_prob) that no logits give: 0 <= scale <= 16/65535 and
    -16 - log(n_vocab) <= min_log_prob <= 0 (a small margin for float32 rounding)."""
    scale, low = heads[:, 0], heads[:, 1]
    top = float(_SPAN / _LEVELS) * 1.001
    bottom = -float(_SPAN) - np.log(n_vocab) - 0.01
    if not (np.isfinite(heads).all() and (scale >= 0).all() and (scale <= top).all()):
        raise QuantkitError(f"{where}: a row's scale is not in [0, 16/65535] (damaged reference file)")
    if not ((low >= bottom).all() and (low <= 1e-4).all()):
        raise QuantkitError(f"{where}: a row's minimum log-probability is not in [{bottom:.2f}, 0] (damaged file)")


def read_reference(path: str | Path) -> Reference:
    """Open a reference file (llama-perplexity's or quantkit's): the header's counts are checked against the
    file's size before anything is allocated from them, the tokens against the vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"{path}: reference file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) < HEADER.size or head[:8] != MAGIC:
            raise QuantkitError(f"{path}: not a llama-perplexity log-probability file (no '_logits_' header)")
        _, n_ctx, n_vocab, n_chunk = HEADER.unpack(head)
        _check_counts(path, n_ctx, n_vocab, n_chunk, size)
        tokens = _read_tokens(f, path, n_chunk * n_ctx)
    if tokens.min() < 0 or tokens.max() >= n_vocab:
        raise QuantkitError(f"{path}: holds token ids outside the vocabulary of {n_vocab}")
    return Reference(path, n_ctx, n_vocab, n_chunk, tokens.astype(np.int64).reshape(n_chunk, n_ctx))


def _check_counts(path: Path, n_ctx: int, n_vocab: int, n_chunk: int, size: int) -> None:
    if n_ctx < 4 or n_vocab < 1 or n_chunk < 1:
        raise QuantkitError(f"{path}: n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}: not a reference's counts")
    want = file_size(n_ctx, n_vocab, n_chunk)
    if want != size:
        raise QuantkitError(
            f"{path}: n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk} make {want} bytes but the file has "
            f"{size} (truncated or damaged)"
        )


def _read_tokens(f: BinaryIO, path: Path, count: int) -> np.ndarray:
    raw = f.read(4 * count)
    if len(raw) != 4 * count:
        raise QuantkitError(f"{path}: reference file ends inside its tokens")
    return np.frombuffer(raw, dtype="<i4")


def check_tokens(ref: Reference, tokens: torch.Tensor, what: str) -> None:
    """Refuse a reference whose tokens are not ``tokens`` [n, ctx] (the text as the tokenizer cuts it, BOS
    first, before chunk starts become BOS), for its first n chunks."""
    n, ctx = tokens.shape
    if ctx != ref.n_ctx:
        raise QuantkitError(f"{ref.path}: computed with ctx {ref.n_ctx}, not {ctx} (drop --ctx or pass {ref.n_ctx})")
    if n > ref.n_chunk:
        raise QuantkitError(f"{ref.path}: holds {ref.n_chunk} chunks, fewer than the {n} asked for (lower --chunks)")
    mine = ref.tokens[:n]
    if not np.array_equal(mine, tokens.numpy()):
        c, p = np.argwhere(mine != tokens.numpy())[0]
        raise QuantkitError(
            f"{ref.path}: its tokens differ from {what} (first at chunk {c}, position {p}): another text, "
            "tokenizer or --ctx made it"
        )


class ReferenceWriter:
    """Writes a reference file chunk by chunk; see ``writing``."""

    def __init__(self, f: BinaryIO, tokens: torch.Tensor, n_vocab: int):
        n, ctx = tokens.shape
        if tokens.min() < 0 or tokens.max() >= n_vocab:
            raise QuantkitError(f"token ids outside the vocabulary of {n_vocab}: cannot save a reference")
        f.write(HEADER.pack(MAGIC, ctx, n_vocab, n))
        f.write(tokens.numpy().astype("<i4").tobytes())
        self.f, self.remaining, self.n_vocab = f, n, n_vocab

    def add(self, logits: torch.Tensor) -> None:
        """logits [B, S, V] of the scored positions of the next B chunks (soft-capped, as the model outputs)."""
        for chunk in logits:
            self.f.write(encode_rows(chunk).data)
        self.remaining -= len(logits)


@contextmanager
def writing(path: str | Path, tokens: torch.Tensor, n_vocab: int) -> Iterator[ReferenceWriter]:
    """A reference file for ``tokens`` [n_chunk, n_ctx] (the text's tokens, not yet with BOS at each chunk's
    start), written under a temporary name and published when every chunk has been added."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        w = ReferenceWriter(f, tokens, n_vocab)
        yield w
        if w.remaining != 0:
            raise RuntimeError(f"reference writer: {w.remaining} chunks missing")
        f.flush()
        os.fsync(f.fileno())
