"""Element types, one table: safetensors' dtype names, their torch dtypes and sizes, and the names the
command line uses for floating-point dtypes."""

from __future__ import annotations

import torch

# every dtype the safetensors format defines -> bytes per element
ELEMENT_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# the safetensors dtypes quantkit reads into torch tensors
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
# a checkpoint's floating-point weights may be stored in these
FLOAT_NAMES = ("BF16", "F16", "F32")
# command-line dtype names ("float32", as torch spells them) -> torch dtype
CLI_FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_BY_TORCH = {v: k for k, v in TORCH_DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """A safetensors dtype name ("BF16") or a command-line one ("bfloat16") -> torch dtype."""
    return TORCH_DTYPES[name] if name in TORCH_DTYPES else CLI_FLOATS[name]


def safetensors_name(dtype: torch.dtype) -> str:
    return _BY_TORCH[dtype]
