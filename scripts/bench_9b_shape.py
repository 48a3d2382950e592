"""Gemma 2 9B's shapes end to end: quantize (RTN, GPTQ), eval-ppl, GGUF export, llama.cpp loading.

No 9B weights exist here, so this writes a random bf16 checkpoint with the 9B's exact config (hidden 3584,
16 heads x 256, 8 KV heads, MLP 14336, vocab 256000, soft-caps, window 4096) and ``--layers`` decoder
layers (42 = the real depth, about 18.5 GB), then runs each step in its own process and records its wall
time and its own peak RSS:

  1. quantize int4 g128 RTN -> packed safetensors
  2. eval-ppl, reference vs RTN, ``--chunks`` chunks, layer-streamed
  3. quantkit export of the checkpoint to GGUF Q4_0 and Q4_K_M
  4. llama.cpp (llama-cpp-python) loads the Q4_0 file and returns finite logits for a few tokens
  5. peers, when ``--llama-bin DIR`` holds llama.cpp's tools (scripts/build_llamacpp.sh builds them):
     llama-quantize BF16 GGUF -> Q4_0 (time, peak RSS) and llama-perplexity on the Q4_0 file (tokens/s)
  6. quantize int4 g128 GPTQ on ``--nsamples`` x ``--seqlen`` tokens, last, optionally stopped after
     ``--gptq-timeout`` seconds; each layer's peak RSS so far (flat across layers when memory is bounded by
     one layer) and its time split: forward, Hessian accumulation, solver, diagnostics
  7. ``--gguf-types T,...``: GPTQ straight into each GGUF type's blocks (``quantize --format gguf --type T``,
     the GGUF defaults), the same per-layer split: the codebook types' solver against forward + Hessian

    python scripts/bench_9b_shape.py [--layers 42] [--nsamples 8] [--seqlen 512] [--chunks 2] \\
        [--threads N] [--llama-bin DIR] [--model EXISTING_DIR] [--workdir DIR] [--gptq-timeout S] \\
        [--gptq-recipe NAME|plain] [--gguf-types iq4_xs,iq3_m,iq2_m] [--json]

Everything is written under a temporary directory in ``--workdir`` (default: the current directory) and
deleted at the end; ``--model`` reuses a checkpoint written before (it is never deleted).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
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

# llama.cpp through llama-cpp-python: load the GGUF, evaluate a few tokens, check the logits are finite.
_LLAMA_LOGITS = """
import json, sys, numpy as np
sys.path.insert(0, sys.argv[1])
from llamacpp_ppl import load_llama
llm = load_llama(sys.argv[2], 64, int(sys.argv[3]))
tokens = [2, 10, 20, 30, 40, 50, 60, 70]
llm.eval(tokens)
logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
print(json.dumps({"finite": bool(np.isfinite(logits).all()), "shape": list(logits.shape)}))
"""


def timed(cmd: list[str], env: dict) -> dict:
    """Run a command; its wall time, its own peak RSS and its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_CHILD, *cmd], capture_output=True, text=True, check=False, env=env
    )
    seconds = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd[:5]))}: failed:\n{proc.stderr[-3000:]}")
    return {
        "seconds": seconds,
        "peak_rss_gib": int(lines[-1]) * 1024 / 2**30,
        "stdout": proc.stdout,
        "err": proc.stderr,
    }


def gptq_layers(report: dict) -> list[dict]:
    """Per-layer rows of a GPTQ quantkit.json: peak RSS so far, time split, and GPTQ's ratio to the
    unavoidable work (layer time / (forward + Hessian accumulation))."""
    rows = []
    for r in report["layers"]:
        base = r["forward_s"] + r["hessian_s"]
        rows.append({**r, "ratio_to_forward_hessian": r["layer_s"] / base if base else float("nan")})
    return rows


