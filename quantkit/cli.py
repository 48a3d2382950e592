"""Command line: a thin shell over the library. Bad input -> one line on stderr, exit status 2."""

from __future__ import annotations

import contextvars
import json
import os
import re
import signal
import sys
import threading
import traceback

import click

from quantkit import __version__
from quantkit.errors import EXIT_BUG, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, QuantkitError, Terminated, user_message
from quantkit.formats.gguf.file_types import FILE_TYPE_NAMES
from quantkit.io.locks import release_outputs


def _emit(result: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(result, indent=2) if as_json else text)


GGUF_TYPES = list(FILE_TYPE_NAMES)  # plain names: --help imports neither gguf-py nor torch


class DeviceType(click.ParamType):
    """cpu, cuda or cuda:N, refused when that device is not available here."""

    name = "device"

    def convert(self, value, param, ctx) -> str:
        value = str(value).strip().lower()
        m = re.fullmatch(r"cuda(?::(\d+))?", value)
        if value != "cpu" and m is None:
            self.fail(f"{value!r} is not a device (choose cpu, cuda or cuda:N)", param, ctx)
        if m is not None:
            import torch

            if not torch.cuda.is_available():
                self.fail(f"{value}: no CUDA device is available (use --device cpu)", param, ctx)
            if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
                self.fail(f"{value}: only {torch.cuda.device_count()} CUDA device(s) here", param, ctx)
        return value


DEVICE = DeviceType()
_TENSOR_TYPE = click.option(
    "--tensor-type",
    "tensor_types",
    multiple=True,
    metavar="PATTERN=TYPE",
    help="As llama-quantize's: weights whose GGUF name matches the regex PATTERN get TYPE (first match wins; "
    "repeatable), e.g. attn_v=q8_0 or 'blk\\.1[0-9]\\.ffn_down=q6_k'.",
)


def _MIX_OPTIONS(f):  # noqa: N802 (a decorator, named as the other option constants)
    """--tensor-type, --target-bpw, --max-size, --imatrix: the options that edit a GGUF's per-tensor types."""
    for opt in reversed([
        _TENSOR_TYPE,
        click.option("--target-bpw", type=click.FloatRange(0, min_open=True),
                     help="Choose each layer weight's GGUF type to minimise the predicted error at this many bits "
                     "per weight (over every tensor, as the report counts them; docs/mixes.md)."),
        click.option("--max-size", help="As --target-bpw, for a GGUF of at most SIZE bytes (180M, 5.2G, 512MiB)."),
        click.option("--imatrix", type=click.Path(),
                     help="An importance matrix (llama-imatrix's GGUF, or quantize --imatrix-out's). export: used as "
                     "llama-quantize --imatrix uses it (the same bytes); with --target-bpw / --max-size it also "
                     "weighs each weight's predicted error."),
    ]):  # fmt: skip
        f = opt(f)
    return f


def _type_choice(ckpt, qtype, tensor_types, target_bpw, max_size, imatrix, encodes=False, gptq=False):
    """The GGUF's per-tensor types from the mix options (policy's rules when none is given) and the
    importance matrix, read once (None without one, or for an empty one, as llama-quantize treats it).
    ``encodes``: the imatrix also weighs the rounding (export), so it is welcome without a budget. A file
    written with calibration (``gptq``, or an export's imatrix) takes llama-quantize's imatrix rules, and its
    mix the codebook i-quants."""
    from quantkit.formats.gguf.imatrix import load_imatrix
    from quantkit.formats.gguf.mix import choose_types, parse_size
    from quantkit.formats.gguf.policy import check_overrides, parse_override

    overrides = [parse_override(o) for o in tensor_types]
    check_overrides(qtype, overrides)
    if target_bpw is not None and max_size is not None:
        raise QuantkitError("--target-bpw and --max-size: give one budget")
    size = None if max_size is None else parse_size(max_size)
    if imatrix and not encodes and target_bpw is None and size is None:
        raise QuantkitError("--imatrix: it weighs a budget mix's errors; give --target-bpw or --max-size")
    imp = load_imatrix(imatrix) if imatrix else None
    imp = imp if imp is not None and imp.vectors else None
    vectors = imp.vectors if imp is not None else None
    calibrated = gptq or (encodes and vectors is not None)
    return choose_types(ckpt, qtype, overrides, target_bpw, size, vectors, _progress(), calibrated), imp


