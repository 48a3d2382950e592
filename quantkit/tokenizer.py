"""SentencePiece tokenizer from a checkpoint's tokenizer.model, with Gemma's BOS rule."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .errors import QuantkitError


class Tokenizer:
    """Encodes text as Gemma does: one ``<bos>`` first, no EOS, special-token text left literal."""

    def __init__(self, path: str | Path, bos_id: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise QuantkitError(f"{path}: tokenizer.model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise QuantkitError(f"{path}: not a SentencePiece model ({e})") from None
        self.bos_id = self.sp.bos_id() if bos_id is None else bos_id
        if self.bos_id < 0:
            raise QuantkitError(f"{path}: the tokenizer defines no BOS token")

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(ids)
