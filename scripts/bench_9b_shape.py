"""Memory and time of quantize / eval-ppl on a random checkpoint with Gemma 2 9B's shapes.

No 9B weights exist here, so this builds a bf16 checkpoint with the 9B's exact config (hidden 3584, 16
heads x 256, 8 KV heads, MLP 14336, vocab 256000, soft-caps, window 4096) but only ``--layers`` decoder
layers. quantkit holds one decoder layer at a time, so peak memory with 2 layers is the peak with 42;
time scales with the layer count (printed as an extrapolation). Each command runs in its own process.

    python scripts/bench_9b_shape.py [--layers 2] [--nsamples 16] [--seqlen 512] [--chunks 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

NINE_B = {
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "vocab_size": 256000,
}


# Runs a command as its only child and prints that child's peak RSS (KiB): RUSAGE_CHILDREN of a process with
# one child is that child's own peak, whatever ran before in the benchmark.
_PEAK_OF_CHILD = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


def timed(cmd: list[str]) -> dict:
    """Run a command; its wall time and its own peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK_OF_CHILD, *cmd], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])}: {lines[-2] if len(lines) > 1 else proc.stderr}")
    return {"seconds": seconds, "peak_rss_gib": int(lines[-1]) * 1024 / 2**30, "stdout": proc.stdout}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    q = [sys.executable, "-m", "quantkit.cli"]
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        t0 = time.perf_counter()
        model = make_tiny_checkpoint(Path(tmp) / "m", "gemma2", num_hidden_layers=args.layers, **NINE_B)
        print(f"random 9B-shaped checkpoint, {args.layers} layers: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        steps = [
            ("quantize int4-g128-rtn", [*q, "quantize", str(model), "--recipe", "int4-g128-rtn", "-o", f"{tmp}/rtn"]),
            (
                "quantize int4-g128-gptq",
                [*q, "quantize", str(model), "--recipe", "int4-g128-gptq", *calib, "-o", f"{tmp}/gptq"],
            ),
            (
                "eval-ppl --stream (ref + gptq)",
                [
                    *q,
                    "eval-ppl",
                    str(model),
                    "--quantized",
                    f"{tmp}/gptq",
                    "--stream",
                    "--chunks",
                    str(args.chunks),
                    "--json",
                ],
            ),
        ]
        for name, cmd in steps:
            r = timed(cmd)
            r.pop("stdout")
            rows.append({"step": name, **r, "per_layer_s": r["seconds"] / args.layers})
            print(f"{name}: {r['seconds']:.0f} s, peak RSS {r['peak_rss_gib']:.2f} GiB", file=sys.stderr)
    if args.json:
        print(json.dumps({"layers": args.layers, "nsamples": args.nsamples, "rows": rows}, indent=2))
        return 0
    print(f"Gemma 2 9B shapes, {args.layers} random layers, GPTQ on {args.nsamples} x {args.seqlen} tokens")
    print("| step | s | s/layer | x42 layers (min, extrapolated) | peak RSS GiB |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['step']} | {r['seconds']:.0f} | {r['per_layer_s']:.0f} | {r['per_layer_s'] * 42 / 60:.0f} "
            f"| {r['peak_rss_gib']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
