"""Budget mixes against llama-quantize's types of the same size: quantkit's ``export --max-size`` (RTN, each
weight's type chosen from its measured sensitivity) at the size of each llama-quantize file, plain and with
an importance matrix, all scored by llama-perplexity --kl-divergence against the F32 model on the same tokens.

    python scripts/bench_mix.py --model DIR --f32 F32.gguf --imatrix IMATRIX.gguf --llama FILE.gguf ... \\
        [--chunks 6] [--out build/mix] [--json]

The sensitivities are measured once and every budget is chosen from them (the same choice ``quantkit export
--max-size SIZE [--imatrix IMATRIX.gguf]`` makes; each file's equivalent command is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compare import llama_kld, sh  # noqa: E402

from quantkit.formats.gguf.export import export_gguf, overhead_bytes  # noqa: E402
from quantkit.formats.gguf.imatrix import read_imatrix  # noqa: E402
from quantkit.formats.gguf.knapsack import choose  # noqa: E402
from quantkit.formats.gguf.mix import TypeChoice, budget_for, describe, measure, mixable  # noqa: E402
from quantkit.formats.gguf.policy import plan_tensors  # noqa: E402
from quantkit.io.checkpoint import open_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_mixes(args: argparse.Namespace, out: Path) -> list[tuple[str, Path, dict]]:
    ckpt = open_checkpoint(args.model)
    plan = plan_tensors(ckpt.config, args.type)
    free = mixable(plan, [])
    fixed = sum(t.nbytes for t in plan if t not in free)  # the token embedding and the norms
    overhead = overhead_bytes(ckpt, args.type)
    made = []
    for weighting, importance in (("plain", None), ("imatrix", read_imatrix(args.imatrix))):
        options = measure(ckpt, free, importance)
        for ref in map(Path, args.llama):
            size = ref.stat().st_size
            budget = budget_for(plan, None, size, overhead)
            chosen = choose(options, budget, fixed)
            types = {t.gguf_name: t.qtype for t in plan} | {n: c.qtype for n, c in chosen.items()}
            dest = out / f"mix-{weighting}-{ref.stem}.gguf"
            extra = f" --imatrix {args.imatrix}" if importance else ""
            print(f"$ quantkit export {args.model} --type {args.type} --max-size {size}{extra} -o {dest}", flush=True)
            report = export_gguf(ckpt, dest, args.type, progress=False, types=types)
            report |= describe(TypeChoice(types, (), budget, chosen), report, ckpt, dest, importance)
            made.append((f"quantkit mix ({weighting}) at {ref.name}'s size", dest, report))
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--f32", required=True, help="The model's F32 GGUF (the KLD reference).")
    ap.add_argument("--imatrix", required=True)
    ap.add_argument("--llama", nargs="+", required=True, help="llama-quantize files whose sizes are the budgets.")
    ap.add_argument("--compare", nargs="*", default=[], help="More files to score (e.g. llama-quantize + imatrix).")
    ap.add_argument("--type", default="q4_k_m", help="The file type the mixes are labelled (and embedded) as.")
    ap.add_argument("--text", default="/work/shared/data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--llama-bin", default=str(ROOT / "build" / "llama.cpp" / "bin"))
    ap.add_argument("--out", default=str(ROOT / "build" / "mix"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out, bin_dir = Path(args.out), Path(args.llama_bin)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "f32.kld-base.bin"
    if not base.is_file():
        sh([str(bin_dir / "llama-perplexity"), "-m", args.f32, "-f", args.text, "--kl-divergence-base", str(base),
            "--chunks", str(args.chunks), "-c", "512"], out / "llama-base.log")  # fmt: skip
    rows = [(f"llama-quantize {Path(p).name}", Path(p), None) for p in [*args.llama, *args.compare]]
    rows += make_mixes(args, out)
    table = []
    for name, path, report in rows:
        kld = llama_kld(bin_dir, path, base, Path(args.text), args.chunks, out / f"{path.stem}.kld.log")
        row = {"file": name, "path": str(path), "bytes": path.stat().st_size} | kld
        if report is not None:
            row |= {"bits_per_weight": report["bits_per_weight"], "types": report["types"],
                    "predicted_loss": report["mix"]["predicted_loss"]}  # fmt: skip
        table.append(row)
        print(f"| {name} | {row['bytes']} | {kld['llama_kld']:.5f} | {kld['llama_kld_p99']:.4f} | "
              f"{kld['llama_ppl']:.4f} | {kld['llama_same_top']:.2f} |", flush=True)  # fmt: skip
    if args.json:
        print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
