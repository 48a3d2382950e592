"""GGUF export against llama-quantize on a bf16 checkpoint with Gemma 2 9B's shapes, in the same run.

Makes (or reuses, ``--model DIR``) a random bf16 checkpoint with the 9B's exact config and ``--layers``
decoder layers (42: the full 18.5 GB in 4 shards; the 256000 x 3584 embedding is full size at any depth),
exports it once as a BF16 GGUF for llama-quantize, then for each type runs ``quantkit export`` and
``llama-quantize BF16-GGUF TYPE NTHREADS`` (both on every core), each in its own process with its own peak
RSS, and checks that the two files' tensors are byte-identical (by per-tensor SHA-256: ours is deleted
before the peer writes, so one quantized file is on disk at a time). Also times ``cat`` of the shards to
/dev/null: reading the input is the floor under both. Build llama-quantize first: scripts/build_llamacpp.sh.

Every ``--type`` of quantkit's export that llama-quantize also writes can be timed. ``--imatrix FILE`` gives
both tools the same importance matrix for every type; ``--imatrix random`` writes one first (random positive
column weights for every linear: the random model has no text to compute one from), which the IQ2 / IQ1 /
IQ3_XXS / Q2_K_S files need.

    python scripts/bench_export.py [--layers 42] [--types q4_0,q8_0,q4_k_m] [--imatrix random|FILE] \\
        [--model DIR] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_9b_shape import NINE_B  # noqa: E402
from make_tiny_checkpoint import tiny_config, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA_QUANTIZE = ROOT / "build" / "llama.cpp" / "bin" / "llama-quantize"
sys.path.insert(0, str(ROOT))
from quantkit.formats.gguf.file_types import FILE_TYPE_NAMES, PURE  # noqa: E402

# --type -> llama-quantize's name of the same file type (its LlamaFileType without MOSTLY_); pure types and
# the float ones are not llama-quantize file types
PEER_TYPES = {t: ft.removeprefix("MOSTLY_") for t, (_, ft) in FILE_TYPE_NAMES.items() if t not in PURE and t[0] in "qi"}
GEN_ROWS = 1 << 12  # rows of random weights generated per step (the embedding: 4096 x 3584 fp32 = 59 MB)


# Runs a command as its only child and prints that child's peak RSS (KiB) and CPU seconds (user + system):
# RUSAGE_CHILDREN of a process with one child is that child's own. CPU / wall shows how many cores it kept busy.
_USAGE_OF_CHILD = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(u.ru_maxrss, u.ru_utime + u.ru_stime, file=sys.stderr); sys.exit(rc)"
)


def timed(cmd: list[str]) -> dict:
    """Run a command: wall seconds, its own peak RSS and CPU seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _USAGE_OF_CHILD, *cmd], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])}: {lines[-2] if len(lines) > 1 else proc.stderr}")
    rss, cpu = lines[-1].split()
    return {"seconds": seconds, "peak_rss_gib": int(rss) * 1024 / 2**30, "cpu_s": float(cpu)}


# ---------------------------------------------------------------------------- a 9B-shaped checkpoint


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], float]]:
    """(HF name, shape, std) for every tensor, in Gemma 2's layout (std: gain / sqrt(fan-in) as in
    make_tiny_checkpoint; norms 0.5)."""
    h, f, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    specs = [("model.embed_tokens.weight", (cfg["vocab_size"], h), 0.5)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (f"{p}input_layernorm.weight", (h,), 0.5),
            (f"{p}self_attn.q_proj.weight", (nq * d, h), 3.0 / math.sqrt(h)),
            (f"{p}self_attn.k_proj.weight", (nkv * d, h), 3.0 / math.sqrt(h)),
            (f"{p}self_attn.v_proj.weight", (nkv * d, h), 1.0 / math.sqrt(h)),
            (f"{p}self_attn.o_proj.weight", (h, nq * d), 1.0 / math.sqrt(nq * d)),
            (f"{p}post_attention_layernorm.weight", (h,), 0.5),
            (f"{p}pre_feedforward_layernorm.weight", (h,), 0.5),
            (f"{p}mlp.gate_proj.weight", (f, h), 2.0 / math.sqrt(h)),
            (f"{p}mlp.up_proj.weight", (f, h), 1.0 / math.sqrt(h)),
            (f"{p}mlp.down_proj.weight", (h, f), 1.0 / math.sqrt(f)),
            (f"{p}post_feedforward_layernorm.weight", (h,), 0.5),
        ]
    return [*specs, ("model.norm.weight", (h,), 0.5)]


def write_shard(path: Path, specs: list[tuple[str, tuple[int, ...], float]], gen: torch.Generator) -> int:
    """A bf16 safetensors file written tensor by tensor, GEN_ROWS rows at a time (memory: one step)."""
    header, offset = {}, 0
    for name, shape, _ in specs:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, shape, std in specs:
            cols = math.prod(shape[1:])
            for r in range(0, shape[0], GEN_ROWS):
                rows = min(GEN_ROWS, shape[0] - r)
                x = (torch.randn(rows * cols, generator=gen) * std).to(torch.bfloat16)
                f.write(x.view(torch.uint8).numpy().tobytes())
    return offset


