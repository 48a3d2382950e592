"""Scoring several quantized models: recomputing the reference each time vs a reference saved once.

    python scripts/bench_reference.py MODEL_DIR Q1 Q2 ... [--chunks 40] [--ctx 512] [--dataset PATH]
        [--work DIR] [--json OUT]

Runs, as a user would, one ``quantkit eval-ppl MODEL --quantized Qi`` per model (the reference recomputed
every time), then ``quantkit eval-ppl MODEL --save-reference FILE`` once and ``quantkit eval-ppl MODEL
--reference FILE --quantized Qi`` per model; prints wall seconds of every command and both totals, and the
largest difference between the two ways' numbers (Δppl %, KLD mean).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _eval(args: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "quantkit.cli", "-q", "eval-ppl", *args, "--json"]
    print("$ quantkit eval-ppl " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
    return time.perf_counter() - t0, json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("quantized", nargs="+")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--dataset")
    ap.add_argument("--work", type=Path, help="where the reference file goes (default: a temporary directory)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    text = ["--dataset", args.dataset] if args.dataset else []
    size = ["--ctx", str(args.ctx), "--chunks", str(args.chunks)]
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        base = str(Path(tmp) / "base.kld")
        each = [_eval([args.model, "--quantized", q, *text, *size]) for q in args.quantized]
        save = _eval([args.model, *text, *size, "--save-reference", base])
        saved_bytes = Path(base).stat().st_size
        scored = [_eval([args.model, "--reference", base, "--quantized", q, *text]) for q in args.quantized]
    rows = []
    for q, (t1, r1), (t2, r2) in zip(args.quantized, each, scored, strict=True):
        rows.append({"model": Path(q).name, "recompute_s": round(t1, 1), "saved_s": round(t2, 1),
                     "delta_ppl_pct": [r1["delta_ppl_pct"], r2["delta_ppl_pct"]],
                     "kld_mean": [r1["kld_mean"], r2["kld_mean"]]})  # fmt: skip
    summary = {
        "chunks": args.chunks,
        "ctx": args.ctx,
        "recompute_total_s": round(sum(t for t, _ in each), 1),
        "save_reference_s": round(save[0], 1),
        "saved_total_s": round(save[0] + sum(t for t, _ in scored), 1),
        "reference_file_bytes": saved_bytes,
        "rows": rows,
    }
    print("| model | recomputing the reference, s | with the saved reference, s | Δppl % (each / saved) | KLD mean |")
    print("|---|---|---|---|---|")
    for r in rows:
        d, k = r["delta_ppl_pct"], r["kld_mean"]
        print(f"| {r['model']} | {r['recompute_s']} | {r['saved_s']} | {d[0]:+.3f} / {d[1]:+.3f} "
              f"| {k[0]:.5f} / {k[1]:.5f} |")  # fmt: skip
    print(f"| total | {summary['recompute_total_s']} | {summary['saved_total_s']} "
          f"(save {summary['save_reference_s']} s, {saved_bytes / 2**30:.2f} GiB file) | | |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
