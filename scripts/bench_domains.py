"""KLD by domain: does a calibration set hold on text it has not seen? (issue 19's evidence, one run)

For each calibration (default: WikiText-2 validation alone, and the shipped ``mix`` with the full WikiText-2
validation as its prose) and each GGUF type:
  1. the calibration windows quantkit draws (``nsamples`` x 512 tokens) are decoded back to text, one window
     per 512-token chunk, and that file is what ``llama-imatrix`` reads: both tools see the same tokens;
  2. ``llama-quantize --imatrix`` and ``quantkit quantize --format gguf --method gptq`` (the default
     settings) write the type; a plain ``llama-quantize`` file is the baseline without calibration;
  3. ``llama-perplexity --kl-divergence`` scores every file against the F32 GGUF, separately on each domain
     (default: WikiText-2 test, and the shipped ``code``, ``chat`` and ``fr`` evaluation texts, none of
     which is in any calibration text), ``chunks`` x 512 tokens each.
Prints one table (KLD mean per domain, and quantkit / llama.cpp+imatrix ratios) and writes results.json.

    python scripts/bench_domains.py [--types q4_0,q3_k_m] [--calibs wiki,mix] [--nsamples 64] [--chunks 20] \\
        [--domains wiki,code,chat,fr] [--out build/domains]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compare import LLAMA_TYPES, llama_kld, quantkit, sh  # noqa: E402
from demo import fetch_model  # noqa: E402
from wikitext import WIKI_TEST, WIKI_VALID  # noqa: E402

from quantkit.io.calibration import calibration_set_windows  # noqa: E402
from quantkit.io.texts import resolve_dataset  # noqa: E402
from quantkit.io.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TYPES = {**LLAMA_TYPES, "q3_k_s": "Q3_K_S", "q4_k_s": "Q4_K_S", "q2_k": "Q2_K", "iq4_xs": "IQ4_XS"}


def calib_spec(name: str) -> str:
    """A --calibs entry as a --calib value: 'wiki' is the full WikiText-2 validation when it is here."""
    wiki = str(WIKI_VALID) if WIKI_VALID.is_file() else "wiki"
    return {"wiki": wiki, "mix": f"{wiki},code,chat,multilingual"}.get(name, name)


def windows_text(tok: Tokenizer, spec: str, nsamples: int, dest: Path) -> Path:
    """The calibration windows quantkit draws, decoded, one per line: what llama-imatrix is given."""
    if not dest.is_file():
        ids = calibration_set_windows(tok, spec, nsamples, 512, 0)
        dest.write_text("\n".join(tok.decode(row[1:]) for row in ids.tolist()) + "\n", encoding="utf-8")
    return dest


def domain_path(name: str) -> Path:
    if name == "wiki" and WIKI_TEST.is_file():
        return WIKI_TEST
    return resolve_dataset(name)[1]


def build(args: argparse.Namespace) -> dict:
    out, bin_dir = Path(args.out), Path(args.llama_bin)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else fetch_model(ROOT / "build" / "demo")
    tok = Tokenizer(model / "tokenizer.model")
    f32 = out / "f32.gguf"
    if not f32.is_file():
        sh(quantkit("export", str(model), "--type", "f32", "-o", str(f32)))
    files: list[tuple[str, str, str, Path]] = []  # (type, source, calibration, path)
    for t in args.types.split(","):
        plain = out / f"llama-quantize-{t}.gguf"
        if not plain.is_file():
            sh([str(bin_dir / "llama-quantize"), str(f32), str(plain), LLAMA_TYPES[t]])
        files.append((t, "llama-quantize", "-", plain))
    for c in args.calibs.split(","):
        spec = calib_spec(c)
        text = windows_text(tok, spec, args.nsamples, out / f"calib-{c}.txt")
        imatrix = out / f"llama-{c}.imatrix.gguf"
        if not imatrix.is_file():
            sh([str(bin_dir / "llama-imatrix"), "-m", str(f32), "-f", str(text), "--chunks", str(args.nsamples),
                "-c", "512", "-o", str(imatrix)], out / f"llama-imatrix-{c}.log")  # fmt: skip
        for t in args.types.split(","):
            dest = out / f"llama-imatrix-{c}-{t}.gguf"
            if not dest.is_file():
                sh([str(bin_dir / "llama-quantize"), "--imatrix", str(imatrix), str(f32), str(dest), LLAMA_TYPES[t]])
            files.append((t, "llama-quantize+imatrix", c, dest))
            dest = out / f"quantkit-{c}-{t}.gguf"
            if not dest.is_file():
                sh(quantkit("quantize", str(model), "--format", "gguf", "--type", t, "--nsamples", str(args.nsamples),
                            "--calib", spec, "-o", str(dest)), out / f"quantkit-{c}-{t}.log")  # fmt: skip
            files.append((t, "quantkit gptq", c, dest))
    rows = [{"type": t, "source": s, "calib": c, "file": p.name, "bytes": p.stat().st_size} for t, s, c, p in files]
    for d in args.domains.split(","):
        text = domain_path(d)
        base = out / f"f32.{d}.kld-base.bin"
        if not base.is_file():
            sh([str(bin_dir / "llama-perplexity"), "-m", str(f32), "-f", str(text), "--kl-divergence-base",
                str(base), "--chunks", str(args.chunks), "-c", "512"], out / f"llama-base-{d}.log")  # fmt: skip
        for row, (_, _, _, p) in zip(rows, files, strict=True):
            row[d] = llama_kld(bin_dir, p, base, text, args.chunks, out / f"{p.stem}.{d}.kld.log")
    calibs = {c: calib_spec(c) for c in args.calibs.split(",")}
    return {"model": str(model), "nsamples": args.nsamples, "chunks": args.chunks, "rows": rows,
            "domains": args.domains.split(","), "calibs": calibs}  # fmt: skip


def markdown(d: dict) -> str:
    doms = d["domains"]
    head = "| type | file | calibration | MiB | " + " | ".join(f"KLD {x}" for x in doms) + " |"
    lines = [head, "|" + "---|" * (4 + len(doms))]
    peer = {(r["type"], r["calib"]): r for r in d["rows"] if r["source"] == "llama-quantize+imatrix"}
    for r in d["rows"]:
        cells = []
        for x in doms:
            kld = r[x]["llama_kld"]
            p = peer.get((r["type"], r["calib"])) if r["source"] == "quantkit gptq" else None
            cells.append(f"{kld:.4f}" + (f" ({kld / p[x]['llama_kld']:.2f}×)" if p else ""))
        lines.append(
            f"| {r['type']} | {r['source']} | {r['calib']} | {r['bytes'] / 2**20:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model dir (default: the imported Gemma 3 270M)")
    ap.add_argument("--llama-bin", default=str(ROOT / "build" / "llama.cpp" / "bin"))
    ap.add_argument("--types", default="q4_0,q3_k_m")
    ap.add_argument("--calibs", default="wiki,mix", help="wiki, mix, or any --calib value")
    ap.add_argument("--domains", default="wiki,code,chat,fr")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--out", default="build/domains")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    d = build(args)
    (Path(args.out) / "results.json").write_text(json.dumps(d, indent=2))
    print(json.dumps(d, indent=2) if args.json else markdown(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
