"""Byte-identity check across a code change: every recipe's artifact and every GGUF type, hashed.

Runs the ``quantkit`` command (the stable interface, whatever the modules behind it look like) on tiny random
Gemma 2 and Gemma 3 checkpoints: each recipe under ``recipes/`` (packed safetensors), GPTQ straight into
GGUF blocks, ``export`` of every GGUF type from the dense checkpoints and from packed artifacts, the
importance matrix, and ``import-gguf``. Every output file's SHA-256 goes into a JSON map; the report files
(``quantkit.json``) are hashed without their timing and memory fields, which differ from run to run.

    python scripts/check_identity.py --write before.json      # on the old code
    python scripts/check_identity.py --compare before.json    # on the new code: lists every difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

EXPORT_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q5_k", "q6_k", "q3_k_m", "q4_k_m"]
EXPORT_TYPES += ["q5_k_m"]
GPTQ_GGUF_TYPES = ["q4_0", "q8_0", "q4_k_m", "q3_k_m", "q6_k"]
CALIB = ["--nsamples", "8", "--seqlen", "64", "--calib", str(ROOT / "data" / "wiki.valid.excerpt.txt")]
VOLATILE = ("second", "time", "rss", "peak", "memory", "path", "version", "calib", "source")


def quantkit(*args: str | Path) -> None:
    cmd = [sys.executable, "-m", "quantkit.cli", "-q", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[3:])}: exit {proc.returncode}\n{proc.stderr[-2000:]}")


def _volatile(key: str) -> bool:
    return any(w in key.lower() for w in VOLATILE) or key.endswith("_s")


def _stable(value):
    """A JSON report without the fields that change from run to run (timings, memory, paths)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not _volatile(k)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def digest(path: Path) -> str:
    if path.name == "quantkit.json":
        text = json.dumps(_stable(json.loads(path.read_text())), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def outputs(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def run_all(work: Path) -> dict[str, str]:
    out = work / "out"
    out.mkdir()
    for arch in ("gemma2", "gemma3"):
        model = make_tiny_checkpoint(work / arch, arch=arch)
        for recipe in sorted((ROOT / "recipes").glob("*.toml")):
            quantkit("quantize", model, "--recipe", recipe, *CALIB, "-o", out / f"{arch}-{recipe.stem}")
        for qtype in EXPORT_TYPES:
            quantkit("export", model, "--type", qtype, "-o", out / f"{arch}-dense-{qtype}.gguf")
        for recipe, qtype in [("int4-g128-rtn", "q4_0"), ("int8-g128-rtn", "q8_0"), ("int4-g128-gptq", "q4_1")]:
            quantkit("export", out / f"{arch}-{recipe}", "--type", qtype, "-o", out / f"{arch}-{recipe}-{qtype}.gguf")
        for qtype in GPTQ_GGUF_TYPES:
            args = ["--method", "gptq", "--format", "gguf", "--type", qtype, *CALIB]
            quantkit("quantize", model, *args, "-o", out / f"{arch}-gptq-{qtype}.gguf")
        quantkit(
            "quantize",
            model,
            "--recipe",
            "int4-g128-gptq",
            *CALIB,
            "--format",
            "gguf",
            "--type",
            "q4_k_m",
            "--imatrix-out",
            out / f"{arch}.imatrix.gguf",
            "-o",
            out / f"{arch}-recipe-q4_k_m.gguf",
        )
        quantkit("import-gguf", out / f"{arch}-dense-q4_k_m.gguf", out / f"{arch}-imported")
    return outputs(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", type=Path, help="Write the digests to this JSON file.")
    ap.add_argument("--compare", type=Path, help="Compare the digests with this JSON file.")
    args = ap.parse_args()
    if not (args.write or args.compare):
        ap.error("give --write, --compare or both")
    with tempfile.TemporaryDirectory() as tmp:
        now = run_all(Path(tmp))
    if args.write:
        args.write.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"{len(now)} files hashed -> {args.write}")
    if not args.compare:
        return 0
    before = json.loads(args.compare.read_text())
    # sentencepiece records its training file's temporary path in the tiny checkpoint's tokenizer.model, and
    # import-gguf rebuilds that model from the GGUF: its bytes differ between any two runs of this script
    differ = sorted(k for k in before.keys() & now.keys() if before[k] != now[k] and not k.endswith("tokenizer.model"))
    gone, new = sorted(before.keys() - now.keys()), sorted(now.keys() - before.keys())
    for name in differ:
        print(f"DIFFERS  {name}")
    for name in gone:
        print(f"MISSING  {name}")
    for name in new:
        print(f"NEW      {name}")
    same = len(before.keys() & now.keys()) - len(differ)
    print(f"{same} of {len(before)} files byte-identical, {len(differ)} differ, {len(gone)} missing, {len(new)} new")
    return 1 if differ or gone else 0


if __name__ == "__main__":
    sys.exit(main())