def run_steps(args: argparse.Namespace, work: Path, model: Path, env: dict) -> tuple[list[dict], dict]:
    q = [sys.executable, "-m", "quantkit.cli"]
    rows: list[dict] = []
    extra: dict = {}

    def step(name: str, cmd: list, peer: str = "") -> dict:
        r = timed([str(c) for c in cmd], env)
        rows.append({"step": name, "seconds": r["seconds"], "peak_rss_gib": r["peak_rss_gib"], "peer": peer})
        print(f"{name}: {r['seconds']:.0f} s, peak RSS {r['peak_rss_gib']:.2f} GiB", file=sys.stderr)
        return r

    steps = set(args.steps.split(","))
    q4_0 = work / "model.q4_0.gguf"
    if "rtn" in steps or "eval" in steps:
        step("quantize int4 g128 RTN -> packed safetensors", [*q, "quantize", model, "--recipe", "int4-g128-rtn",
                                                              "-o", work / "rtn"])  # fmt: skip
    if "eval" in steps:
        ev = step(
            f"eval-ppl reference vs RTN, {args.chunks} chunks (layer-streamed)",
            [*q, "eval-ppl", model, "--quantized", work / "rtn", "--stream", "--chunks", args.chunks, "--json"],
        )
        eval_res = json.loads(ev["stdout"])
        extra["eval"] = {k: eval_res[k] for k in ("tokens_per_s", "delta_ppl_pct", "kld_mean", "chunks")}
    shutil.rmtree(work / "rtn", ignore_errors=True)  # disk: the full-depth files are 5-19 GB each
    for gtype in ("q4_0", "q4_k_m") if "export" in steps else ():
        out = work / f"model.{gtype}.gguf"
        step(f"export GGUF {gtype.upper()}", [*q, "export", model, "--format", "gguf", "--type", gtype, "-o", out])
        if gtype != "q4_0":  # llama.cpp reads the Q4_0 file below
            out.unlink()
    if ("llama" in steps or "peers" in steps) and not q4_0.exists():  # their input, made untimed
        subprocess.run([*q, "export", model, "--format", "gguf", "--type", "q4_0", "-o", q4_0], check=True, env=env)
    if "llama" in steps:
        r = step(
            "llama.cpp (llama-cpp-python) loads Q4_0, logits for 8 tokens",
            [sys.executable, "-c", _LLAMA_LOGITS, ROOT / "scripts", q4_0, args.threads],
        )
        extra["llama_logits"] = json.loads(r["stdout"].strip().splitlines()[-1])
        if not extra["llama_logits"]["finite"]:
            raise SystemExit("llama.cpp returned non-finite logits for the Q4_0 file")
    if "peers" in steps and args.llama_bin:
        peer_rows(args, work, model, Path(args.llama_bin), rows, env, q, extra)
    q4_0.unlink(missing_ok=True)
    if "gptq" in steps:
        gptq_step(args, work, model, env, q, rows, extra)
    for gtype in [t for t in args.gguf_types.split(",") if t]:
        out = work / f"gptq.{gtype}.gguf"
        r = step(f"quantize GPTQ -> GGUF {gtype.upper()} ({args.nsamples} x {args.seqlen} tokens)",
                 [*q, "quantize", model, "--format", "gguf", "--type", gtype, "--method", "gptq", "--nsamples",
                  args.nsamples, "--seqlen", args.seqlen, "--json", "-o", out])  # fmt: skip
        extra.setdefault("gguf_layers", {})[gtype] = gptq_layers(json.loads(r["stdout"]))
        out.unlink()
    return rows, extra


