"""Quantize a checkpoint's linear layers (RTN or GPTQ): the driver, from the source checkpoint to the artifact.

The artifact holds the linears as compressed-tensors pack-quantized codes, or, for GPTQ with a GGUF type,
as the ggml blocks of the types that GGUF stores them in (for ``export`` to copy). RTN streams tensor by
tensor from disk to disk. GPTQ is layer-sequential (``calibrate``): the calibration activations go through
decoder layer i, its linears are quantized true-sequentially, and the layer's quantized outputs become
layer i+1's inputs. Only one decoder layer is resident at a time, and tensors are read with plain file
reads, so memory is bounded by one layer whatever the depth.

Runs are resumable (``run_state``): a run killed outright continues at the next layer when the same command
is run again, and ends with the same bytes; an exception or Ctrl-C removes the work in progress instead.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from tqdm import tqdm

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats.card import CARD_NAME, artifact_card, source_provenance
from quantkit.formats.gguf.codebook_grid import CODEBOOK_TYPES
from quantkit.formats.gguf.export import export_gguf
from quantkit.formats.gguf.grids import LAYOUTS
from quantkit.formats.gguf.imatrix import write_imatrix
from quantkit.formats.gguf.policy import PlannedTensor, plan_tensors, retype
from quantkit.formats.packed.write import ArtifactWriter, blocks_quantization_config, quantization_config
from quantkit.io.atomic import is_artifact
from quantkit.io.calibration import calibration_label, calibration_set_windows, check_sources
from quantkit.io.checkpoint import Checkpoint, open_checkpoint
from quantkit.io.config import ModelConfig
from quantkit.io.dtypes import compute_dtype, torch_dtype
from quantkit.io.layout import layer_prefix
from quantkit.io.tokenizer import Tokenizer
from quantkit.model import LINEAR_NAMES, Gemma
from quantkit.quant.calibrate import Calibration, LayerCalibrator, weight_rel_err
from quantkit.quant.memory import peak_gpu_bytes, peak_rss_bytes
from quantkit.quant.recipes import QuantizeOptions
from quantkit.quant.run_state import RunState, resume_key
from quantkit.quant.scale_search import rtn_searched

__all__ = ["QuantizeOptions", "check_plan", "quantize_checkpoint", "quantize_to_gguf"]


def _scale_dtype(opts: QuantizeOptions, ckpt: Checkpoint) -> torch.dtype:
    if opts.scale_dtype != "auto":
        return torch_dtype(opts.scale_dtype)
    return torch_dtype(ckpt.dtype_of("model.norm.weight"))


def resolved_compute(opts: QuantizeOptions, ckpt: Checkpoint, device: str) -> QuantizeOptions:
    """``opts`` with ``calib_dtype`` "auto" resolved for this checkpoint and device (io.dtypes.compute_dtype),
    so the resume key and the report name the dtype the calibration ran in."""
    stored = ckpt.dtype_of("model.embed_tokens.weight")
    return opts.replace(calib_dtype=compute_dtype(opts.calib_dtype, stored, device))


def check_plan(ckpt: Checkpoint, opts: QuantizeOptions) -> None:
    """Every refusal that can be decided before work starts."""
    for name, (_, in_features) in ckpt.config.linear_shapes().items():
        opts.spec.check_divides(name, in_features)


def _rtn_layers(ckpt: Checkpoint, opts: QuantizeOptions, writer: ArtifactWriter, sdt, bar, run: RunState) -> None:
    for i in range(run.start, ckpt.config.num_hidden_layers):
        p = layer_prefix(i)
        for name in [n for n in ckpt.locations if n.startswith(p)]:  # one tensor in memory at a time
            t = ckpt.get(name, check_finite=True)
            module = name[len(p) :].removesuffix(".weight")
            if module in LINEAR_NAMES:
                qw = rtn_searched(t, opts.spec, sdt, opts.search)
                writer.add_quantized(p + module, qw)
                run.stats[p + module] = {"weight_rel_err": weight_rel_err(t, qw)}
            else:
                writer.add(name, t)
            del t
        run.end_layer(writer, i)
        bar.update(1)


def _gptq_layers(cal: Calibration, writer: ArtifactWriter, bar, run: RunState) -> None:
    ckpt, opts, device = cal.ckpt, cal.opts, cal.device
    cfg = ckpt.config
    model = Gemma(cfg, torch_dtype(opts.calib_dtype), device)
    if run.start:
        inps, fps = run.saved_inputs(writer, device)  # the next layer's inputs (and the unquantized model's)
        fps = fps if opts.fp_targets else None
    else:
        tok = Tokenizer(ckpt.tokenizer_path)
        ids = calibration_set_windows(tok, opts.calib, opts.nsamples, opts.seqlen, opts.seed)
        embed = ckpt.get("model.embed_tokens.weight", check_finite=True)
        with torch.no_grad():
            inps = [model.embed(b, embed) for b in ids.split(opts.batch_size)]  # each [b, T, H]
        del embed
        fps = [h.clone() for h in inps] if opts.fp_targets else None  # the unquantized model's hidden states
    for i in range(run.start, cfg.num_hidden_layers):
        bar.set_postfix_str(f"layer {i}")
        p = layer_prefix(i)
        small = {n[len(p) :]: ckpt.get(n, check_finite=True) for n in ckpt.locations if n.startswith(p)
                 and n[len(p) :].removesuffix(".weight") not in LINEAR_NAMES}  # fmt: skip
        model.load_layer_norms(i, small)
        t0 = time.perf_counter()
        layer = LayerCalibrator(model, i, cal, writer.add_quantized)
        inps, fps = layer.run(inps, fps)
        layer.seconds["layer_s"] = time.perf_counter() - t0
        run.stats.update(layer.stats)
        for name, t in small.items():
            writer.add(p + name, t)
        model.unload_layer(i)
        stats = {**{k: round(v, 3) for k, v in layer.seconds.items()}, "peak_rss_gib_by_step": layer.peaks}
        run.end_layer(writer, i, stats, inps, fps)
        bar.update(1)


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    opts: QuantizeOptions,
    device: str = "cpu",
    progress: bool = True,
    gguf_type: str | None = None,
    imatrix_out: str | Path | None = None,
    types: Mapping[str, GGMLQuantizationType] | None = None,
) -> dict[str, Any]:
    """Quantize ``model_dir`` into ``out_dir`` (written atomically); returns the report (also quantkit.json).

    With ``gguf_type`` (GPTQ only) every linear is rounded onto the fixed grid of the ggml type that type's
    GGUF gives it (chosen from the original weights weighted by diag(H)), or ``types`` gives it (GGUF name ->
    type: --tensor-type overrides), and stored as those blocks, for ``export_gguf`` to copy. ``imatrix_out``:
    also write the calibration's importance as a llama.cpp imatrix."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantkitError("--device cuda: no CUDA device is available")
    ckpt = open_checkpoint(model_dir)
    if ckpt.quant_spec is not None:
        raise QuantkitError(f"{model_dir}: already quantized; quantize the original checkpoint")
    check_plan(ckpt, opts)
    opts = resolved_compute(opts, ckpt, device)
    if opts.method == "gptq":
        check_sources(opts.calib)
    if (gguf_type or imatrix_out) and opts.method != "gptq":
        raise QuantkitError("--imatrix-out and GPTQ into GGUF blocks need --method gptq")
    block_types = gptq_block_types(ckpt, gguf_type, types) if gguf_type else {}
    sdt = _scale_dtype(opts, ckpt)
    t0 = time.perf_counter()
    n_layers = ckpt.config.num_hidden_layers
    key = resume_key(ckpt, opts, sdt, device, gguf_type, imatrix_out is not None, *_names(block_types))
    bar = tqdm(total=n_layers, desc=f"{opts.method} layers", unit="layer", disable=not progress)
    with ArtifactWriter(out_dir, resume_key=key) as writer, bar:
        run = RunState(writer, device, imatrix_out is not None)
        if run.start:
            bar.update(run.start)
            msg = f"quantkit: resuming at layer {run.start} of {n_layers} (work in progress in {writer.tmp})"
            bar.write(msg, file=sys.stderr)
        else:  # the globals get a shard of their own, written before any layer
            writer.add("model.embed_tokens.weight", ckpt.get("model.embed_tokens.weight", check_finite=True))
            writer.add("model.norm.weight", ckpt.get("model.norm.weight", check_finite=True))
            writer.flush()
        if opts.method == "rtn":
            _rtn_layers(ckpt, opts, writer, sdt, bar, run)
        else:
            _gptq_layers(Calibration(ckpt, opts, sdt, device, block_types, run.imatrix), writer, bar, run)
        config = dict(ckpt.raw_config)
        if gguf_type:
            config["quantization_config"] = blocks_quantization_config(gguf_type)
        else:
            observer = "mse" if opts.search.enabled else "minmax"  # compressed-tensors' name for a searched range
            config["quantization_config"] = quantization_config(opts.spec, actorder=opts.act_order, observer=observer)
        writer.write_json("config.json", config)
        writer.copy_tokenizer(ckpt.path)
        report = _report(ckpt, opts, sdt, run, time.perf_counter() - t0, device, gguf_type, block_types)
        if imatrix_out:
            calib = calibration_label(opts.calib)
            report["imatrix"] = str(write_imatrix(imatrix_out, run.imatrix, calib, opts.seqlen))
        prov = source_provenance(ckpt.path, ckpt.raw_config)
        report["provenance"] = prov.as_dict()
        card = artifact_card(report, prov, Path(out_dir).name, ckpt.config.model_type, writer.total_bytes)
        writer.write_text(CARD_NAME, card)
        writer.write_json("quantkit.json", report)
    return report


