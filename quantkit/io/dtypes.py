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


# ---- the dtype the matmuls run in ------------------------------------------------------------------------
COMPUTE_CHOICES = ("auto", "float32", "bfloat16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 bf16 dot-product instructions


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (bf16 products, fp32 accumulation): a CUDA
    GPU that supports bf16, or a CPU with AVX-512 BF16 or AMX. Without them torch's CPU bf16 GEMM converts
    in software and runs 5-15x below fp32 (scripts/bench_matmul.py, docs/speed.md)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return any(f in cpu_flags() for f in BF16_CPU_FLAGS)


def compute_dtype(name: str, stored: str, device: str = "cpu") -> str:
    """``name`` ("auto", "float32" or "bfloat16") -> the dtype matmuls run in: "auto" is bfloat16 when the
    weights are stored in bf16 (``stored``: a safetensors or command-line name) and ``device`` has bf16
    hardware, else float32."""
    if name != "auto":
        return name
    return "bfloat16" if torch_dtype(stored) == torch.bfloat16 and native_bf16(device) else "float32"
