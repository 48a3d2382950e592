"""Export GGUFs of a model (and of a quantized artifact of it) and measure each with llama.cpp's perplexity.

For every requested type the dense model is exported (and, with --quantized, the artifact too: its linears go
into Q4_0/Q8_0/Q4_1 blocks losslessly where the grids match), then scored with llama-perplexity's recipe
(scripts/llamacpp_ppl.py). Prints one row per file: source, type, size, bits/weight, lossless tensors,
PPL +- se, export time and evaluation speed; --json prints the rows as JSON instead.

    python scripts/bench_gguf.py MODEL_DIR --text wiki.test.raw [--quantized GPTQ_DIR] \\
        [--types f32,q8_0,q4_0,q4_k_m] [--ctx 512] [--chunks 40] [--threads 8] [--json] [--keep DIR]

Example, GPTQ vs RTN at the same grid: quantize MODEL_DIR with GPTQ (int4, group 32, fp16 scales) into GPTQ_DIR,
then ``--types q4_0 --quantized GPTQ_DIR``: the dense row is llama-quantize-style RTN Q4_0, the artifact row
is the GPTQ weights written losslessly as Q4_0.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp_ppl import load_llama, perplexity, read_text, tokenize  # noqa: E402

from quantkit.formats.gguf.export import export_gguf  # noqa: E402
from quantkit.formats.gguf.policy import FILE_TYPES  # noqa: E402
from quantkit.io.checkpoint import open_checkpoint  # noqa: E402

DEFAULT_TYPES = "f32,q8_0,q4_0,q4_k_m"


def bench_one(src: Path, label: str, qtype: str, out_dir: Path, args: argparse.Namespace, text: str) -> dict:
    """Export ``src`` as ``qtype`` into ``out_dir`` and measure it; returns one table row."""
    path = out_dir / f"{label}-{qtype}.gguf"
    report = export_gguf(open_checkpoint(src), path, qtype, progress=False)
    llm = load_llama(path, args.ctx, args.threads)
    result = perplexity(llm, tokenize(llm, text), args.ctx, args.chunks)
    del llm
    gc.collect()
    weights = [t for t in report["tensors"] if t["method"] != "norm"]
    if not args.keep:
        path.unlink()
    return {
        "source": label,
        "type": qtype,
        "file_bytes": report["file_size"],
        "bits_per_weight": report["bits_per_weight"],
        "lossless": sum(t["method"] == "lossless" for t in weights),
        "weights": len(weights),
        "ppl": result.ppl,
        "ppl_se": result.se,
        "chunks": result.n_chunks,
        "export_s": report["seconds"],
        "eval_tok_s": result.tokens_per_s,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'source':<10} {'type':<7} {'size MB':>8} {'bpw':>6} {'lossless':>9} {'PPL':>20} {'export s':>9} {'tok/s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ppl = f"{r['ppl']:.4f} +- {r['ppl_se']:.4f}" if r["ppl"] < 1e6 else f"{r['ppl']:.3e} +- {r['ppl_se']:.1e}"
        lossless = f"{r['lossless']}/{r['weights']}"
        lines.append(
            f"{r['source']:<10} {r['type']:<7} {r['file_bytes'] / 1e6:>8.1f} {r['bits_per_weight']:>6.3f} "
            f"{lossless:>9} {ppl:>20} {r['export_s']:>9.1f} {r['eval_tok_s']:>8.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="dense Hugging Face Gemma 2/3 checkpoint directory")
    ap.add_argument("--text", type=Path, required=True, help="evaluation text (e.g. wiki.test.raw)")
    ap.add_argument("--quantized", type=Path, help="quantized artifact of the same model (pack-quantized)")
    ap.add_argument("--types", default=DEFAULT_TYPES, help=f"comma-separated ({', '.join(FILE_TYPES)})")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None, help="default: all")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", type=Path, help="keep the GGUFs in this directory")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in FILE_TYPES]
    if unknown:
        ap.error(f"unknown GGUF type(s) {unknown}; choose from {', '.join(FILE_TYPES)}")
    sources = [("dense", args.model)] + ([("artifact", args.quantized)] if args.quantized else [])
    text = read_text(args.text)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for qtype in types:
            for label, src in sources:
                rows.append(bench_one(src, label, qtype, out_dir, args, text))
                if not args.json:
                    print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