def quantize_to_gguf(
    model_dir: str | Path,
    out: str | Path,
    opts: QuantizeOptions,
    gguf_type: str,
    device: str = "cpu",
    progress: bool = True,
    imatrix_out: str | Path | None = None,
    types: Mapping[str, GGMLQuantizationType] | None = None,
    searched: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """``quantize --format gguf``: quantize into a hidden artifact beside ``out``, then write its codes into the
    GGUF's blocks (report["gguf"] is the export's report). The artifact resumes like any quantize output.

    GPTQ rounds every linear onto the grid of the ggml type the GGUF stores it in (any type; the file's own
    types are llama-quantize's with an importance matrix, as GPTQ calibrates); RTN quantizes with fp16
    scales, whose int4/int8 codes go into Q4_0/Q8_0/Q4_1 blocks as they are.
    The GGUF's general.name is the source's (its directory's, or a hub snapshot's repo), not the hidden
    artifact's."""
    out = Path(out)
    artifact = out.parent / f".{out.name}.artifact"  # resumable like any quantize output; ours alone
    if is_artifact(artifact):  # left by a run killed between its two steps
        shutil.rmtree(artifact)
    if opts.method == "gptq":
        report = quantize_checkpoint(
            model_dir, artifact, opts, device, progress, gguf_type=gguf_type, imatrix_out=imatrix_out, types=types
        )
        types = {t.gguf_name: t.qtype for t in gptq_file_plan(open_checkpoint(artifact).config, gguf_type, types)}
    else:
        if opts.scale_dtype == "auto":
            opts = opts.replace(scale_dtype="float16")
        report = quantize_checkpoint(model_dir, artifact, opts, device, progress)
    try:
        name = report["provenance"]["name"]
        report["gguf"] = export_gguf(
            artifact, out, gguf_type, progress=progress, name=name, types=types, searched=searched
        )
    finally:
        shutil.rmtree(artifact, ignore_errors=True)
    return report


def gptq_file_plan(
    cfg: ModelConfig, gguf_type: str, types: Mapping[str, GGMLQuantizationType] | None = None
) -> list[PlannedTensor]:
    """The tensors of a GPTQ ``gguf_type`` GGUF, with ``types`` (GGUF name -> type) in place of its own. GPTQ
    always calibrates, so the file's own types are llama-quantize's with an importance matrix."""
    return retype(plan_tensors(cfg, gguf_type, imatrix=True), types or {})


def gptq_block_types(
    ckpt: Checkpoint, gguf_type: str, types: Mapping[str, GGMLQuantizationType] | None = None
) -> dict[str, GGMLQuantizationType]:
    """HF weight name -> the ggml type each decoder-layer linear of the GPTQ file (``gptq_file_plan``) is in."""
    plan = gptq_file_plan(ckpt.config, gguf_type, types)
    plan = [t for t in plan if t.hf_name.startswith("model.layers.") and not t.is_norm]
    unsupported = sorted({t.qtype.name for t in plan if t.qtype not in LAYOUTS and t.qtype not in CODEBOOK_TYPES})
    if unsupported:
        raise QuantkitError(f"--type {gguf_type}: GPTQ cannot write {', '.join(unsupported)} blocks (use --method rtn)")
    return {t.hf_name: t.qtype for t in plan}


def _names(block_types: Mapping[str, GGMLQuantizationType]) -> list[str]:
    """The block types as plain strings, for the resume key: a rerun with other overrides starts afresh."""
    return [f"{k}={v.name}" for k, v in sorted(block_types.items())]


def _blocks_bits_per_weight(block_types: dict[str, GGMLQuantizationType], ckpt: Checkpoint) -> float:
    """Bits per weight of the decoder-layer linears stored as the ggml blocks of ``block_types``."""
    bits = 0
    for name, qtype in block_types.items():
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        bits += 8 * block_bytes * math.prod(ckpt.shape_of(name)) // block
    return bits / ckpt.config.linear_parameters()


def _report(ckpt, opts, sdt, run: RunState, seconds, device, gguf_type=None, block_types=None) -> dict[str, Any]:
    """The run's report (quantkit.json): what was written, its size per weight, time, memory, errors."""
    stats = run.stats
    if gguf_type:  # the linears are the ggml blocks of the types a gguf_type GGUF stores them in
        fmt, bpw = f"ggml blocks ({gguf_type})", _blocks_bits_per_weight(block_types, ckpt)
    else:
        fmt, bpw = "compressed-tensors pack-quantized", opts.spec.bits_per_weight(torch.finfo(sdt).bits)
    report = {
        "quantkit_version": __version__,
        "source": str(ckpt.path),
        "options": {**opts.__dict__, "scale_dtype": str(sdt).removeprefix("torch.")},
        "format": fmt,
        "linear_parameters": ckpt.config.linear_parameters(),
        "bits_per_weight": bpw,
        "seconds": round(seconds, 3),
        "peak_memory_bytes": peak_rss_bytes(),
        "peak_gpu_memory_bytes": peak_gpu_bytes(device),
        "device": device,
        "resumed_from_layer": run.start,
        "layers": run.layers,
        "linears": stats,
    }
    errs = [s["weight_rel_err"] for s in stats.values()]
    report["mean_weight_rel_err"] = sum(errs) / len(errs)
    if opts.method == "gptq":
        out = [s["output_rel_err"] for s in stats.values()]
        base = [s["rtn_output_rel_err"] for s in stats.values()]
        report["mean_output_rel_err"] = sum(out) / len(out)
        report["mean_rtn_output_rel_err"] = sum(base) / len(base)
    return report
