"""Command line: a thin shell over the library. Bad input -> one line on stderr, exit status 2."""

from __future__ import annotations

import json
import shutil
import sys

import click

from . import __version__
from .errors import QuantkitError


def _emit(result: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(result, indent=2) if as_json else text)


# export_gguf.FILE_TYPES' keys (kept here so that --help does not import torch)
GGUF_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q5_k", "q6_k"]
GGUF_TYPES += ["q3_k_m", "q4_k_m", "q5_k_m"]


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QuantkitError as e:
            click.echo(f"quantkit: error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantkit")
def cli() -> None:
    """Quantize Gemma 2 / Gemma 3 checkpoints (RTN, GPTQ), measure the drift, export GGUF or packed
    safetensors."""


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(model_dir: str, as_json: bool) -> None:
    """Architecture, config values, parameter count and size estimates of MODEL_DIR.

    Example: quantkit inspect ./gemma-2-9b
    """
    from .checkpoint import open_checkpoint
    from .summary import describe, format_summary

    d = describe(open_checkpoint(model_dir, require_tokenizer=False))
    _emit(d, as_json, format_summary(d))


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output directory (or .gguf file).")
@click.option("--recipe", help="A recipes/NAME.toml (or path); flags override it.")
@click.option("--bits", type=int, help="Weight bits: 8, 4 (also 3, 2).  [default: 4]")
@click.option(
    "--group", "group_size", type=int, help="Group size along the input dim; -1 = per channel. [default: 128]"
)
@click.option("--method", type=click.Choice(["gptq", "rtn"]), help="[default: gptq]")
@click.option("--sym/--asym", default=None, help="Symmetric (default) or asymmetric grid.")
@click.option("--calib", type=click.Path(), help="Calibration text (default: WikiText-2 validation).")
@click.option("--nsamples", type=int, help="Calibration windows. [default: 128]")
@click.option("--seqlen", type=int, help="Tokens per calibration window. [default: 512]")
@click.option("--seed", type=int, help="Seed for drawing calibration windows. [default: 0]")
@click.option("--act-order/--no-act-order", default=None, help="GPTQ columns by decreasing Hessian diagonal.")
@click.option("--damp", type=float, help="GPTQ damping, fraction of mean diag(H). [default: 0.01]")
@click.option(
    "--scale-dtype",
    type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
    help="Dtype of stored scales (auto: the checkpoint's; fp16 with --format gguf).",
)
@click.option(
    "--calib-dtype",
    type=click.Choice(["float32", "bfloat16"]),
    help="Dtype of the calibration activations carried between layers. [default: float32]",
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "gguf"]), default="safetensors", show_default=True)
@click.option(
    "--type",
    "gguf_type",
    type=click.Choice(GGUF_TYPES),
    default="q4_0",
    show_default=True,
    help="GGUF type with --format gguf.",
)
@click.option(
    "--imatrix-out",
    type=click.Path(),
    help="GPTQ: also write the calibration's importance as a llama.cpp imatrix (for llama-quantize --imatrix).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def quantize(model_dir, out, recipe, fmt, gguf_type, device, imatrix_out, as_json, **flags) -> None:
    """Quantize every decoder-layer linear of MODEL_DIR (RTN or GPTQ) into a packed checkpoint.

    Example: quantkit quantize ./gemma-2-9b --bits 4 --group 128 --method gptq -o ./gemma-2-9b-w4g128
    """
    from .quantize import quantize_checkpoint
    from .recipes import resolve_options

    opts = resolve_options(recipe, **flags)
    if fmt == "gguf":
        report = _quantize_to_gguf(model_dir, out, opts, gguf_type, device, imatrix_out)
    else:
        report = quantize_checkpoint(model_dir, out, opts, device=device, imatrix_out=imatrix_out)
    summary = (
        f"{out}: {opts.method} int{opts.bits} g{opts.group_size} {'sym' if opts.sym else 'asym'}, "
        f"{report['bits_per_weight']:.3f} bits/weight, mean weight rel. error {report['mean_weight_rel_err']:.3e}, "
        f"{report['seconds']:.1f} s, peak {report['peak_memory_bytes'] / 2**30:.2f} GiB"
    )
    _emit(report, as_json, summary)


def _quantize_to_gguf(model_dir, out, opts, gguf_type, device, imatrix_out) -> dict:
    """Quantize into a hidden artifact beside ``out``, then write its codes into the GGUF's blocks.

    GPTQ rounds every linear onto the fixed grid of the ggml type the GGUF stores it in (any legacy or K
    type); RTN quantizes with fp16 scales, whose int4/int8 codes go into Q4_0/Q8_0/Q4_1 blocks as they are."""
    from pathlib import Path

    from .export_gguf import export_gguf
    from .quantize import quantize_checkpoint

    out = Path(out)
    artifact = out.parent / f".{out.name}.artifact"  # resumable like any quantize output
    if opts.method == "gptq":
        report = quantize_checkpoint(model_dir, artifact, opts, device, gguf_type=gguf_type, imatrix_out=imatrix_out)
    else:
        if opts.scale_dtype == "auto":
            opts = opts.replace(scale_dtype="float16")
        report = quantize_checkpoint(model_dir, artifact, opts, device=device)
    try:
        report["gguf"] = export_gguf(artifact, out, gguf_type)
    finally:
        shutil.rmtree(artifact, ignore_errors=True)
    lossless = report["gguf"]["counts"]["lossless"]
    click.echo(f"{out}: {lossless} linear weights written into their GGUF blocks without re-rounding", err=True)
    return report


@cli.command()
@click.argument("src", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output file.")
@click.option("--format", "fmt", type=click.Choice(["gguf"]), default="gguf", show_default=True)
@click.option("--type", "qtype", type=click.Choice(GGUF_TYPES), default="q8_0", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report (per-tensor types) as JSON.")
def export(src: str, out: str, fmt: str, qtype: str, as_json: bool) -> None:
    """Write SRC (a model directory or a quantize output directory) as a GGUF that llama.cpp runs.

    Weights of a quantized SRC whose grid fits the GGUF type (symmetric int4 -> q4_0, int8 -> q8_0,
    int4 -> q4_1; groups a multiple of 32, fp16-exact scales) are written into the blocks without
    rounding again; the rest are quantized from their dequantized values.

    Example: quantkit export ./gemma-2-9b-w4g32 --format gguf --type q4_0 -o gemma-2-9b-q4_0.gguf
    """
    from .export_gguf import export_gguf

    report = export_gguf(src, out, qtype)
    _emit(report, as_json, _format_export(report))


def _format_export(r: dict) -> str:
    c = r["counts"]
    types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
    return (
        f"{r['path']}: {r['qtype']} ({types}), {r['file_size'] / 2**20:.1f} MiB, "
        f"{r['bits_per_weight']:.3f} bits/weight; "
        f"{c['lossless']} tensors written losslessly from quantized codes, {c['requantized']} quantized, "
        f"{c['norm']} norms; {r['seconds']:.1f} s"
    )


@cli.command("eval-ppl")
@click.argument("model_dir", type=click.Path())
@click.option(
    "--quantized",
    multiple=True,
    type=click.Path(),
    help="A quantized artifact directory or GGUF file of MODEL_DIR; repeat to score several in one pass.",
)
@click.option("--dataset", type=click.Path(), help="Evaluation text (default: WikiText-2 test, raw).")
@click.option("--ctx", default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", type=int, help="Evaluate only the first N chunks.")
@click.option("--batch-size", default=1, show_default=True, help="Chunks per forward.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--stream/--no-stream", default=None, help="Layer-streamed evaluation (default: when needed).")
@click.option("--plot", type=click.Path(), help="Draw KLD and delta-ppl against bits/weight to this image.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def eval_ppl(model_dir, quantized, dataset, ctx, chunks, batch_size, dtype, device, stream, plot, as_json) -> None:
    """Perplexity of MODEL_DIR (llama-perplexity's method), and with --quantized the drift: Δppl, KL
    divergence, top-1 agreement, on the same tokens. Several --quantized (packed artifacts and GGUF files,
    mixed) are scored against one reference pass and reported in one table.

    Example: quantkit eval-ppl ./gemma-2-9b --quantized ./w4g128 --quantized model-q4_0.gguf --chunks 40
    """
    import torch

    from .checkpoint import open_checkpoint
    from .data import default_evaluation_text, perplexity_chunks
    from .evaluate import evaluate_many
    from .report import format_table, open_quantized, rows
    from .report import plot as draw
    from .tokenizer import Tokenizer

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantkitError("--device cuda: no CUDA device is available")
    if plot and not quantized:
        raise QuantkitError("--plot: give at least one --quantized model to plot")
    ref = open_checkpoint(model_dir)
    quants = [open_quantized(q, ref) for q in quantized]
    data = dataset or default_evaluation_text()
    ids = perplexity_chunks(Tokenizer(ref.tokenizer_path), data, ctx, chunks)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    results = evaluate_many(ref, ids, quants, dtype=dt, device=device, stream=stream, batch_size=batch_size)
    res = dict(results[0], dataset=str(data))
    if quants:
        res["models"] = rows(quants, results)
    if plot:
        res["plot"] = str(draw(res["models"], plot, f"{ref.path.name}: {res['chunks']} x {res['ctx']} tokens"))
    text = _format_eval(res) if len(quants) <= 1 else format_table(res["reference"], res["models"])
    _emit(res, as_json, text)


def _format_eval(r: dict) -> str:
    ref = r["reference"]
    lines = [f"chunks {r['chunks']} x ctx {r['ctx']}, {r['tokens_scored']} tokens scored, "
             f"{r['tokens_per_s']:.1f} tokens/s ({r['mode']})",
             f"reference  ppl {ref['ppl']:.4f} +/- {ref['ppl_se']:.4f}"]  # fmt: skip
    if "quantized" in r:
        q = r["quantized"]
        lines += [
            f"quantized  ppl {q['ppl']:.4f} +/- {q['ppl_se']:.4f}",
            f"delta ppl  {r['delta_ppl']:+.4f} ({r['delta_ppl_pct']:+.3f}%)",
            f"KL div.    mean {r['kld_mean']:.6f}, p99 {r['kld_p99']:.6f}, p99.9 {r['kld_p999']:.6f}",
            f"same top-1 {100 * r['top1_agreement']:.2f}%",
        ]
    return "\n".join(lines)


@cli.command("import-gguf")
@click.argument("gguf_file", type=click.Path())
@click.argument("out_dir", type=click.Path())
def import_gguf_cmd(gguf_file: str, out_dir: str) -> None:
    """Turn a Gemma 2 / Gemma 3 GGUF into a Hugging Face checkpoint (dequantized, fp32).

    Example: quantkit import-gguf gemma-3-270m-q4_k_m.gguf ./gemma-3-270m
    """
    from .gguf_import import import_gguf

    click.echo(import_gguf(gguf_file, out_dir))


def main() -> None:
    sys.exit(cli.main(prog_name="quantkit", standalone_mode=True))


if __name__ == "__main__":
    main()
