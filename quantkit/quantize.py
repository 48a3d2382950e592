"""Quantize a checkpoint's linear layers (RTN or GPTQ) into a compressed-tensors pack-quantized artifact.

RTN streams tensor by tensor from disk to disk. GPTQ is layer-sequential: the calibration activations
go through decoder layer i (its weights read from disk), each linear's input Hessian is accumulated in
fp32, the subsets q,k,v → o → gate,up → down are quantized in that order (true-sequential), then the
layer's quantized outputs become layer i+1's inputs. Only one decoder layer is resident at a time.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__
from .checkpoint import DTYPE_NAMES, Checkpoint, layer_prefix, open_checkpoint
from .data import calibration_windows, default_calibration_text
from .errors import QuantkitError
from .export_safetensors import ArtifactWriter, quantization_config
from .gptq import Hessian, output_error
from .grid_refine import gptq_refined
from .model import LINEAR_NAMES, Gemma
from .packed import PackedLinear
from .primitives import QuantizedWeight, rtn
from .recipes import QuantizeOptions
from .scale_search import rtn_searched
from .tokenizer import Tokenizer

# true-sequential order; modules of one subset read the same input, so they share one Hessian
SUBSETS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _scale_dtype(opts: QuantizeOptions, ckpt: Checkpoint) -> torch.dtype:
    if opts.scale_dtype != "auto":
        return _DTYPES[opts.scale_dtype]
    return DTYPE_NAMES[ckpt.dtype_of("model.norm.weight")]


def check_plan(ckpt: Checkpoint, opts: QuantizeOptions) -> None:
    """Every refusal that can be decided before work starts."""
    for name, (_, in_features) in ckpt.config.linear_shapes().items():
        opts.spec.check_divides(name, in_features)


def _weight_error(w: torch.Tensor, qw: QuantizedWeight) -> float:
    w = w.float()
    return float(((w - qw.dequantize()) ** 2).sum() / (w**2).sum().clamp_min(1e-30))


def _rtn_layers(ckpt: Checkpoint, opts: QuantizeOptions, writer: ArtifactWriter, sdt, bar) -> dict:
    stats = {}
    for i in range(ckpt.config.num_hidden_layers):
        for name, t in ckpt.layer_tensors(i, check_finite=True).items():
            module = name.removesuffix(".weight")
            path = layer_prefix(i) + module
            if module in LINEAR_NAMES:
                qw = rtn_searched(t, opts.spec, sdt, opts.search)
                writer.add_quantized(path, qw)
                stats[path] = {"weight_rel_err": _weight_error(t, qw)}
                bar.set_postfix_str(module)
            else:
                writer.add(path + ".weight", t)
        bar.update(1)
    return stats


class _LayerCalibrator:
    """GPTQ for one decoder layer, true-sequential: each step feeds its quantized result to the next.

    The layer is evaluated piecewise (no forward hooks, no early exits), each piece once per batch:
      x1 = input_norm(h)                        -> H(q,k,v) -> quantize q, k, v
      a  = attention core(x1) with quantized qkv -> H(o)     -> quantize o
      hm = h + post_attn_norm(o(a)); x2 = pre_ff_norm(hm) -> H(gate, up) -> quantize gate, up
      m  = gelu(gate(x2)) * up(x2)              -> H(down)  -> quantize down
      out = hm + post_ff_norm(down(m))          -> next layer's inputs
    """

    def __init__(self, model: Gemma, i: int, tensors: dict, opts: QuantizeOptions, sdt, writer, stats, device):
        self.model, self.i, self.layer = model, i, model.layers[i]
        self.tensors, self.opts, self.sdt, self.writer, self.stats = tensors, opts, sdt, writer, stats
        self.device = device

    def _quantize(self, names: tuple[str, ...], xs: list[torch.Tensor]) -> None:
        hess = Hessian(xs[0].shape[-1], xs[0].device)
        for x in xs:
            hess.add(x)
        o = self.opts
        for name in names:
            w = self.tensors[f"{name}.weight"].float()
            res = gptq_refined(
                w.to(self.device), hess.H, o.spec, self.sdt, o.blocksize, o.damp, o.act_order, o.search, o.refine_iters
            )
            path = layer_prefix(self.i) + name
            self.writer.add_quantized(path, res.weight)
            self.model.set_linear(self.i, name, PackedLinear(res.weight).to(self.device))
            self.stats[path] = {
                "weight_rel_err": _weight_error(w, res.weight),
                "output_rel_err": output_error(w, res.weight.dequantize(), hess.H),
                "rtn_output_rel_err": output_error(w, rtn(w, o.spec, self.sdt).dequantize(), hess.H),
                "damp": res.damp,
            }

    @torch.no_grad()
    def run(self, inps: list[torch.Tensor]) -> list[torch.Tensor]:
        ly, attn = self.layer, self.layer.self_attn
        extras = ly.attention_inputs(inps[0])  # cos, sin, mask: the same for every batch
        x1 = [ly.input_layernorm(h) for h in inps]
        self._quantize(SUBSETS[0], x1)
        a = [attn.core(x, *extras) for x in x1]
        del x1
        self._quantize(SUBSETS[1], a)
        hm = [h + ly.post_attention_layernorm(attn.o_proj(z)) for h, z in zip(inps, a, strict=True)]
        del a
        x2 = [ly.pre_feedforward_layernorm(h) for h in hm]
        self._quantize(SUBSETS[2], x2)
        mlp = ly.mlp
        m = [torch.nn.functional.gelu(mlp.gate_proj(x), approximate="tanh") * mlp.up_proj(x) for x in x2]
        del x2
        self._quantize(SUBSETS[3], m)
        return [h + ly.post_feedforward_layernorm(mlp.down_proj(z)) for h, z in zip(hm, m, strict=True)]


def _gptq_layers(ckpt: Checkpoint, opts: QuantizeOptions, writer: ArtifactWriter, sdt, bar, device) -> dict:
    cfg = ckpt.config
    calib_path = opts.calib or default_calibration_text()
    ids = calibration_windows(Tokenizer(ckpt.tokenizer_path), calib_path, opts.nsamples, opts.seqlen, opts.seed)
    model = Gemma(cfg, _DTYPES[opts.calib_dtype], device)
    model.load_globals(ckpt.get("model.embed_tokens.weight"), ckpt.get("model.norm.weight"))
    with torch.no_grad():
        inps = [model.embed(b.to(device)) for b in ids.split(opts.batch_size)]  # each [b, T, H]
    model.embed_tokens.weight = torch.nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
    stats: dict = {}
    for i in range(cfg.num_hidden_layers):
        bar.set_postfix_str(f"layer {i}")
        tensors = ckpt.layer_tensors(i, check_finite=True)
        model.load_layer(i, tensors)
        inps = _LayerCalibrator(model, i, tensors, opts, sdt, writer, stats, device).run(inps)
        for name, t in tensors.items():
            if name.removesuffix(".weight") not in LINEAR_NAMES:
                writer.add(layer_prefix(i) + name, t)
        model.unload_layer(i)
        bar.update(1)
    return stats


def _peak_memory_bytes(device: str) -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.startswith("cuda") and torch.cuda.is_available():
        return max(rss, torch.cuda.max_memory_allocated())
    return rss


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    opts: QuantizeOptions,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize ``model_dir`` into ``out_dir`` (written atomically); returns the report (also quantkit.json)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantkitError("--device cuda: no CUDA device is available")
    ckpt = open_checkpoint(model_dir)
    if ckpt.quant_spec is not None:
        raise QuantkitError(f"{model_dir}: already quantized; quantize the original checkpoint")
    check_plan(ckpt, opts)
    if opts.method == "gptq" and opts.calib and not Path(opts.calib).is_file():
        raise QuantkitError(f"{opts.calib}: calibration file not found")
    sdt = _scale_dtype(opts, ckpt)
    t0 = time.perf_counter()
    n_layers = ckpt.config.num_hidden_layers
    with ArtifactWriter(out_dir) as writer, tqdm(total=n_layers, desc=f"{opts.method} layers",
                                                 unit="layer", disable=not progress) as bar:  # fmt: skip
        writer.add("model.embed_tokens.weight", ckpt.get("model.embed_tokens.weight"))
        writer.add("model.norm.weight", ckpt.get("model.norm.weight"))
        if opts.method == "rtn":
            stats = _rtn_layers(ckpt, opts, writer, sdt, bar)
        else:
            stats = _gptq_layers(ckpt, opts, writer, sdt, bar, device)
        config = dict(ckpt.raw_config)
        observer = "mse" if opts.search.enabled else "minmax"  # compressed-tensors' name for a searched range
        config["quantization_config"] = quantization_config(opts.spec, actorder=opts.act_order, observer=observer)
        writer.write_json("config.json", config)
        writer.copy_tokenizer(ckpt.path)
        report = _report(ckpt, opts, sdt, stats, time.perf_counter() - t0, device)
        writer.write_json("quantkit.json", report)
    return report


def _report(ckpt, opts, sdt, stats, seconds, device) -> dict[str, Any]:
    cfg = ckpt.config
    n_linear = cfg.num_hidden_layers * sum(o * i for o, i in cfg.linear_shapes().values())
    scale_bits = torch.finfo(sdt).bits
    report = {
        "quantkit_version": __version__,
        "source": str(ckpt.path),
        "options": {**opts.__dict__, "scale_dtype": str(sdt).removeprefix("torch.")},
        "format": "compressed-tensors pack-quantized",
        "linear_parameters": n_linear,
        "bits_per_weight": opts.spec.bits_per_weight(scale_bits),
        "seconds": round(seconds, 3),
        "peak_memory_bytes": _peak_memory_bytes(device),
        "device": device,
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