_OVERWRITE = click.option(
    "--overwrite", is_flag=True, help="Replace an existing output (a file, or a directory quantkit wrote)."
)


def _usage_line(e: click.UsageError) -> str:
    """One line for a click usage error: the option, the problem, where to look."""
    msg = " ".join(e.format_message().split())
    if isinstance(e, click.BadParameter) and e.param is not None:
        opts = getattr(e.param, "opts", None) or [e.param.name or "?"]
        name = opts[0] if opts[0].startswith("-") else (e.param.human_readable_name or opts[0]).upper()
        msg = f"{name}: {' '.join(e.message.split())}"
    msg = msg.removesuffix(".")
    cmd = e.ctx.command_path if e.ctx is not None else "quantkit"
    return f"{msg} (see '{cmd} --help')"


def _report_bug() -> None:
    traceback.print_exc()
    click.echo(
        f"quantkit: internal error (a bug in quantkit {__version__}); please report it with the command line "
        "and the traceback above",
        err=True,
    )


def _on_sigterm(signum, frame) -> None:
    raise Terminated


class _Group(click.Group):
    """Runs a command and maps every way it can end to one exit status (see README, errors)."""

    def main(self, args=None, prog_name=None, **extra):  # one place for every way a command ends
        debug = os.environ.get("QUANTKIT_DEBUG", "") not in ("", "0")
        in_main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
        code = 0
        try:
            run = contextvars.copy_context().run  # what a command records (atomic._REPLACE) ends with it
            rv = run(super().main, args=args, prog_name="quantkit", standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.exceptions.Exit as e:
            code = e.exit_code
        except click.UsageError as e:
            if debug:
                traceback.print_exc()
            click.echo(f"quantkit: error: {_usage_line(e)}", err=True)
            code = EXIT_USAGE
        except click.ClickException as e:
            click.echo(f"quantkit: error: {' '.join(e.format_message().split())}", err=True)
            code = e.exit_code
        except (KeyboardInterrupt, click.exceptions.Abort, Terminated) as e:
            if debug:
                traceback.print_exc()
            click.echo("quantkit: interrupted", err=True)
            code = EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT
        except Exception as e:
            msg = user_message(e)
            if msg is None:
                _report_bug()
                code = EXIT_BUG
            else:
                if debug:
                    traceback.print_exc()
                click.echo(f"quantkit: error: {msg}", err=True)
                code = EXIT_USAGE
        finally:
            release_outputs()  # outputs this command took (check_output) are free for the next one
            if in_main:
                signal.signal(signal.SIGTERM, old)
        sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantkit")
@click.option(
    "-q", "--quiet", is_flag=True, help="No progress bars (they also stay off when stderr is not a terminal)."
)
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """Quantize Gemma 2 / Gemma 3 checkpoints (RTN, GPTQ), measure the drift, export GGUF or packed
    safetensors."""
    ctx.obj = {"progress": not quiet and sys.stderr.isatty()}


def _progress() -> bool:
    ctx = click.get_current_context()
    return bool((ctx.find_root().obj or {}).get("progress", False))


MODEL_HELP = "MODEL_DIR may also be a Hugging Face id, org/name[@revision] (fetched into the hub cache)."


@cli.command(epilog=MODEL_HELP)
@click.argument("model_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(model_dir: str, as_json: bool) -> None:
    """Architecture, config values, parameter count and size estimates of MODEL_DIR.

    Example: quantkit inspect ./gemma-2-9b
    """
    from quantkit.eval.summary import describe, format_summary
    from quantkit.io.checkpoint import open_checkpoint
    from quantkit.io.hub import resolve_model

    d = describe(open_checkpoint(resolve_model(model_dir), require_tokenizer=False))
    _emit(d, as_json, format_summary(d))


# Measured on the real Gemma 3 270M (docs/defaults.md has the commands): what the defaults cost and give.
FAST_COST = "The defaults take about 1.6x its time (270M, int4 g128, side by side on 2 CPU cores)."
QUANTIZE_HELP = """Quantize every decoder-layer linear of MODEL_DIR (RTN or GPTQ) into a packed checkpoint, or with
--format gguf into a GGUF file (GPTQ rounds onto the ggml type's own grid).

\b
Without --recipe, GPTQ uses the settings measured best (docs/defaults.md):
act-order (static groups), the H-block range search and --fp-targets, and
for int4 an asymmetric grid with fp16 scales (4.156 bits/weight at group 128).
On Gemma 3 270M (int4 g128, 64 x 512 calibration tokens, 40 x 512 eval) they
are the recipe int4-g128-gptq: KLD 0.099 (plain GPTQ, symmetric: 0.244). They
take about 1.6x the time of --fast, which keeps the grid but runs plain GPTQ.
The artifact loads in transformers (compressed-tensors); its layout is the one
vLLM's WNA16 scheme reads. --format gguf uses the same GPTQ settings on the
ggml type's grid. RTN stays plain.

Example: quantkit quantize ./gemma-2-9b --bits 4 --group 128 -o ./gemma-2-9b-w4g128
"""


@cli.command(help=QUANTIZE_HELP, epilog=MODEL_HELP)
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output directory (or .gguf file).")
@click.option("--recipe", help="A recipes/NAME.toml (or path) instead of the defaults; flags override it.")
@click.option(
    "--fast",
    is_flag=True,
    help=f"Plain GPTQ: no act-order, min-max group ranges, no fp-targets (the grid stays the default's). {FAST_COST}",
)
@click.option("--bits", type=click.IntRange(2, 8), help="Weight bits: 8, 4 (also 3, 2).  [default: 4]")
@click.option(
    "--group", "group_size", type=int, help="Group size along the input dim; -1 = per channel. [default: 128]"
)
@click.option("--method", type=click.Choice(["gptq", "rtn"]), help="[default: gptq]")
@click.option(
    "--sym/--asym",
    default=None,
    help="Symmetric or asymmetric grid. [default: asymmetric with fp16 scales for GPTQ int4, else symmetric]",
)
@click.option(
    "--calib",
    multiple=True,
    help="Calibration text: a file, or a shipped text (wiki, code, chat, multilingual; mix = all four); "
    "repeat it, or separate with commas, for a set, each SOURCE[:WEIGHT] (windows split by weight). "
    "[default: mix: the WikiText-2 validation excerpt, code, chat and six languages, windows split evenly]",
)
@click.option("--nsamples", type=click.IntRange(min=1), help="Calibration windows. [default: 128]")
@click.option("--seqlen", type=click.IntRange(min=2), help="Tokens per calibration window. [default: 512]")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for drawing calibration windows. [default: 0]")
@click.option(
    "--act-order/--no-act-order",
    default=None,
    help="GPTQ columns by decreasing Hessian diagonal. [default: on]",
)
@click.option(
    "--fp-targets/--no-fp-targets",
    default=None,
    help="GPTQ towards the unquantized model's layer outputs (GPTQ v2; one more forward per layer). "
    "[default: on; off with --format gguf]",
)
@click.option(
    "--damp",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="GPTQ damping, fraction of mean diag(H). [default: 0.01; 0.1 with --format gguf, codebook types aside]",
)
@click.option(
    "--hessian-shrink",
    type=click.FloatRange(0, 1),
    help="GPTQ solves with (1-S) H + S diag(H): 0 is GPTQ, 1 rounding weighted by diag(H) alone. "
    "[default: 0; 0.25 with --format gguf, IQ4_NL / IQ4_XS aside]",
)
@click.option(
    "--descent-sweeps",
    type=click.IntRange(min=0),
    help="GPTQ into GGUF blocks: sweeps of coordinate descent over the codes after GPTQ, in its own metric, "
    "then every block's fp16 scale refitted by least squares (0: plain GPTQ). [default: 0; 2 with --format gguf]",
)
@click.option(
    "--scale-dtype",
    type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
    help="Dtype of stored scales (auto: the checkpoint's; fp16 with --format gguf). "
    "[default: float16 for GPTQ int4, else auto]",
)
@click.option(
    "--calib-dtype",
    type=click.Choice(["auto", "float32", "bfloat16"]),
    help="Dtype of the calibration's layer forwards and of the activations carried between layers (Hessians "
    "accumulate in fp32). auto: bfloat16 for a bf16 checkpoint on a CPU with AVX-512 BF16/AMX or a CUDA GPU "
    "with bf16, else float32 (docs/speed.md). [default: auto]",
)
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
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
@_MIX_OPTIONS
@_OVERWRITE
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def quantize(model_dir, out, recipe, fast, fmt, gguf_type, device, imatrix_out, overwrite, as_json, **flags):
    from quantkit.io.atomic import check_output
    from quantkit.io.budget import calibration_bytes, quantized_artifact_bytes, refuse_if_over_memory
    from quantkit.io.calibration import calibration_files
    from quantkit.io.checkpoint import open_checkpoint
    from quantkit.io.hub import resolve_model
    from quantkit.quant.quantize import quantize_checkpoint, resolved_compute
    from quantkit.quant.recipes import gguf_defaults, resolve_options

    mix = {k: flags.pop(k) for k in ("tensor_types", "target_bpw", "max_size", "imatrix")}
    if fmt != "gguf" and any(mix.values()):
        raise QuantkitError(
            "--tensor-type, --target-bpw, --max-size and --imatrix choose GGUF types: use --format gguf"
        )
    if fmt == "gguf" and not recipe:  # flags not given (None) take the file type's defaults
        flags |= {k: v for k, v in gguf_defaults(gguf_type).items() if flags.get(k) is None}
    opts = resolve_options(recipe, fast, **dict(flags, calib=",".join(flags["calib"]) or None))
    kind = "file" if fmt == "gguf" else "dir"
    inputs = [model_dir, *calibration_files(opts.calib)]
    check_output(out, inputs, kind=kind, overwrite=overwrite)
    if imatrix_out:
        check_output(imatrix_out, [*inputs, out], kind="file", overwrite=overwrite)
    model_dir = str(resolve_model(model_dir))
    inputs = [model_dir, *calibration_files(opts.calib)]
    ckpt = open_checkpoint(model_dir)
    need = quantized_artifact_bytes(ckpt, opts.bits, opts.group_size, opts.sym)
    if fmt == "gguf":
        from quantkit.formats.gguf.export import gguf_file_bytes

        need += gguf_file_bytes(ckpt, gguf_type)
    check_output(out, inputs, kind=kind, overwrite=overwrite, need_bytes=need)
    opts = resolved_compute(opts, ckpt, device)
    if opts.method == "gptq":
        act = 4 if opts.calib_dtype == "float32" else 2
        refuse_if_over_memory(
            calibration_bytes(ckpt.config, opts.nsamples, opts.seqlen, opts.batch_size, act, opts.fp_targets),
            f"--nsamples {opts.nsamples} x --seqlen {opts.seqlen}",
            "lower --nsamples or --seqlen",
        )
    if fmt == "gguf":
        report = _quantize_to_gguf(model_dir, out, opts, gguf_type, device, imatrix_out, mix)
    else:
        report = quantize_checkpoint(model_dir, out, opts, device, _progress(), imatrix_out=imatrix_out)
    grid = f"int{opts.bits} g{opts.group_size}"
    if fmt == "gguf" and opts.method == "gptq":
        grid = f"into {gguf_type} blocks"
    summary = (
        f"{out}: {opts.method} {grid} {'sym' if opts.sym else 'asym'}, "
        f"{report['bits_per_weight']:.3f} bits/weight, mean weight rel. error {report['mean_weight_rel_err']:.3e}, "
        f"{report['seconds']:.1f} s, peak {report['peak_memory_bytes'] / 2**30:.2f} GiB"
    )
    _emit(report, as_json, summary)


def _quantize_to_gguf(model_dir, out, opts, gguf_type, device, imatrix_out, mix) -> dict:
    from pathlib import Path

    from quantkit.formats.gguf.mix import describe, format_mix
    from quantkit.io.checkpoint import open_checkpoint
    from quantkit.quant.quantize import quantize_to_gguf

    ckpt = open_checkpoint(model_dir)
    choice, imp = _type_choice(ckpt, gguf_type, **mix, gptq=opts.method == "gptq")
    report = quantize_to_gguf(
        model_dir, out, opts, gguf_type, device, _progress(), imatrix_out, choice.types, choice.searched
    )
    report["gguf"] |= describe(choice, report["gguf"], ckpt, Path(out), imp and imp.vectors)
    if "mix" in report["gguf"]:
        click.echo(format_mix(report["gguf"]["mix"]), err=True)
    lossless = report["gguf"]["counts"]["lossless"]
    click.echo(f"{out}: {lossless} linear weights written into their GGUF blocks without re-rounding", err=True)
    return report


@cli.command(epilog="SRC may also be a Hugging Face id, org/name[@revision] (fetched into the hub cache).")
@click.argument("src", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output file.")
@click.option("--format", "fmt", type=click.Choice(["gguf"]), default="gguf", show_default=True)
@click.option("--type", "qtype", type=click.Choice(GGUF_TYPES), default="q8_0", show_default=True)
@_MIX_OPTIONS
@_OVERWRITE
@click.option("--json", "as_json", is_flag=True, help="Print the report (per-tensor types) as JSON.")
def export(src, out, fmt, qtype, tensor_types, target_bpw, max_size, imatrix, overwrite, as_json) -> None:
    """Write SRC (a model directory or a quantize output directory) as a GGUF that llama.cpp runs.

    Weights of a quantized SRC whose grid fits the GGUF type (symmetric int4 -> q4_0, int8 -> q8_0,
    int4 -> q4_1; groups a multiple of 32, fp16-exact scales) are written into the blocks without
    rounding again; the rest are quantized from their dequantized values.

    With --target-bpw or --max-size, every decoder-layer weight (but those a --tensor-type names) gets the
    block type that minimises the summed predicted output error under that budget (docs/mixes.md); the
    tied token embedding is chosen with them unless a --tensor-type names it.

    Example: quantkit export ./gemma-2-9b-w4g32 --format gguf --type q4_0 -o gemma-2-9b-q4_0.gguf
    """
    from pathlib import Path

    from quantkit.formats.gguf.export import export_gguf, gguf_file_bytes
    from quantkit.formats.gguf.mix import describe
    from quantkit.io.atomic import check_output
    from quantkit.io.checkpoint import open_checkpoint
    from quantkit.io.hub import resolve_model

    inputs = [src, *([imatrix] if imatrix else [])]
    check_output(out, inputs, kind="file", overwrite=overwrite)
    src = str(resolve_model(src))
    ckpt = open_checkpoint(src)
    mixing = target_bpw is not None or max_size is not None
    need = gguf_file_bytes(ckpt, "q8_0" if mixing else qtype, imatrix is not None)  # a mix: at most Q8_0's bytes
    check_output(out, [src, *inputs[1:]], kind="file", overwrite=overwrite, need_bytes=need)
    choice, imp = _type_choice(ckpt, qtype, tensor_types, target_bpw, max_size, imatrix, encodes=True)
    report = export_gguf(
        ckpt, out, qtype, progress=_progress(), imatrix=imp, types=choice.types, searched=choice.searched
    )
    report |= describe(choice, report, ckpt, Path(out), imp and imp.vectors)
    _emit(report, as_json, _format_export(report))


def _format_export(r: dict) -> str:
    from quantkit.formats.gguf.mix import format_mix

    c = r["counts"]
    types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
    return (
        f"{r['path']}: {r['qtype']} ({types}), {r['file_size'] / 2**20:.1f} MiB, "
        f"{r['bits_per_weight']:.3f} bits/weight; "
        f"{c['lossless']} tensors written losslessly from quantized codes, {c['requantized']} quantized, "
        f"{c['norm']} norms; {r['seconds']:.1f} s"
    ) + ("" if "mix" not in r else "\n" + format_mix(r["mix"]))


@cli.command("eval-ppl", epilog=MODEL_HELP)
@click.argument("model_dir", type=click.Path())
@click.option(
    "--quantized",
    multiple=True,
    type=click.Path(),
    help="A quantized artifact directory or GGUF file of MODEL_DIR; repeat to score several in one pass.",
)
@click.option(
    "--dataset",
    multiple=True,
    help="Evaluation text: a path, NAME=PATH, or a shipped text (wiki, code, fr, chat); repeat for drift per dataset "
    "(default: wiki, the shipped ~100 kB excerpt of WikiText-2 test, raw).",
)
@click.option(
    "--ctx",
    type=click.IntRange(min=4),
    help="Tokens per chunk (the second half is scored).  [default: 512, or the --reference file's]",
)
@click.option("--chunks", type=click.IntRange(min=1), help="Evaluate only the first N chunks (of each dataset).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Chunks per forward.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16"]),
    default="auto",
    show_default=True,
    help="Dtype of the forwards; auto: bfloat16 for a bf16 MODEL_DIR on a CPU with AVX-512 BF16/AMX or a CUDA "
    "GPU with bf16, else float32 (docs/speed.md).",
)
@click.option("--exact", is_flag=True, help="fp32 forwards (transformers' fp32 numbers), whatever --dtype says.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--stream/--no-stream", default=None, help="Layer-streamed evaluation (default: when needed).")
@click.option("--plot", type=click.Path(), help="Draw KLD and delta-ppl against bits/weight to this image.")
@click.option(
    "--card", is_flag=True, help="Add the results to each --quantized artifact's README.md (one table per dataset)."
)
@click.option(
    "--save-reference",
    type=click.Path(),
    help="Also write MODEL_DIR's log-probabilities here, in llama-perplexity's --kl-divergence-base format.",
)
@click.option(
    "--reference",
    type=click.Path(),
    help="Score --quantized against this saved reference (quantkit's or llama-perplexity's) instead of running "
    "MODEL_DIR, whose tokenizer and config alone are used.",
)
@_OVERWRITE
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def eval_ppl(model_dir, quantized, dataset, plot, card, save_reference, reference, overwrite, as_json, **flags):
    """Perplexity of MODEL_DIR (llama-perplexity's method), and with --quantized the drift: Δppl, KL
    divergence, top-1 agreement, on the same tokens. Several --quantized (packed artifacts and GGUF files,
    mixed) are scored against one reference pass and reported in one table; several --dataset, per dataset
    and over all of them.

    Example: quantkit eval-ppl ./gemma-2-9b --quantized ./w4g128 --quantized model-q4_0.gguf --chunks 40

    Save the reference once, then score without the unquantized weights:
    quantkit eval-ppl ./gemma-2-9b --save-reference base.kld --chunks 40;
    quantkit eval-ppl ./gemma-2-9b --reference base.kld --quantized model-q4_0.gguf
    """
    from quantkit.eval.report import format_domains, format_table
    from quantkit.eval.session import EvalOptions, check_single_text, dataset_specs, run_eval
    from quantkit.io.atomic import check_output
    from quantkit.io.hub import resolve_model

    specs = dataset_specs(dataset)
    if plot and not quantized:
        raise QuantkitError("--plot: give at least one --quantized model to plot")
    if card and not quantized:
        raise QuantkitError("--card: give at least one --quantized artifact whose card gets the results")
    if reference and save_reference:
        raise QuantkitError("--reference and --save-reference: give one (a saved reference is already saved)")
    if reference or save_reference:
        check_single_text(specs, "--reference" if reference else "--save-reference")
    inputs = [model_dir, *quantized, reference, *(p for _, p in specs)]
    for out in (save_reference, plot):
        if out:
            check_output(out, inputs, kind="file", overwrite=overwrite)
    model_dir, quantized = str(resolve_model(model_dir)), [str(resolve_model(q)) for q in quantized]
    opts = EvalOptions(**flags, progress=_progress())
    res = run_eval(model_dir, quantized, specs, opts, reference, save_reference, plot, card)
    if len(specs) > 1:
        refs = {k: d["reference"] for k, d in res["datasets"].items()} | {"all": res["reference"]}
        tables = {k: d.get("models", []) for k, d in res["datasets"].items()} | {"all": res.get("models", [])}
        text = format_domains(refs, tables)
    else:
        text = _format_eval(res) if len(quantized) <= 1 else format_table(res["reference"], res["models"])
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


LADDER_TYPES = "q8_0,q6_k,q5_k_m,q4_k_m,q4_0,q3_k_m"


@cli.command(epilog=MODEL_HELP)
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="The ladder's directory.")
@click.option("--types", default=LADDER_TYPES, show_default=True, help="GGUF types, comma-separated.")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="gptq: quantize --format gguf --method gptq per type; rtn: the plain export.")  # fmt: skip
@click.option("--fast", is_flag=True, help="Plain GPTQ, as quantize --fast.")
@click.option("--calib", multiple=True, help="Calibration text or set, as quantize's --calib.")
@click.option("--nsamples", type=click.IntRange(min=1), help="Calibration windows. [default: 128]")
@click.option("--seqlen", type=click.IntRange(min=2), help="Tokens per calibration window. [default: 512]")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for drawing calibration windows. [default: 0]")
@click.option("--threads", type=click.IntRange(min=1), help="Torch threads per job (default: this machine's).")
@click.option("--dataset", type=click.Path(), help="Evaluation text (default: the shipped WikiText-2 test excerpt).")
@click.option("--ctx", type=click.IntRange(min=4), default=512, show_default=True, help="Tokens per eval chunk.")
@click.option("--chunks", type=click.IntRange(min=1), help="Evaluate only the first N chunks.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Chunks per forward.")
@click.option(
    "--ray", "use_ray", is_flag=True, help="Run the jobs as Ray tasks, one per type (pip install 'quantkit[ray]')."
)
@click.option("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else a local cluster).")
@click.option("--workers", type=click.IntRange(min=1), help="With --ray: jobs at once (default: CPUs // threads).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
def ladder(model_dir, out, types, method, fast, threads, dataset, ctx, chunks, batch_size, use_ray, ray_address,
           workers, as_json, **calib) -> None:  # fmt: skip
    """Quantize MODEL_DIR into every GGUF type of --types in one directory, score them all against one
    reference pass, and write report.json and a README.md model card (table and plot). Rerun the same
    command after an interruption: only unfinished types are made again.

    Example: quantkit ladder ./gemma-3-270m --types q8_0,q4_k_m,q4_0 --nsamples 64 -o ./gemma-3-270m-gguf
    """
    from quantkit.eval.report import format_table
    from quantkit.io.hub import resolve_model
    from quantkit.ladder.plan import parse_types
    from quantkit.ladder.run import EvalOptions, RayOptions, run_ladder
    from quantkit.quant.recipes import resolve_options

    qtypes = parse_types(types)
    calib["calib"] = ",".join(calib["calib"]) or None
    opts = resolve_options(None, fast, method=method, **calib)
    model_dir = str(resolve_model(model_dir))
    evaluation = EvalOptions(dataset, ctx, chunks, batch_size)
    ray = RayOptions(ray_address, workers) if use_ray or ray_address else None
    flags = [f"--{k} {v}" for k, v in {**calib, "dataset": dataset, "chunks": chunks}.items() if v is not None]
    flags += ["--fast"] if fast else []
    command = " ".join([f"quantkit ladder {model_dir} --types {','.join(qtypes)} --method {method}", *flags,
                        f"--ctx {ctx} -o {out}"])  # fmt: skip
    report = run_ladder(model_dir, out, qtypes, method, opts, threads, evaluation, ray, _progress(), command)
    _emit(report, as_json, f"{out}:\n" + format_table(report["reference"], report["types"]))


@cli.command("import-gguf")
@click.argument("gguf_file", type=click.Path())
@click.argument("out_dir", type=click.Path())
@_OVERWRITE
def import_gguf_cmd(gguf_file: str, out_dir: str, overwrite: bool) -> None:
    """Turn a Gemma 2 / Gemma 3 GGUF into a Hugging Face checkpoint (dequantized, fp32).

    Example: quantkit import-gguf gemma-3-270m-q4_k_m.gguf ./gemma-3-270m
    """
    import time

    from quantkit.formats.gguf.importer import import_gguf
    from quantkit.io.atomic import check_output
    from quantkit.io.checkpoint import dir_size

    check_output(out_dir, [gguf_file], kind="dir", overwrite=overwrite)
    t0 = time.perf_counter()
    out = import_gguf(gguf_file, out_dir, progress=_progress())
    click.echo(f"{out}: Hugging Face checkpoint, {dir_size(out) / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s")


def main() -> None:
    cli.main(prog_name="quantkit")


if __name__ == "__main__":
    main()
