"""KLD by domain: does a calibration set hold on text it has not seen? (issue 19's evidence, one run)

For each calibration (default: WikiText-2 validation alone, and the shipped ``mix`` with the full WikiText-2
validation as its prose) and each GGUF type:
  1. the calibration windows quantkit draws (``nsamples`` x 512 tokens) are decoded back to text, one window
     per 512-token chunk, and that file is what ``llama-imatrix`` reads: both tools see the same tokens;
  2. ``llama-quantize --imatrix`` and ``quantkit quantize --format gguf --method gptq`` (the default
     settings) write the type; a plain ``llama-quantize`` file is the baseline without calibration; with
     ``--mixes B,...`` quantkit's budget mixes too, and with ``--peer TYPE/EMB`` llama-quantize + imatrix
     files whose token embedding is EMB (the peers of a mix's size: llama.cpp's rules keep it Q8_0);
  3. ``llama-perplexity --kl-divergence`` scores every file against the F32 GGUF, separately on each domain
     (default: WikiText-2 test, and the shipped ``code``, ``chat`` and ``fr`` evaluation texts, none of
     which is in any calibration text), ``chunks`` x 512 tokens each.
Prints one table (KLD mean per domain, and quantkit / llama.cpp+imatrix ratios) and writes results.json.

    python scripts/bench_domains.py [--types q4_0,q3_k_m] [--calibs wiki,mix] [--nsamples 64] [--chunks 20] \\
        [--domains wiki,code,chat,fr] [--out build/domains] [--mixes 2.5,3.0] [--peer iq2_m/q2_0] \\
        [--variant NAME=FLAGS] [--calib-set NAME=SPEC]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compare import LLAMA_TYPES, llama_kld, quantkit, sh  # noqa: E402
from demo import fetch_model  # noqa: E402
from wikitext import WIKI_TEST, WIKI_VALID  # noqa: E402

from quantkit.io.calibration import DEFAULT_CALIB, calibration_set_windows  # noqa: E402
from quantkit.io.texts import resolve_dataset  # noqa: E402
from quantkit.io.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def llama_name(t: str) -> str:
    """llama-quantize's name of a file type (Q4_0, IQ2_M, ...)."""
    return LLAMA_TYPES.get(t, t.upper())


def calib_spec(name: str, sets: dict[str, str] | None = None) -> str:
    """A --calibs entry as a --calib value: 'wiki' is the full WikiText-2 validation when it is here, 'mix'
    that with the shipped code, chat and multilingual texts, 'default' quantkit's default set as shipped, and a
    name given by --calib-set NAME=SPEC that SPEC (a --calib value with commas and weights)."""
    wiki = str(WIKI_VALID) if WIKI_VALID.is_file() else "wiki"
    presets = {"wiki": wiki, "mix": f"{wiki},code,chat,multilingual", "default": DEFAULT_CALIB, **(sets or {})}
    return presets.get(name, name)


def windows_text(tok: Tokenizer, spec: str, nsamples: int, dest: Path) -> Path:
    """The calibration windows quantkit draws, decoded, one per line: what llama-imatrix is given."""
    if not dest.is_file():
        ids = calibration_set_windows(tok, spec, nsamples, 512, 0)
        dest.write_text("\n".join(tok.decode(row[1:]) for row in ids.tolist()) + "\n", encoding="utf-8")
    return dest


def named(specs: list[str], option: str) -> list[tuple[str, str]]:
    """``NAME=VALUE`` entries of a repeatable option, as (name, value)."""
    out = []
    for v in specs:
        name, sep, value = v.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"{option} {v!r}: write NAME=VALUE, e.g. nofp='--no-fp-targets'")
        out.append((name, value))
    return out


def variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``--variant NAME=FLAGS`` entries as (name, quantize flags): solver settings scored beside the defaults."""
    return [(name, shlex.split(flags)) for name, flags in named(specs, "--variant")]


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
        refused = out / f"llama-quantize-{t}.refused"  # IQ2_* / IQ1_* files: llama-quantize wants an imatrix
        if not plain.is_file() and not refused.is_file():
            try:
                sh([str(bin_dir / "llama-quantize"), str(f32), str(plain), llama_name(t)], refused)
            except SystemExit:
                print(f"llama-quantize refuses {t} without an imatrix", flush=True)
            else:
                refused.unlink()
        if plain.is_file() and not args.no_plain:
            files.append((t, "llama-quantize", "-", plain))
    sets = dict(named(args.calib_set, "--calib-set"))
    for c in args.calibs.split(","):
        spec = calib_spec(c, sets)
        text = windows_text(tok, spec, args.nsamples, out / f"calib-{c}.txt")
        imatrix = out / f"llama-{c}.imatrix.gguf"
        if not imatrix.is_file():
            sh([str(bin_dir / "llama-imatrix"), "-m", str(f32), "-f", str(text), "--chunks", str(args.nsamples),
                "-c", "512", "-o", str(imatrix)], out / f"llama-imatrix-{c}.log")  # fmt: skip
        for t in args.types.split(","):
            dest = out / f"llama-imatrix-{c}-{t}.gguf"
            if not dest.is_file():
                sh([str(bin_dir / "llama-quantize"), "--imatrix", str(imatrix), str(f32), str(dest), llama_name(t)])
            files.append((t, "llama-quantize+imatrix", c, dest))
            for name, flags in [("", []), *variants(args.variant)]:  # the defaults, then each variant
                stem = f"quantkit-{c}-{t}" + (f"-{name}" if name else "")
                dest = out / f"{stem}.gguf"
                if not dest.is_file():
                    sh(quantkit("quantize", str(model), "--format", "gguf", "--type", t, "--nsamples",
                                str(args.nsamples), "--calib", spec, *flags, "-o", str(dest)),
                       out / f"{stem}.log")  # fmt: skip
                files.append((t, f"quantkit gptq {name}".rstrip(), c, dest))
        for peer in args.peer:  # llama-quantize's own answer to a budget: a type with a smaller embedding
            t, _, emb = peer.partition("/")
            dest = out / f"llama-imatrix-{c}-{t}-emb-{emb}.gguf"
            if not dest.is_file():
                sh([str(bin_dir / "llama-quantize"), "--imatrix", str(imatrix), "--token-embedding-type", emb,
                    str(f32), str(dest), llama_name(t)])  # fmt: skip
            files.append((f"{t} emb {emb}", "llama-quantize+imatrix", c, dest))
        for b in [x for x in args.mixes.split(",") if x]:
            dest = out / f"quantkit-{c}-mix{b}.gguf"
            if not dest.is_file():
                sh(quantkit("quantize", str(model), "--format", "gguf", "--type", args.mix_type, "--target-bpw", b,
                            "--nsamples", str(args.nsamples), "--calib", spec, "-o", str(dest)),
                   out / f"quantkit-{c}-mix{b}.log")  # fmt: skip
            files.append((f"mix {b}", "quantkit gptq mix", c, dest))
    rows = [{"type": t, "source": s, "calib": c, "file": p.name, "bytes": p.stat().st_size} for t, s, c, p in files]
    for d in args.domains.split(","):
        text = domain_path(d)
        base = out / f"f32.{d}.kld-base.bin"
        if not base.is_file():  # written under another name, then renamed: a run beside this one never reads half
            part = base.with_name(base.name + ".partial")
            sh([str(bin_dir / "llama-perplexity"), "-m", str(f32), "-f", str(text), "--kl-divergence-base",
                str(part), "--chunks", str(args.chunks), "-c", "512"], out / f"llama-base-{d}.log")  # fmt: skip
            part.rename(base)
        for row, (_, _, _, p) in zip(rows, files, strict=True):
            row[d] = llama_kld(bin_dir, p, base, text, args.chunks, out / f"{p.stem}.{d}.kld.log")
    calibs = {c: calib_spec(c, sets) for c in args.calibs.split(",")}
    return {"model": str(model), "nsamples": args.nsamples, "chunks": args.chunks, "rows": rows,
            "f32_bytes": f32.stat().st_size,
            "domains": args.domains.split(","), "calibs": calibs}  # fmt: skip


def _peer(d: dict, r: dict, dom: str) -> float | None:
    """The KLD quantkit's row is compared with: llama-quantize + imatrix at the same type, or for a mix the
    best llama-quantize + imatrix file of equal or larger size."""
    imx = [x for x in d["rows"] if x["source"] == "llama-quantize+imatrix" and x["calib"] == r["calib"]]
    if r["source"].startswith("quantkit gptq") and not r["source"].endswith("mix"):
        same = [x[dom]["llama_kld"] for x in imx if x["type"] == r["type"]]
        return same[0] if same else None
    if r["source"] == "quantkit gptq mix":
        larger = [x[dom]["llama_kld"] for x in imx if x["bytes"] >= r["bytes"]]
        return min(larger) if larger else None
    return None


def markdown(d: dict) -> str:
    """One row per file: size, bits per weight (over every tensor, from the F32 file's size), and per domain
    KLD mean (quantkit's ratio to its peer) / p99 / same top token %."""
    doms = d["domains"]
    head = "| type | file | calibration | MiB | bpw | " + " | ".join(f"{x}: KLD (ratio) / p99 / top %" for x in doms)
    lines = [head + " |", "|" + "---|" * (5 + len(doms))]
    for r in d["rows"]:
        cells = []
        for x in doms:
            k, peer = r[x], _peer(d, r, x)
            ratio = f" ({k['llama_kld'] / peer:.2f}×)" if peer else ""
            cells.append(f"{k['llama_kld']:.4f}{ratio} / {k['llama_kld_p99']:.3f} / {k['llama_same_top']:.1f}")
        bpw = 32 * r["bytes"] / d["f32_bytes"]
        lines.append(
            f"| {r['type']} | {r['source']} | {r['calib']} | {r['bytes'] / 2**20:.1f} | {bpw:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def plot(d: dict, path: Path) -> None:
    """Mean KLD against file size, one panel per domain, one line per source (log KLD)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = d["domains"]
    fig, axes = plt.subplots(1, len(doms), figsize=(4.2 * len(doms), 4), squeeze=False)
    for ax, dom in zip(axes[0], doms, strict=True):
        for src in dict.fromkeys(r["source"] for r in d["rows"]):
            pts = sorted((r["bytes"] / 2**20, r[dom]["llama_kld"], r["type"]) for r in d["rows"] if r["source"] == src)
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", alpha=0.7, label=src)
            for x, y, t in pts:
                ax.annotate(t, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points", color=line.get_color())
        ax.set_title(dom)
        ax.set_xlabel("file MiB")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("mean KLD vs F32 (llama-perplexity)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    ap.add_argument("--mixes", default="", help="quantkit budget mixes, bits per weight (2.5,3.0,...)")
    ap.add_argument("--mix-type", default="q4_k_m", help="the mixes' --type (the token embedding's type)")
    ap.add_argument(
        "--peer",
        action="append",
        default=[],
        help="TYPE/EMB: also llama-quantize + imatrix at TYPE with --token-embedding-type EMB (a mix's same-size peer)",
    )
    ap.add_argument("--plot", help="write KLD against file size, one panel per domain, to this PNG/SVG")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=FLAGS: also quantize every type with these quantize flags (a solver sweep)",
    )
    ap.add_argument(
        "--calib-set",
        action="append",
        default=[],
        help="NAME=SPEC: a calibration for --calibs, e.g. wiki2='wiki:2,code,chat,multilingual' (both tools get it)",
    )
    ap.add_argument("--no-plain", action="store_true", help="score only the calibrated files (faster)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    d = build(args)
    (Path(args.out) / "results.json").write_text(json.dumps(d, indent=2))
    print(json.dumps(d, indent=2) if args.json else markdown(d))
    if args.plot:
        plot(d, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
