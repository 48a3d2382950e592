"""libggml's C reference quantizers (``quantize_row_*_ref``) through ctypes: the oracle that tests and
benchmarks compare quantkit's encoders with. Found inside an installed llama-cpp-python; not used by the
library itself."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from quantkit.formats.gguf.blocks import check_rows, row_bytes

REF_TYPES = (
    QT.Q8_0,
    QT.Q4_0,
    QT.Q4_1,
    QT.Q5_0,
    QT.Q5_1,
    QT.Q2_K,
    QT.Q3_K,
    QT.Q4_K,
    QT.Q5_K,
    QT.Q6_K,
    QT.IQ4_NL,
    QT.IQ4_XS,
    QT.IQ3_XXS,
    QT.IQ3_S,
    QT.IQ2_XXS,
    QT.IQ2_XS,
    QT.IQ2_S,
    QT.Q1_0,
    QT.Q2_0,
    QT.IQ1_S,
    QT.IQ1_M,
)
# types whose oracle is the row quantizer llama-quantize calls, `quantize_<type>(src, dst, nrows, n_per_row,
# imatrix=NULL)`: quantize_row_iq4_nl_ref is another quantizer (no scale search)
CHUNK_REF = (QT.IQ4_NL, QT.IQ3_XXS, QT.IQ3_S, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ1_S, QT.IQ1_M)
# types whose tables libggml builds on first use: `ggml_quantize_init(type)` (the codebook neighbours)
INIT_REF = (QT.IQ3_XXS, QT.IQ3_S, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ1_S, QT.IQ1_M)
# types whose quantize_<type> aborts the process without an importance vector (GGML_ASSERT(quant_weights))
WEIGHTS_REF = (QT.IQ2_XXS, QT.IQ2_XS, QT.IQ1_S)


def libggml_path() -> Path | None:
    """libggml-base inside an installed llama-cpp-python (found without importing it), or None."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    hits = sorted((Path(spec.origin).parent / "lib").glob("*ggml-base.*"))
    return hits[0] if hits else None


def ggml_name(qtype: QT) -> str:
    """The type as libggml's function names spell it: Q4_K -> q4_K, IQ4_NL -> iq4_nl."""
    return qtype.name.lower() if qtype.name.startswith("IQ") else qtype.name[0].lower() + qtype.name[1:]


@functools.cache
def _ref_fn(lib_path: str, qtype: QT, chunk: bool = False) -> Callable[..., object]:
    name = ggml_name(qtype)
    lib = ctypes.CDLL(lib_path)
    if qtype in INIT_REF:
        lib.ggml_quantize_init.argtypes, lib.ggml_quantize_init.restype = [ctypes.c_int], None
        lib.ggml_quantize_init(int(qtype))
    if qtype in CHUNK_REF or chunk:
        fn = getattr(lib, f"quantize_{name}")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        fn.restype = ctypes.c_size_t
    else:
        fn = getattr(lib, f"quantize_row_{name}_ref")
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    return fn


def quantize_rows_ref(
    x: np.ndarray, qtype: QT, lib_path: Path | None = None, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """quantize_rows computed by libggml's `quantize_row_*_ref(const float *x, void *y, int64_t k)`; with an
    importance vector ``imatrix`` float32 [n], quantize_rows_weighted by what llama-quantize --imatrix calls,
    `quantize_<type>(src, dst, nrows, n_per_row, imatrix)`."""
    lib_path = lib_path or libggml_path()
    if lib_path is None:
        raise FileNotFoundError("libggml-base not found: install llama-cpp-python")
    if qtype not in REF_TYPES:
        raise NotImplementedError(f"no C reference wired up for {qtype.name}")
    if qtype in WEIGHTS_REF and imatrix is None:
        raise ValueError(f"libggml's quantize_{ggml_name(qtype)} aborts without an importance vector")
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_rows(x, qtype)
    out = np.empty((x.shape[0], row_bytes(qtype, x.shape[1])), dtype=np.uint8)
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        if qw.shape != (x.shape[1],):
            raise ValueError(f"expected an importance vector of shape ({x.shape[1]},), got {qw.shape}")
        _ref_fn(str(lib_path), qtype, True)(x.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1], qw.ctypes.data)
        return out
    fn = _ref_fn(str(lib_path), qtype)
    if qtype in CHUNK_REF:
        fn(x.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1], None)
    else:
        fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def dequantize_rows_ref(data: np.ndarray, qtype: QT, lib_path: Path | None = None) -> np.ndarray:
    """uint8 [R, row_bytes] -> float32 [R, n] by libggml's `dequantize_row_<type>(const void *x, float *y,
    int64_t k)`: the decoder llama.cpp runs."""
    lib_path = lib_path or libggml_path()
    if lib_path is None:
        raise FileNotFoundError("libggml-base not found: install llama-cpp-python")
    data = np.ascontiguousarray(data, dtype=np.uint8)
    blk, size = GGML_QUANT_SIZES[qtype]
    out = np.empty((data.shape[0], data.shape[1] // size * blk), dtype=np.float32)
    fn = getattr(ctypes.CDLL(str(lib_path)), f"dequantize_row_{ggml_name(qtype)}")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    fn(data.ctypes.data, out.ctypes.data, out.size)
    return out
