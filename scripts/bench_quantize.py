"""Time and memory of `quantkit quantize` per method, each in its own process (so peak RSS is its own).

    python scripts/bench_quantize.py MODEL_DIR [--nsamples 32] [--seqlen 512] [--device cpu] [--json]

Prints: recipe, wall time, peak RSS, calibration tokens/s (GPTQ), bits/weight, mean weight error and, for
GPTQ, the mean layer-output error next to RTN's on the same Hessians. Ratios are against int8-g128-rtn
measured in the same run. Without MODEL_DIR a tiny random checkpoint is generated (timings only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPES = ("int8-g128-rtn", "int4-g128-rtn", "int4-g128-gptq", "int4-g32-gptq")


def run_one(model: str, recipe: str, out: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "quantkit.cli",
        "quantize",
        model,
        "--recipe",
        recipe,
        "-o",
        str(out),
        "--json",
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--device",
        args.device,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe}: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).parent))
            from make_tiny_checkpoint import make_tiny_checkpoint

            model = str(make_tiny_checkpoint(Path(tmp) / "tiny", "gemma2"))
        rows = []
        for recipe in RECIPES:
            r = run_one(model, recipe, Path(tmp) / recipe, args)
            calib_tokens = args.nsamples * args.seqlen if r["options"]["method"] == "gptq" else 0
            rows.append(
                {
                    "recipe": recipe,
                    "seconds": r["seconds"],
                    "peak_rss_gib": r["peak_memory_bytes"] / 2**30,
                    "calib_tokens_per_s": calib_tokens / r["seconds"] if calib_tokens else None,
                    "bits_per_weight": r["bits_per_weight"],
                    "weight_err": r["mean_weight_rel_err"],
                    "output_err": r.get("mean_output_rel_err"),
                    "rtn_output_err": r.get("mean_rtn_output_rel_err"),
                }
            )
    base = rows[0]["seconds"]
    if args.json:
        print(json.dumps({"model": model, "rows": rows}, indent=2))
        return 0
    print(f"{model}: nsamples {args.nsamples} x seqlen {args.seqlen}, device {args.device}")
    print("| recipe | s | x int8-rtn | peak RSS GiB | calib tok/s | bits/w | weight err | out err (GPTQ / RTN) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tps = f"{r['calib_tokens_per_s']:.0f}" if r["calib_tokens_per_s"] else "-"
        out = f"{r['output_err']:.2e} / {r['rtn_output_err']:.2e}" if r["output_err"] is not None else "-"
        print(
            f"| {r['recipe']} | {r['seconds']:.1f} | {r['seconds'] / base:.1f} | {r['peak_rss_gib']:.2f} | {tps} "
            f"| {r['bits_per_weight']:.3f} | {r['weight_err']:.2e} | {out} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
