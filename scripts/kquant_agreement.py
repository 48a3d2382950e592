"""How often quantkit's ggml blocks are byte-identical to libggml's `quantize_row_*_ref`, and how fast.

Q3_K, Q4_K, Q5_K and Q6_K are quantkit's own numpy quantizers, Q4_0 and Q8_0 its torch quantizers (one thread
each here).
The C reference is libggml-base from the installed llama-cpp-python, called through ctypes (one thread).

    python scripts/kquant_agreement.py --blocks 8192
    python scripts/kquant_agreement.py --safetensors model.safetensors \
        --tensor model.layers.0.mlp.down_proj.weight --rows 256
    python scripts/kquant_agreement.py --gguf gemma-3-270m-q4_k_m.gguf --tensor blk.0.ffn_down.weight

A GGUF tensor is dequantized first, so its values already lie on a ggml grid:
fine for agreement, but re-quantizing such weights says nothing about quantization quality.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from quantkit.formats.gguf.blocks import block_size, quantize_rows, row_bytes
from quantkit.formats.gguf.reference import libggml_path, quantize_rows_ref

TYPES = (QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q4_0, QT.Q8_0)
ROW = 4096  # random rows: 16 super-blocks each
HEADER = ("source", "type", "blocks", "identical", "ours s/Mw", "C s/Mw", "ratio")
LINE = "{:<36} {:<5} {:>8} {:>10} {:>10} {:>8} {:>6}"


def random_sources(n_superblocks: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = max(1, n_superblocks * 256 // ROW)
    return {
        "normal(0, 0.02)": (rng.standard_normal((rows, ROW)) * 0.02).astype(np.float32),
        "student-t(3)": (rng.standard_t(3, (rows, ROW)) * 0.02).astype(np.float32),
    }


def tensor_source(path: Path, name: str, rows: int) -> dict[str, np.ndarray]:
    """The first `rows` rows of a 2-D tensor in a safetensors file, as float32 [rows, in]."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        x = f.get_slice(name)[:rows].float().numpy()
    n = x.shape[1] // 256 * 256  # K-quants need whole super-blocks; drop a ragged tail
    return {f"{name}[:{x.shape[0]}]": np.ascontiguousarray(x[:, :n])}


def gguf_source(path: Path, name: str, rows: int) -> dict[str, np.ndarray]:
    """The first `rows` rows of a GGUF tensor, dequantized by gguf-py to float32 [rows, ne0]."""
    from gguf import GGUFReader
    from gguf import quants as gq

    found = [t for t in GGUFReader(path).tensors if t.name == name]
    if not found:
        raise SystemExit(f"no tensor {name!r} in {path}")
    t = found[0]
    x = gq.dequantize(np.asarray(t.data[:rows]), t.tensor_type).reshape(min(rows, len(t.data)), -1)
    n = x.shape[1] // 256 * 256
    return {f"{name}[:{x.shape[0]}] ({t.tensor_type.name})": np.ascontiguousarray(x[:, :n], np.float32)}


def best_time(fn: Callable[[], np.ndarray], repeat: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def agreement_row(x: np.ndarray, qtype: QT, lib: Path, repeat: int) -> tuple[int, float, float, float]:
    """-> (blocks, share of blocks byte-identical, ours s per 1M weights, C s per 1M weights)."""
    t_ours, ours = best_time(lambda: quantize_rows(x, qtype), repeat)
    t_ref, ref = best_time(lambda: quantize_rows_ref(x, qtype, lib), repeat)
    size = row_bytes(qtype, block_size(qtype))
    same = (ours.reshape(-1, size) == ref.reshape(-1, size)).all(axis=1)
    per_m = 1e6 / x.size
    return same.size, float(same.mean()), t_ours * per_m, t_ref * per_m


def main() -> None:
    torch.set_num_threads(1)  # one thread against the single-threaded C reference
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4096, help="random 256-element super-blocks per source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="timing: best of this many runs")
    ap.add_argument("--safetensors", type=Path, help="also test rows of a real tensor from this file")
    ap.add_argument("--gguf", type=Path, help="also test rows of a (dequantized) tensor from this GGUF")
    ap.add_argument("--tensor", help="tensor name inside --safetensors / --gguf")
    ap.add_argument("--rows", type=int, default=256, help="rows of --tensor to use")
    args = ap.parse_args()

    lib = libggml_path()
    if lib is None:
        raise SystemExit("libggml-base not found: pip install llama-cpp-python")
    sources = random_sources(args.blocks, args.seed)
    if (args.safetensors or args.gguf) and not args.tensor:
        raise SystemExit("--safetensors / --gguf need --tensor NAME")
    if args.safetensors:
        sources |= tensor_source(args.safetensors, args.tensor, args.rows)
    if args.gguf:
        sources |= gguf_source(args.gguf, args.tensor, args.rows)

    print(f"C reference: {lib}")
    print(LINE.format(*HEADER))
    for label, x in sources.items():
        for qtype in TYPES:
            n, share, ours, ref = agreement_row(x, qtype, lib, args.repeat)
            cells = (f"{share:.4%}", f"{ours:.4f}", f"{ref:.4f}", f"{ours / ref:.2f}")
            print(LINE.format(label, qtype.name, n, *cells))


if __name__ == "__main__":
    main()
