"""SentencePiece tokenizer from a checkpoint's tokenizer.model, with Gemma's BOS rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sentencepiece as spm

from quantkit.errors import QuantkitError
from quantkit.io.config import read_json_object


class Tokenizer:
    """Encodes text as Gemma does: one ``<bos>`` first, no EOS, special-token text left literal."""

    def __init__(self, path: str | Path, bos_id: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise QuantkitError(f"{path}: tokenizer.model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError, UnicodeDecodeError) as e:
            raise QuantkitError(f"{path}: not a SentencePiece model ({' '.join(str(e).split())})") from None
        for i in range(self.sp.GetPieceSize()):  # every piece is text: the exporters read them all
            try:
                self.sp.IdToPiece(i)
            except UnicodeDecodeError:
                raise QuantkitError(f"{path}: piece {i} is not UTF-8 text (a damaged tokenizer.model)") from None
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


def _json_object(path: Path) -> dict[str, Any] | None:
    return read_json_object(path) if path.is_file() else None


def _token_text_ok(value: Any) -> bool:
    return (
        value is None or isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))
    )


def check_tokenizer_files(model_dir: str | Path, vocab_size: int) -> None:
    """tokenizer.model loads and fits the embedding; tokenizer_config.json and added_tokens.json, when present,
    hold what the exporters read, with ids inside the vocabulary."""
    model_dir = Path(model_dir)
    tok = Tokenizer(model_dir / "tokenizer.model")
    if tok.vocab_size > vocab_size:
        raise QuantkitError(
            f"{model_dir / 'tokenizer.model'}: {tok.vocab_size} pieces but config.json vocab_size is {vocab_size} "
            "(the tokenizer does not belong to this model)"
        )
    added = _json_object(model_dir / "added_tokens.json") or {}
    for text, i in added.items():
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise QuantkitError(f"{model_dir / 'added_tokens.json'}: {text!r} maps to {i!r}, not a token id")
    config = _json_object(model_dir / "tokenizer_config.json") or {}
    path = model_dir / "tokenizer_config.json"
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise QuantkitError(f"{path}: added_tokens_decoder is not an object")
    for key, entry in decoder.items():
        if not key.isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise QuantkitError(f"{path}: added_tokens_decoder entry {key!r} needs a numeric id and a 'content' text")
    for role in ("bos", "eos", "unk", "pad"):
        if not _token_text_ok(config.get(f"{role}_token")):
            raise QuantkitError(f"{path}: {role}_token is {config.get(role + '_token')!r}, not a token text")
    for key in ("add_bos_token", "add_eos_token"):
        if key in config and not isinstance(config[key], bool):
            raise QuantkitError(f"{path}: {key} is {config[key]!r}, not true/false")
    template = config.get("chat_template")
    if template is not None and not isinstance(template, (str, list)):
        raise QuantkitError(f"{path}: chat_template is neither text nor a list of templates")
