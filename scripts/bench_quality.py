"""Quality of quantkit's int4 recipes and their switches on one model, scored against one reference pass.

Each variant is a recipe plus option overrides (``NAME=RECIPE[,key=value ...]``); each is quantized into
WORK/NAME (kept, and reused with --reuse when its options are unchanged), then all are scored together with
``evaluate_many`` on CHUNKS x 512 tokens of WikiText-2 test. Prints one table (variant, bits/w, ppl, Δppl %,
KLD mean and p99, top-1 %, quantize seconds, and for GPTQ how many linears have a larger output error than
min-max RTN); --json prints the rows as JSON instead.

    python scripts/bench_quality.py MODEL_DIR --work /tmp/q [--chunks 40] [--nsamples 64] [--reuse] \\
        [--variant gptq=int4-g128-gptq,act_order=false] [--variant rtn=int4-g128-rtn] ...

Without --variant: RTN, then the GPTQ recipe int4-g128-gptq with its switches (act-order, scale search) off and on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from wikitext import evaluation_text

from quantkit.eval.evaluate import evaluate_many
from quantkit.io.checkpoint import open_checkpoint
from quantkit.io.texts import perplexity_chunks
from quantkit.io.tokenizer import Tokenizer
from quantkit.quant.quantize import quantize_checkpoint
from quantkit.quant.recipes import QuantizeOptions, resolve_options

DEFAULT_VARIANTS = (  # the recipe, then each of its switches turned off
    "rtn=int4-g128-rtn",
    "gptq-minmax-no-act-order=int4-g128-gptq,act_order=false,scale_search=minmax",
    "gptq-minmax=int4-g128-gptq,scale_search=minmax",
    "gptq=int4-g128-gptq",
)


def parse_variant(text: str, nsamples: int) -> tuple[str, QuantizeOptions]:
    """``NAME=RECIPE[,key=value ...]`` -> (NAME, options); values are parsed as TOML-like scalars."""
    name, _, rest = text.partition("=")
    recipe, *pairs = rest.split(",")
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        overrides[key] = _scalar(value)
    opts = resolve_options(recipe, **overrides)
    if opts.method == "gptq" and "nsamples" not in overrides:
        opts = opts.replace(nsamples=nsamples)
    return name, opts


def _scalar(value: str) -> Any:
    if value in ("true", "false"):
        return value == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def quantize_variant(model: Path, out: Path, opts: QuantizeOptions, reuse: bool) -> dict:
    """Quantize into ``out`` unless --reuse finds an artifact made with the same options."""
    report_path = out / "quantkit.json"
    if reuse and report_path.is_file():
        report = json.loads(report_path.read_text())
        if _effective(report["options"]) == _effective(opts.__dict__):
            return report
    if out.exists():
        sys.exit(f"bench_quality: {out} exists; remove it or pass --reuse with unchanged options")
    return quantize_checkpoint(model, out, opts, progress=False)


def _effective(options: dict) -> dict:
    """Options that change the artifact: search settings do not when there is no search, and options an older
    report lacks count as their defaults."""
    options = {**QuantizeOptions().__dict__, **options}
    ignored = {"scale_dtype"}
    if options["scale_search"] == "minmax":
        ignored |= {"search_steps", "search_min_shrink"}
    return {k: v for k, v in options.items() if k not in ignored}


def worse_than_rtn(report: dict) -> int | None:
    """How many linears GPTQ left with a larger calibration output error than min-max RTN (None for RTN)."""
    linears = report["linears"].values()
    if not all("rtn_output_rel_err" in s for s in linears):
        return None
    return sum(s["output_rel_err"] > s["rtn_output_rel_err"] for s in linears)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--work", type=Path, required=True, help="artifacts go to WORK/NAME")
    ap.add_argument("--variant", action="append", help="NAME=RECIPE[,key=value ...] (repeatable)")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows of 512 tokens (GPTQ)")
    ap.add_argument("--text", type=Path, default=None, help="evaluation text (default: WikiText-2 test)")
    ap.add_argument("--reuse", action="store_true", help="reuse WORK/NAME when made with the same options")
    ap.add_argument("--quantize-only", action="store_true", help="make the artifacts, score nothing")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    variants = [parse_variant(v, args.nsamples) for v in args.variant or DEFAULT_VARIANTS]
    reports = {}
    for name, opts in variants:
        reports[name] = quantize_variant(args.model, args.work / name, opts, args.reuse)
        print(f"quantized {name}: {reports[name]['seconds']:.1f} s", file=sys.stderr)
    if args.quantize_only:
        return
    ref = open_checkpoint(args.model)
    chunks = perplexity_chunks(Tokenizer(ref.tokenizer_path), args.text or evaluation_text(), 512, args.chunks)
    quants = [open_checkpoint(args.work / name) for name, _ in variants]
    results = evaluate_many(ref, chunks, quants, progress=False)
    rows = [_row(name, reports[name], res) for (name, _), res in zip(variants, results, strict=True)]
    if args.json:
        print(json.dumps({"reference_ppl": results[0]["reference"]["ppl"], "rows": rows}, indent=2))
        return
    print(f"reference ppl {results[0]['reference']['ppl']:.3f} ({args.chunks} chunks x 512)")
    cols = ("variant", "bits/w", "ppl", "d ppl %", "KLD mean", "KLD p99", "top-1 %", "quant s", "> RTN")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        worse = "-" if r["worse_than_rtn"] is None else f"{r['worse_than_rtn']}/{r['linears']}"
        print(
            f"| {r['variant']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {r['delta_ppl_pct']:+.2f} "
            f"| {r['kld_mean']:.4f} | {r['kld_p99']:.3f} | {100 * r['top1_agreement']:.1f} "
            f"| {r['quantize_s']:.0f} | {worse} |"
        )


def _row(name: str, report: dict, res: dict) -> dict:
    return {
        "variant": name,
        "options": report["options"],
        "bits_per_weight": report["bits_per_weight"],
        "ppl": res["ppl"],
        "delta_ppl_pct": res["delta_ppl_pct"],
        "kld_mean": res["kld_mean"],
        "kld_p99": res["kld_p99"],
        "top1_agreement": res["top1_agreement"],
        "quantize_s": report["seconds"],
        "mean_output_rel_err": report.get("mean_output_rel_err"),
        "worse_than_rtn": worse_than_rtn(report),
        "linears": len(report["linears"]),
    }


if __name__ == "__main__":
    main()
