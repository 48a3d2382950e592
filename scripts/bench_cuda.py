"""quantkit on a CUDA GPU, beside the CPU: the real Gemma 3 270M demo (int8/int4 RTN, int4 GPTQ, eval-ppl of
all three against the reference) with ``--device cuda``, compared with a CPU run's ``results.json`` of
scripts/demo.py at the same settings; and GPTQ over ``--layers`` layers of a random checkpoint with Gemma 2
9B's shapes at the recipe's 128 x 512 calibration tokens: seconds per layer, peak GPU memory, peak RSS
(``--also-cpu`` runs the same on the CPU for the RSS at that calibration size).

    python scripts/bench_cuda.py [--gguf-dir DIR] [--cpu-results build/demo/results.json] [--layers 2]
        [--nsamples 128] [--also-cpu] [--out build/cuda]

GPTQ's result moves with floating-point summation order, and a GPU sums in another order than a CPU, so
CUDA and CPU agree within run-to-run noise, not bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo  # noqa: E402
from bench_9b_shape import _PEAK_OF_CHILD  # noqa: E402
from bench_export import make_9b_shape  # noqa: E402


def real_270m(args: argparse.Namespace) -> dict:
    """scripts/demo.py's job with --device cuda; returns its results (also written as results.json)."""
    ns = argparse.Namespace(out=str(args.out / "270m"), chunks=args.chunks, ctx=512, nsamples=args.demo_nsamples,
                            seqlen=512, calib=args.calib, text=args.text, device=args.device)  # fmt: skip
    if args.gguf_dir:  # the GGUF brought along (demo.fetch_model then skips the PyPI package)
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        src, dst = Path(args.gguf_dir) / demo.GGUF_NAME, Path(ns.out) / demo.GGUF_NAME
        if not dst.exists():
            os.symlink(src.resolve(), dst)
    torch.manual_seed(0)
    d = demo.run(ns)
    d["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated() if args.device != "cpu" else None
    (Path(ns.out) / "results.json").write_text(json.dumps(d, indent=2))
    return d


def compare(cuda: dict, cpu: dict) -> list[str]:
    """CPU and CUDA figures of each recipe side by side."""
    lines = [
        "| recipe | quantize s CPU / CUDA | ppl CPU / CUDA | KLD mean CPU / CUDA | top-1 % CPU / CUDA |",
        "|---|---|---|---|---|",
    ]
    for a, b in zip(cpu["rows"], cuda["rows"], strict=True):
        qa, qb, ea, eb = a["quantize"], b["quantize"], a["eval"], b["eval"]
        lines.append(
            f"| {a['recipe']} | {qa['seconds']:.1f} / {qb['seconds']:.1f} | {ea['quantized']['ppl']:.4f} / "
            f"{eb['quantized']['ppl']:.4f} | {ea['kld_mean']:.5f} / {eb['kld_mean']:.5f} | "
            f"{100 * ea['top1_agreement']:.2f} / {100 * eb['top1_agreement']:.2f} |"
        )
    ra, rb = cpu["rows"][0]["eval"]["reference"]["ppl"], cuda["rows"][0]["eval"]["reference"]["ppl"]
    lines.append(f"reference ppl CPU {ra:.4f} / CUDA {rb:.4f}; eval s CPU {cpu['eval_seconds']} / CUDA "
                 f"{cuda['eval_seconds']}")  # fmt: skip
    return lines


def gptq_9b(args: argparse.Namespace, model: Path, device: str) -> dict:
    """quantize --recipe int4-g128-gptq on ``device`` in its own process: wall time, its peak RSS, and the
    per-layer figures of its quantkit.json."""
    out = args.out / f"9b-gptq-{device}"
    cmd = [sys.executable, "-m", "quantkit.cli", "--quiet", "quantize", str(model), "--recipe", "int4-g128-gptq",
           "--nsamples", str(args.nsamples), "--seqlen", "512", "--device", device, "-o", str(out),
           "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _PEAK_OF_CHILD, *cmd], capture_output=True, text=True,
                              timeout=args.timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"device": device, "timed_out_after_s": args.timeout}
    res = {"device": device, "seconds": time.perf_counter() - t0}
    if proc.returncode:
        return res | {"error": proc.stderr[-2000:]}
    res["peak_rss_gib"] = int(proc.stderr.strip().splitlines()[-1]) * 1024 / 2**30
    report = json.loads((out / "quantkit.json").read_text())
    res["layers"] = report["layers"]
    res["peak_gpu_gib"] = (report.get("peak_gpu_memory_bytes") or 0) / 2**30
    res["mean_output_rel_err"], res["mean_rtn_output_rel_err"] = (
        report["mean_output_rel_err"],
        report["mean_rtn_output_rel_err"],
    )
    return res


def nine_b_lines(runs: list[dict], nsamples: int) -> list[str]:
    lines = [
        f"GPTQ int4 g128 on Gemma 2 9B's shapes, {nsamples} x 512 calibration tokens",
        "| device | s total | s/layer (forward, Hessian, solver, diagnostics) | peak RSS GiB | peak GPU GiB |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        if "layers" not in r:
            lines.append(f"| {r['device']} | {r} | | | |")
            continue
        per = [
            f"{x['layer_s']:.1f} ({x['forward_s']:.1f}, {x['hessian_s']:.1f}, {x['solver_s']:.1f}, "
            f"{x['diagnostics_s']:.1f})"
            for x in r["layers"]
        ]
        lines.append(
            f"| {r['device']} | {r['seconds']:.0f} | {'; '.join(per)} | {r['peak_rss_gib']:.2f} | "
            f"{r['peak_gpu_gib']:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("build/cuda"))
    ap.add_argument("--gguf-dir", help=f"a directory holding {demo.GGUF_NAME} (else the PyPI package's)")
    ap.add_argument("--cpu-results", help="results.json of scripts/demo.py run on the CPU, same settings")
    ap.add_argument("--calib", help="calibration text (default: WikiText-2 validation)")
    ap.add_argument("--text", help="evaluation text (default: WikiText-2 test)")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--demo-nsamples", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2, help="layers of the 9B-shaped checkpoint (0: skip)")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows of 512 for the 9B shape")
    ap.add_argument("--also-cpu", action="store_true", help="also run the 9B-shape GPTQ on the CPU")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed to each 9B-shape run")
    ap.add_argument("--skip-270m", action="store_true")
    ap.add_argument("--device", default="cuda", help="the device under test (cpu only to try this script out)")
    args = ap.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    summary: dict = {"gpu": gpu, "torch": torch.__version__, "cpus": os.cpu_count()}
    if not args.skip_270m:
        cuda = real_270m(args)
        print(demo.table(cuda), flush=True)
        summary["gemma3_270m_cuda"] = cuda
        if args.cpu_results:
            print("\n".join(compare(cuda, json.loads(Path(args.cpu_results).read_text()))), flush=True)
    if args.layers:
        t0 = time.perf_counter()
        model = make_9b_shape(args.out / "9b-shape", args.layers)
        summary["nine_b_write_s"] = time.perf_counter() - t0
        runs = [gptq_9b(args, model, args.device)]
        print("\n".join(nine_b_lines(runs, args.nsamples)), flush=True)
        if args.also_cpu:
            runs.append(gptq_9b(args, model, "cpu"))
            print("\n".join(nine_b_lines(runs[1:], args.nsamples)), flush=True)
        summary["nine_b_gptq"] = runs
    (args.out / "bench_cuda.json").write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