def gptq_step(args, work: Path, model: Path, env: dict, q: list, rows: list[dict], extra: dict) -> None:
    """GPTQ last, stopped (SIGKILL) after ``--gptq-timeout`` seconds if given: the per-layer figures of the
    layers done come from the run's resume state, which a kill leaves behind."""
    settings = ["--recipe", args.gptq_recipe] if args.gptq_recipe != "plain" else ["--bits", 4, "--group", 128]
    cmd = [*q, "quantize", model, *settings, "--method", "gptq", "--nsamples", args.nsamples, "--seqlen",
           args.seqlen, "-o", work / "gptq"]  # fmt: skip
    t0 = time.perf_counter()
    with open(work / "gptq.err", "wb") as err:  # a file, not a pipe: a full pipe would stall it
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = t0 + args.gptq_timeout if args.gptq_timeout else float("inf")
    killed = False
    while True:  # wait4 (not poll, which would reap it) so that its rusage is ours to read
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() >= deadline:
            proc.send_signal(signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            killed = True
            break
        time.sleep(1)
    seconds = time.perf_counter() - t0
    if not killed and status:
        raise SystemExit(f"GPTQ failed:\n{(work / 'gptq.err').read_text()[-3000:]}")
    state = work / ".gptq.partial" / "resume-state.json"
    if killed:  # no state yet: stopped inside layer 0
        progress = json.loads(state.read_text())["progress"] if state.exists() else {"layers": []}
    else:
        progress = json.loads((work / "gptq" / "quantkit.json").read_text())
    extra["gptq_layers"] = gptq_layers(progress)
    done = len(extra["gptq_layers"])
    name = f"quantize int4 g128 GPTQ, {args.gptq_recipe} ({args.nsamples} x {args.seqlen} tokens)"
    if killed:
        name += f", stopped after {done} of {args.layers} layers"
    rows.append({"step": name, "seconds": seconds, "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30, "peer": ""})
    print(f"{name}: {seconds:.0f} s, peak RSS {rows[-1]['peak_rss_gib']:.2f} GiB", file=sys.stderr)
    print("\n".join(layer_lines(extra["gptq_layers"])), file=sys.stderr, flush=True)


def peer_rows(args, work: Path, model: Path, bins: Path, rows: list[dict], env: dict, q: list, extra: dict) -> None:
    """llama-quantize BF16 -> Q4_0 and llama-perplexity on the Q4_0 file, beside quantkit's figures."""
    bf16 = work / "model.bf16.gguf"
    subprocess.run([*q, "export", model, "--format", "gguf", "--type", "bf16", "-o", bf16], check=True, env=env)
    r = timed([str(c) for c in (bins / "llama-quantize", bf16, work / "peer.q4_0.gguf", "Q4_0", args.threads)], env)
    (work / "peer.q4_0.gguf").unlink()
    peer = f"llama-quantize BF16->Q4_0: {r['seconds']:.0f} s, {r['peak_rss_gib']:.2f} GiB"
    extra["llama_quantize_q4_0"] = {"seconds": r["seconds"], "peak_rss_gib": r["peak_rss_gib"]}
    for row in rows:
        if row["step"] == "export GGUF Q4_0":
            row["peer"] = peer
    bf16.unlink()
    from wikitext import evaluation_text

    cmd = [bins / "llama-perplexity", "-m", work / "model.q4_0.gguf", "-f", evaluation_text(), "-c", "512",
           "--chunks", args.chunks, "-t", args.threads]  # fmt: skip
    r = timed([str(c) for c in cmd], env)
    tok_s = perplexity_tokens_per_s(r["err"] + r["stdout"], args.chunks)
    if tok_s is not None:
        extra["llama_perplexity_tok_s"] = tok_s
        for row in rows if "eval" in extra else ():
            if row["step"].startswith("eval-ppl"):
                row["peer"] = f"llama-perplexity on the Q4_0 file: {tok_s:.0f} tok/s (quantkit: " + (
                    f"{extra['eval']['tokens_per_s']:.0f} tok/s, both models)"
                )


def perplexity_tokens_per_s(log: str, chunks: int) -> float | None:
    """llama-perplexity's speed from its log: it evaluates n_seq chunks of n_ctx tokens per pass and reports
    the seconds of the first pass (it prints no tokens/s of its own)."""
    seq = re.search(r"n_ctx=(\d+), batch_size=\d+, n_seq=(\d+)", log)
    per_pass = re.search(r"([\d.]+) seconds per pass", log)
    if seq is None or per_pass is None:
        return None
    n_ctx, n_seq = int(seq[1]), min(int(seq[2]), chunks)
    return n_seq * n_ctx / float(per_pass[1])


def table(args: argparse.Namespace, rows: list[dict], extra: dict) -> str:
    lines = [
        f"Gemma 2 9B shapes, {args.layers} random bf16 layers, {args.threads} threads",
        "| step | s | peak RSS GiB | peer, same input |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['step']} | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} | {r['peer'] or '–'} |" for r in rows]
    lines += [
        "",
        "GPTQ per layer (peak RSS so far; seconds: forward, Hessian, GGUF grids, solver, diagnostics, layer; "
        "layer / (fwd+H)):",
    ]
    lines += layer_lines(extra.get("gptq_layers", []))
    for gtype, layers in extra.get("gguf_layers", {}).items():
        lines += [f"GPTQ -> GGUF {gtype.upper()} per layer (the same columns):", *layer_lines(layers)]
    return "\n".join(lines)


def layer_lines(layers: list[dict]) -> list[str]:
    return [
        f"  layer {r['layer']:2d}: {r['peak_rss_gib']:.2f} GiB | {r['forward_s']:.1f} {r['hessian_s']:.1f} "
        f"{r.get('grid_s', 0.0):.1f} {r['solver_s']:.1f} {r['diagnostics_s']:.1f} {r['layer_s']:.1f} | "
        f"{r['ratio_to_forward_hessian']:.2f}"
        for r in layers
    ]


def write_checkpoint(path: Path, layers: int) -> Path:
    """The random 9B-shaped checkpoint, written by a child process. On Linux a process's peak RSS
    (ru_maxrss) carries over through fork and exec, so if this process generated the 1.8 GB embedding
    itself, every step started from it would report at least that generation's peak."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from make_tiny_checkpoint import make_tiny_checkpoint; "
        "from bench_9b_shape import NINE_B; "
        "make_tiny_checkpoint(sys.argv[2], 'gemma2', num_hidden_layers=int(sys.argv[3]), **NINE_B)"
    )
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(path), str(layers)], check=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=42)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-bin", help="directory with llama-quantize and llama-perplexity (peer figures)")
    ap.add_argument("--model", help="an existing 9B-shaped checkpoint to use instead of writing one")
    ap.add_argument("--workdir", default=".")
    ap.add_argument("--steps", default="rtn,eval,export,llama,peers,gptq", help="which steps to run")
    ap.add_argument(
        "--gptq-recipe",
        default="int4-g128-gptq",
        help="the GPTQ step's recipe, or 'plain' for `--bits 4 --group 128 --method gptq` (symmetric, min-max "
        "groups, no act-order, no fp_targets)",
    )
    ap.add_argument("--gguf-types", default="", help="also GPTQ into these GGUF types' blocks, one run each")
    ap.add_argument("--gptq-timeout", type=float, help="stop GPTQ after this many seconds (it runs last)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-9b-") as tmp:
        work = Path(tmp)
        if args.model:
            model = Path(args.model)
        else:
            t0 = time.perf_counter()
            model = write_checkpoint(work / "m", args.layers)
            print(
                f"random 9B-shaped checkpoint, {args.layers} layers: {time.perf_counter() - t0:.0f} s", file=sys.stderr
            )
        rows, extra = run_steps(args, work, model, env)
    if args.json:
        print(json.dumps({"layers": args.layers, "nsamples": args.nsamples, "rows": rows, **extra}, indent=2))
    else:
        print(table(args, rows, extra))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