def make_9b_shape(out: Path, layers: int, shards: int = 4, seed: int = 0) -> Path:
    """config.json, tokenizer, ``shards`` bf16 shards and the index of a random 9B-shaped Gemma 2."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config("gemma2", num_hidden_layers=layers, **NINE_B)
    train_tokenizer(out / "tokenizer.model", 512)  # the vocab beyond 512 ids is padding
    specs = tensor_specs(cfg)
    per = math.ceil(len(specs) / shards)
    gen, weight_map, total = torch.Generator().manual_seed(seed), {}, 0
    for s in range(shards):
        part = specs[s * per : (s + 1) * per]
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        total += write_shard(out / name, part, gen)
        weight_map.update({n: name for n, _, _ in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tok = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>"}
    (out / "tokenizer_config.json").write_text(json.dumps(tok | {"unk_token": "<unk>", "pad_token": "<pad>"}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


# ------------------------------------------------------------------------------------------ comparing


def tensor_digests(path: Path) -> dict[str, tuple[str, str]]:
    """name -> (type, sha256 of its bytes) for every tensor of a GGUF: lets one file be deleted before the
    other is written (at full depth two quantized 9B files and the inputs do not fit every disk)."""
    from gguf import GGUFReader

    import quantkit.formats.gguf.ggml_types  # noqa: F401  (gguf-py learns the pinned llama.cpp's Q2_0)

    return {
        t.name: (t.tensor_type.name, hashlib.sha256(t.data.view(np.uint8).reshape(-1)).hexdigest())
        for t in GGUFReader(path).tensors
    }


def compare_tensors(a: dict[str, tuple[str, str]], b: dict[str, tuple[str, str]]) -> dict:
    """Tensors present in both digests: how many, how many have the same type and identical bytes."""
    common = a.keys() & b.keys()
    differ = sorted(f"{n} ({a[n][0]} vs {b[n][0]})" for n in common if a[n] != b[n])
    only = sorted(a.keys() ^ b.keys())
    return {"tensors": len(a), "identical": len(common) - len(differ), "differ": differ[:10], "only_in_one": only[:10]}


# The same quantizer as the llama-quantize binary (its main() calls llama_model_quantize with these
# parameters), through llama-cpp-python: a stand-in while the binary is not built.
_PY_PEER = (
    "import ctypes, sys, llama_cpp as L; p = L.llama_model_quantize_default_params(); "
    "p.nthread, p.ftype = int(sys.argv[4]), getattr(L, 'LLAMA_FTYPE_MOSTLY_' + sys.argv[3]); "
    "sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))"
)


def peer_command(
    binary: Path, src: Path, dst: Path, qtype: str, threads: int, imatrix: Path | None = None
) -> list[str]:
    """llama-quantize [--imatrix FILE] SRC DST TYPE NTHREADS, or its library call through llama-cpp-python."""
    args = [str(src), str(dst), PEER_TYPES[qtype], str(threads)]
    if binary.is_file():
        return [str(binary), *(["--imatrix", str(imatrix)] if imatrix else []), *args]
    if imatrix:
        raise SystemExit("--imatrix needs the llama-quantize binary (scripts/build_llamacpp.sh)")
    return [sys.executable, "-c", _PY_PEER, *args]


def random_imatrix(model: Path, dest: Path, seed: int = 0) -> Path:
    """An importance-matrix GGUF with random positive column weights (lognormal) for every linear of
    ``model``: both tools read it, so the types that need one can be timed on random weights."""
    from quantkit.formats.gguf.imatrix import ImportanceStats, gguf_weight_name, write_imatrix
    from quantkit.model import LINEAR_NAMES

    cfg = json.loads((model / "config.json").read_text())
    widths = {  # each linear's input width
        "self_attn.o_proj": cfg["num_attention_heads"] * cfg["head_dim"],
        "mlp.down_proj": cfg["intermediate_size"],
    }
    rng, stats, chunks = np.random.default_rng(seed), ImportanceStats.empty(), 8
    for layer in range(cfg["num_hidden_layers"]):
        for module in LINEAR_NAMES:
            n = widths.get(module, cfg["hidden_size"])
            name = gguf_weight_name(layer, module)
            stats.sums[name] = (rng.lognormal(0.0, 1.0, n) * 512 * chunks).astype(np.float32)
            stats.counts[name] = 512 * chunks
    return write_imatrix(dest, stats, "random", 512)


def cat_seconds(files: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def gib(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 2**30


def run_benchmark(args: argparse.Namespace, work: Path) -> dict:
    threads = len(os.sched_getaffinity(0))
    q = [sys.executable, "-m", "quantkit.cli", "export"]
    if args.model:
        model = Path(args.model)
    else:
        t0 = time.perf_counter()
        model = make_9b_shape(work / "model", args.layers)
        print(f"random 9B-shaped checkpoint, {args.layers} layers: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    shards = sorted(model.glob("*.safetensors"))
    bf16 = work / "peer-input.bf16.gguf"
    rows = [
        {
            "step": "quantkit export bf16 (llama-quantize's input)",
            **timed([*q, str(model), "--format", "gguf", "--type", "bf16", "-o", str(bf16)]),
        }
    ]
    cat = {"shards_gib": gib(shards), "cat_shards_s": cat_seconds(shards), "cat_bf16_gguf_s": cat_seconds([bf16])}
    print(f"cat shards > /dev/null: {cat['cat_shards_s']:.1f} s ({cat['shards_gib']:.1f} GiB)", file=sys.stderr)
    imatrix = None
    if args.imatrix:
        imatrix = (
            random_imatrix(model, work / "random.imatrix.gguf") if args.imatrix == "random" else Path(args.imatrix)
        )
    with_imatrix = ["--imatrix", str(imatrix)] if imatrix else []
    for qtype in args.types.split(","):
        ours, peer = work / f"quantkit.{qtype}.gguf", work / f"llama-quantize.{qtype}.gguf"
        mine = timed([*q, str(model), "--format", "gguf", "--type", qtype, *with_imatrix, "-o", str(ours)])
        ours_digests = tensor_digests(ours)
        if not args.keep:
            ours.unlink()
        other = timed(peer_command(Path(args.llama_quantize), bf16, peer, qtype, threads, imatrix))
        same = compare_tensors(ours_digests, tensor_digests(peer))
        ratio = mine["seconds"] / other["seconds"]
        rows.append({"step": f"quantkit export {qtype}", **mine, "ratio": ratio, "bytes": same})
        rows.append({"step": f"llama-quantize BF16 -> {PEER_TYPES[qtype]}", **other, "ratio": 1.0})
        print(
            f"{qtype}: {mine['seconds']:.1f} s vs {other['seconds']:.1f} s ({ratio:.2f}x), peak RSS "
            f"{mine['peak_rss_gib']:.2f} vs {other['peak_rss_gib']:.2f} GiB, "
            f"{same['identical']}/{same['tensors']} tensors identical",
            file=sys.stderr,
        )
        if not args.keep:
            peer.unlink()
    peer = "llama-quantize" if Path(args.llama_quantize).is_file() else "llama-cpp-python llama_model_quantize"
    return {"layers": args.layers, "model": str(model), "threads": threads, "peer": peer, "imatrix": args.imatrix,
            **cat, "rows": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=42)
    ap.add_argument("--types", default="q4_0,q8_0,q4_k_m")
    ap.add_argument("--model", help="reuse this checkpoint instead of writing a random one")
    ap.add_argument("--imatrix", help="an importance matrix for both tools and every type, or 'random'")
    ap.add_argument("--llama-quantize", default=str(LLAMA_QUANTIZE))
    ap.add_argument("--workdir", default=str(ROOT / "build"), help="where the model and GGUFs go (20-45 GB)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and GGUFs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not Path(args.llama_quantize).is_file():
        print(
            f"{args.llama_quantize} not found (scripts/build_llamacpp.sh builds it): using llama-cpp-python's "
            "llama_model_quantize, the same quantizer in a generic (non-native) build",
            file=sys.stderr,
        )
    unknown = set(args.types.split(",")) - PEER_TYPES.keys()
    if unknown:
        raise SystemExit(f"unknown types {sorted(unknown)}; choose from {','.join(PEER_TYPES)}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-export-", dir=args.workdir))
    try:
        res = run_benchmark(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.keep:
        res["workdir"] = str(work)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(
        f"GGUF export, Gemma 2 9B shapes, {args.layers} random bf16 layers, {res['threads']} threads, "
        f"peer: {res['peer']}" + (f", importance matrix: {args.imatrix}" if args.imatrix else "")
    )
    print(
        f"floor: cat of the {res['shards_gib']:.1f} GiB of shards to /dev/null {res['cat_shards_s']:.1f} s "
        f"(llama-quantize's BF16 GGUF input: {res['cat_bf16_gguf_s']:.1f} s)"
    )
    print("| step | s | CPU s / s | peak RSS GiB | vs llama-quantize | tensors byte-identical |")
    print("|---|---|---|---|---|---|")
    for r in rows_for_table(res["rows"]):
        print(r)
    return 0


def rows_for_table(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        same = f"{r['bytes']['identical']}/{r['bytes']['tensors']}" if "bytes" in r else "-"
        busy = r["cpu_s"] / r["seconds"]
        out.append(f"| {r['step']} | {r['seconds']:.1f} | {busy:.2f} | {r['peak_rss_gib']:.2f} | {ratio} | {same} |")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
