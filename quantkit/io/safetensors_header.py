"""Read and check a safetensors header before any tensor is read.

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON, then the data section. The
JSON maps each tensor name to {dtype, shape, data_offsets} (offsets relative to the data section) and may hold
``__metadata__``, a map of strings to strings. Every rule the format states is checked here, so a corrupt or
truncated file gets one precise message instead of a failure half-way through a read.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.io.dtypes import ELEMENT_BYTES

METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def read_header(path: Path) -> dict:
    """The checked header of the safetensors file ``path`` (tensor entries and ``__metadata__``)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise QuantkitError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise QuantkitError(f"{path}: corrupt safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise QuantkitError(f"{path}: corrupt safetensors header (not valid JSON)") from None
        except QuantkitError as e:
            raise QuantkitError(f"{path}: {e} (corrupt safetensors header)") from None
    if not isinstance(header, dict):
        raise QuantkitError(f"{path}: corrupt safetensors header (not a JSON object)")
    _check_metadata(path, header.get(METADATA_KEY))
    _check_entries(path, header, size - 8 - n)
    return header


def tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != METADATA_KEY]


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise QuantkitError(f"tensor {dup!r} is listed twice")
    return dict(pairs)


def _check_metadata(path: Path, metadata: object) -> None:
    """``__metadata__``, when present and not null, maps strings to strings (the format allows no other values)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise QuantkitError(f"{path}: {METADATA_KEY} is {type(metadata).__name__}, not an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise QuantkitError(
                f"{path}: {METADATA_KEY} value {key!r} is {value!r}; safetensors metadata values must be strings"
            )


def _check_entries(path: Path, header: dict, data_len: int) -> None:
    """Each entry: known dtype, shape of non-negative ints, dtype size x elements = byte length, offsets in
    range; together: non-overlapping spans."""
    spans = []
    for name in tensor_names(header):
        e = header[name]
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise QuantkitError(f"{where}: header entry lacks dtype/shape/data_offsets (corrupt safetensors header)")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str) or dt not in ELEMENT_BYTES:
            raise QuantkitError(f"{where}: unknown dtype {dt!r} (corrupt safetensors header)")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise QuantkitError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise QuantkitError(f"{where}: data_offsets {offs!r} are not two integers")
        begin, end = offs
        if not 0 <= begin <= end:
            raise QuantkitError(f"{where}: data_offsets {offs} are not an increasing pair of byte offsets")
        if end > data_len:
            raise QuantkitError(
                f"{path}: truncated safetensors file, or offsets outside it ({name!r} ends at byte {end} of the "
                f"data section, which has {data_len})"
            )
        nbytes = math.prod(shape) * ELEMENT_BYTES[dt]
        if nbytes != end - begin:
            raise QuantkitError(f"{where}: {dt} {shape} needs {nbytes} bytes, has {end - begin}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise QuantkitError(f"{path}: tensors {a!r} and {b!r} overlap (corrupt safetensors header)")
