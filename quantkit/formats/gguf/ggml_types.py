"""The ggml types and file types of the pinned llama.cpp that the installed gguf-py does not name yet.

quantkit keys every table on gguf-py's ``GGMLQuantizationType`` / ``LlamaFileType``; the pinned llama.cpp
(ggml.h, llama.h) adds ``GGML_TYPE_Q2_0 = 42`` (blocks of 64: fp16 d, 2-bit codes; 18 bytes) and
``LLAMA_FTYPE_MOSTLY_Q2_0 = 41``, which this gguf-py lacks. They are added to its enums and to
``GGML_QUANT_SIZES`` here, once, on import (``layouts`` imports this module, so every user of the block
tables sees them); a gguf-py that knows them already is left as it is. gguf-py's GGUFReader and GGUFWriter then
read and write Q2_0 tensors like any other; decoding them is quantkit's (``lowbit``)."""

from __future__ import annotations

from enum import IntEnum

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

# enum -> (member name, value) from the pinned llama.cpp
MISSING: dict[type[IntEnum], tuple[str, int]] = {QT: ("Q2_0", 42), FT: ("MOSTLY_Q2_0", 41)}
Q2_0_SIZES = (64, 2 + 64 // 4)  # elements and bytes per block (ggml-common.h: block_q2_0)


def _add_member(enum: type[IntEnum], name: str, value: int) -> None:
    """Add ``name = value`` to an IntEnum after its creation, as its metaclass would have."""
    if name in enum.__members__:
        return
    member = int.__new__(enum, value)
    member._name_, member._value_ = name, value
    member._sort_order_ = len(enum._member_names_)
    enum._member_map_[name] = member
    enum._value2member_map_[value] = member
    enum._member_names_.append(name)
    type.__setattr__(enum, name, member)


for _enum, (_name, _value) in MISSING.items():
    _add_member(_enum, _name, _value)
GGML_QUANT_SIZES.setdefault(QT["Q2_0"], Q2_0_SIZES)
