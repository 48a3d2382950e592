"""Quantize a checkpoint's linear layers (RTN or GPTQ) into a compressed-tensors pack-quantized artifact.

RTN streams tensor by tensor from disk to disk. GPTQ is layer-sequential: the calibration activations
go through decoder layer i (its weights read from disk), each linear's input Hessian is accumulated in
fp32, the subsets q,k,v → o → gate,up → down are quantized in that order (true-sequential), then the
layer's quantized outputs become layer i+1's inputs. Only one decoder layer is resident at a time, and
tensors are read with plain file reads, so memory is bounded by one layer whatever the depth.

Runs are resumable: output goes to a hidden ``.NAME.partial`` directory, and after each layer its tensors
(whole shards) and, for GPTQ, the next layer's inputs are on disk together with a record of the layers
done. A run that was killed outright (SIGKILL, power loss) and is started again with the same command
and input (the same resume key) continues at the next layer and ends with the same bytes; an exception or
Ctrl-C removes the directory instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats.gguf.grids import LAYOUTS, BlockGrid, GridWeight, choose_grid, rtn_on_grid
from quantkit.formats.gguf.imatrix import ImportanceStats, write_imatrix
from quantkit.formats.gguf.policy import plan_tensors
from quantkit.formats.packed.linear import CastLinear, PackedLinear, dense_linear
from quantkit.formats.packed.write import ArtifactWriter, blocks_quantization_config, quantization_config
from quantkit.io.checkpoint import Checkpoint, layer_prefix, open_checkpoint
from quantkit.io.dtypes import torch_dtype
from quantkit.io.texts import calibration_windows, default_calibration_text
from quantkit.io.tokenizer import Tokenizer
from quantkit.model import LINEAR_NAMES, Gemma
from quantkit.quant.gptq import Drift, GPTQResult, Hessian, fp_target, gptq_quantize, inverse_factor, weighted_norms
from quantkit.quant.grid_refine import gptq_refined
from quantkit.quant.primitives import QuantizedWeight, rtn
from quantkit.quant.recipes import QuantizeOptions
from quantkit.quant.scale_search import rtn_searched

# true-sequential order; modules of one subset read the same input, so they share one Hessian
SUBSETS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def _scale_dtype(opts: QuantizeOptions, ckpt: Checkpoint) -> torch.dtype:
    if opts.scale_dtype != "auto":
        return torch_dtype(opts.scale_dtype)
    return torch_dtype(ckpt.dtype_of("model.norm.weight"))


def check_plan(ckpt: Checkpoint, opts: QuantizeOptions) -> None:
    """Every refusal that can be decided before work starts."""
    for name, (_, in_features) in ckpt.config.linear_shapes().items():
        opts.spec.check_divides(name, in_features)


def _weight_error(w: torch.Tensor, qw: QuantizedWeight | GridWeight) -> float:
    w = w.float()
    return float(((w - qw.dequantize()) ** 2).sum() / (w**2).sum().clamp_min(1e-30))


def _rtn_layers(ckpt: Checkpoint, opts: QuantizeOptions, writer: ArtifactWriter, sdt, bar, run: _Run) -> None:
    for i in range(run.start, ckpt.config.num_hidden_layers):
        p = layer_prefix(i)
        for name in [n for n in ckpt.locations if n.startswith(p)]:  # one tensor in memory at a time
            t = ckpt.get(name, check_finite=True)
            module = name[len(p) :].removesuffix(".weight")
            if module in LINEAR_NAMES:
                qw = rtn_searched(t, opts.spec, sdt, opts.search)
                writer.add_quantized(p + module, qw)
                run.stats[p + module] = {"weight_rel_err": _weight_error(t, qw)}
            else:
                writer.add(name, t)
            del t
        run.end_layer(writer, i)
        bar.update(1)


class _Timer:
    """Adds the wall time of each ``with`` block to ``seconds[key]``."""

    def __init__(self, seconds: dict[str, float], key: str):
        self.seconds, self.key = seconds, key

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds[self.key] += time.perf_counter() - self.t0


class _LayerCalibrator:
    """GPTQ for one decoder layer, true-sequential: each step feeds its quantized result to the next.

    The layer is evaluated piecewise, batch by batch, keeping only one list of hidden states [B, T, H]
    across the layer (plus, briefly, the attention outputs); every other activation is recomputed per batch
    and folded into its Hessian at once, so e.g. down_proj's inputs are never all held:
      x1 = input_layernorm(h)                         -> H(q,k,v) -> quantize q, k, v
      a  = attention core(x1) with quantized qkv     -> H(o)     -> quantize o      (a kept per batch)
      h <- hm = h + post_attn_norm(o(a)); x2 = pre_ff_norm(hm) -> H(gate, up) -> quantize gate, up
      m  = gelu(gate(x2)) * up(x2)                   -> H(down)  -> quantize down
      h <- hm + post_ff_norm(down(m))  (m recomputed) -> the next layer's inputs
    Each dense linear is read from disk when it is quantized, and its quantized replacement is what the
    following steps run; only ``fp_targets``, whose unquantized path runs beside, holds the layer's dense
    linears (in the checkpoint's dtype). Every operation on a batch is the one the whole-batch order would
    do, so the result is bit-identical to it.
    """

    def __init__(self, model: Gemma, i: int, ckpt: Checkpoint, opts: QuantizeOptions, sdt, writer, run, device):
        self.model, self.i, self.layer, self.ckpt = model, i, model.layers[i], ckpt
        self.opts, self.sdt, self.writer, self.run_state, self.device = opts, sdt, writer, run, device
        self.seconds = dict.fromkeys(("forward_s", "hessian_s", "solver_s", "diagnostics_s"), 0.0)
        self.fwd, self.hes = _Timer(self.seconds, "forward_s"), _Timer(self.seconds, "hessian_s")
        self.sol, self.dia = _Timer(self.seconds, "solver_s"), _Timer(self.seconds, "diagnostics_s")
        self.peaks: dict[str, float] = {}  # the process's peak RSS (GiB) once each subset is quantized

    def _quantize(self, names: tuple[str, ...], hess: Hessian, drift: Drift | None = None) -> None:
        """Quantize the linears ``names`` (one subset: they read the same input, whose Hessian is ``hess``);
        with ``drift`` each one's target is the weight that best reproduces the unquantized model (fp_target)."""
        o, p = self.opts, layer_prefix(self.i)
        ws = {n: self.ckpt.get(f"{p}{n}.weight", check_finite=True) for n in names}
        if self.run_state.imatrix is not None:
            for n in names:
                self.run_state.imatrix.add_from_hessian(self.i, n, hess.H, hess.n)
        w0 = next(iter(ws.values()))
        with self.dia:  # the grids, tr(W H Wᵀ) and RTN's tr(D H Dᵀ) need H itself, before it is factored
            grids = {n: self._grid(p + n, w, hess.H) for n, w in ws.items()}
            rtns = {n: rtn(w.float(), o.spec, self.sdt) if grids[n] is None else rtn_on_grid(w, grids[n])
                    for n, w in ws.items()}  # fmt: skip
            norms = {
                n: weighted_norms([w, w.float() - rtns[n].dequantize()], hess.H) for n, w in ws.items()
            }  # [den, rtn num]
            g = w0.shape[1] if o.spec.group_size == -1 else o.spec.group_size
            imp = o.search.importance(hess.H, slice(None), g) if o.search.enabled else None
            imp = None if imp is None else imp.clone()  # H's storage is reused by its factor
            H_kept = hess.H.clone() if o.refine_iters else None  # the refit needs H after the factor
        with self.sol:
            wds = {}
            if drift is not None:
                wds = {n: drift.times(w) for n, w in ws.items()}
                drift.D = None  # [I, I]: gone before the factor needs its two I x I buffers
            fac = inverse_factor(hess, o.damp, o.act_order)  # one factor for the whole subset
        for name, w in ws.items():
            with self.sol:
                target = w.to(self.device) if drift is None else fp_target(w, wds.pop(name), fac)
                res = self._solve(target, fac, grids[name], imp, H_kept)
            self.writer.add_quantized(p + name, res.weight)
            quantized = res.weight
            module = (
                PackedLinear(quantized) if grids[name] is None else dense_linear(quantized.dequantize(self.model.dtype))
            )
            self.model.set_linear(self.i, name, module.to(self.device))
            den, rtn_num = norms[name]
            with self.dia:
                self.run_state.stats[p + name] = {
                    "weight_rel_err": _weight_error(w, res.weight),
                    "output_rel_err": res.sq_output_err / den if den > 0 else 0.0,
                    "rtn_output_rel_err": rtn_num / den if den > 0 else 0.0,
                    "damp": res.damp,
                }
                if grids[name] is not None:
                    self.run_state.stats[p + name]["ggml_type"] = grids[name].qtype.name
        _release_freed_memory()
        self.peaks["+".join(n.split(".")[-1] for n in names)] = round(_peak_rss_bytes() / 2**30, 3)

    def _grid(self, path: str, w: torch.Tensor, H: torch.Tensor) -> BlockGrid | None:
        """The fixed ggml grid this linear is rounded onto when the target is a GGUF type (else None),
        chosen from the original weights weighted by diag(H)."""
        qtype = self.run_state.block_types.get(path + ".weight")
        return None if qtype is None else choose_grid(w, qtype, H.diagonal())

    def _hessian(self, n_in: int) -> Hessian:
        return Hessian(n_in, self.device)

    def _solve(self, w: torch.Tensor, fac, grid: BlockGrid | None, imp, H_kept) -> GPTQResult:
        """GPTQ of one linear: onto ``grid`` (a GGUF type's), else on the recipe's grid (searched scales,
        optionally refitted)."""
        o = self.opts
        if grid is not None:
            return gptq_quantize(w, fac, o.spec, self.sdt, o.blocksize, grid=grid)
        if o.refine_iters:
            return gptq_refined(w, H_kept, o.spec, self.sdt, o.blocksize, o.damp, o.act_order, o.search, o.refine_iters)
        return gptq_quantize(w, fac, o.spec, self.sdt, o.blocksize, search=o.search, importance=imp)

    @contextmanager
    def _using(self, modules: dict[str, torch.nn.Module]):
        """The layer with ``modules`` (keyed like LINEAR_NAMES) in place of its linears, then as it was."""
        old = {n: self.layer.get_submodule(n) for n in modules}
        for n, m in modules.items():
            self.model.set_linear(self.i, n, m)
        try:
            yield
        finally:
            for n, m in old.items():
                self.model.set_linear(self.i, n, m)

    @torch.no_grad()
    def run(self, hs: list[torch.Tensor], fs: list[torch.Tensor] | None = None) -> tuple[list, list | None]:
        """hs: this layer's inputs, one [B, T, H] per batch; replaced in place by the layer's outputs.

        With ``fs`` (``fp_targets``) the unquantized model's hidden states [B, T, H] per batch are carried
        beside ``hs``: every step also runs on them with the layer's dense linears, each subset's inputs x
        (quantized path) and x_fp (unquantized path) give H and the drift D, and each linear is quantized
        towards fp_target(W); ``fs`` is replaced in place too. Without it the walk and its bytes are plain
        GPTQ's."""
        ly, attn, mlp = self.layer, self.layer.self_attn, self.layer.mlp
        p = layer_prefix(self.i)
        dense = None
        if fs is not None:  # the checkpoint's dtype, cast per call: no fp32 copy of the layer
            dense = {n: CastLinear(self.ckpt.get(f"{p}{n}.weight", check_finite=True).to(self.device))
                     for n in LINEAR_NAMES}  # fmt: skip
        extras = ly.attention_inputs(hs[0])  # cos, sin, mask: the same for every batch
        gelu = torch.nn.functional.gelu

        def both(fn, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            """fn on batch j of the quantized path, and of the unquantized one when it is carried."""
            with self.fwd:
                x = fn(hs[j])
                if dense is None:
                    return x, None
                with self._using(dense):
                    return x, fn(fs[j])

        def stats(pairs, consume: bool = True) -> tuple[Hessian, Drift | None]:
            """H (and D) of the pairs; ``consume``: the unquantized inputs are not used again."""
            hess = drift = None
            for x, x_fp in pairs:
                if hess is None:
                    hess = self._hessian(x.shape[-1])
                    drift = None if dense is None else Drift(x.shape[-1], self.device)
                with self.hes:
                    hess.add(x)
                    if drift is not None:
                        drift.add(x_fp, x, consume)
            return hess, drift

        def mlp_in(h: torch.Tensor) -> torch.Tensor:  # gelu(gate(x2)) * up(x2), the product in place
            x2 = ly.pre_feedforward_layernorm(h)
            return gelu(mlp.gate_proj(x2), approximate="tanh").mul_(mlp.up_proj(x2))

        def residual(j: int, fn, x: tuple[torch.Tensor, torch.Tensor | None]) -> None:
            with self.fwd:
                hs[j] = hs[j] + fn(x[0])
                if dense is not None:
                    with self._using(dense):
                        fs[j] = fs[j] + fn(x[1])

        # Piecewise, batch by batch: only the hidden states (and, briefly, the attention outputs) are kept
        n = range(len(hs))
        self._quantize(SUBSETS[0], *stats(both(ly.input_layernorm, j) for j in n))
        a = [both(lambda h: attn.core(ly.input_layernorm(h), *extras), j) for j in n]
        self._quantize(SUBSETS[1], *stats(a, consume=False))  # a feeds the residual below
        for j in n:
            residual(j, lambda x: ly.post_attention_layernorm(attn.o_proj(x)), a[j])  # h <- hm
            a[j] = None
        del a
        self._quantize(SUBSETS[2], *stats(both(ly.pre_feedforward_layernorm, j) for j in n))
        self._quantize(SUBSETS[3], *stats(both(mlp_in, j) for j in n))  # m recomputed, never all held
        for j in n:
            residual(j, lambda m: ly.post_feedforward_layernorm(mlp.down_proj(m)), both(mlp_in, j))
        return hs, fs


class _Run:
    """Where a run starts (0, or the layer a killed run had reached) and what it has recorded so far."""

    def __init__(self, writer: ArtifactWriter, device: str, block_types: dict | None = None, imatrix: bool = False):
        self.device = device
        done = writer.resumed or {}
        self.start: int = done.get("layers_done", 0)
        self.stats: dict = done.get("stats", {})
        self.layers: list[dict] = done.get("layers", [])
        self.block_types: dict = block_types or {}  # HF weight name -> ggml type, when the target is a GGUF
        self.imatrix = ImportanceStats.from_tensors(writer.resumed_tensors() if self.start else {}) if imatrix else None

    def end_layer(self, writer: ArtifactWriter, i: int, seconds: dict | None = None, inputs=None, fp=None) -> None:
        """Layer i is complete: its tensors go to disk as whole shards, with the next layer's inputs."""
        self.layers.append({"layer": i, **(seconds or {}), "peak_rss_gib": round(_peak_rss_bytes() / 2**30, 3)})
        gpu = _peak_gpu_bytes(self.device)
        if gpu is not None:
            self.layers[-1]["peak_gpu_gib"] = round(gpu / 2**30, 3)
        progress = {"layers_done": i + 1, "stats": self.stats, "layers": self.layers}
        saved = {} if inputs is None else {f"b{j:05d}": h for j, h in enumerate(inputs)}
        saved |= {} if fp is None else {f"f{j:05d}": h for j, h in enumerate(fp)}  # the unquantized model's
        writer.commit(progress, saved | ({} if self.imatrix is None else self.imatrix.to_tensors()))


def _gptq_layers(ckpt: Checkpoint, opts: QuantizeOptions, writer: ArtifactWriter, sdt, bar, device, run) -> None:
    cfg = ckpt.config
    model = Gemma(cfg, torch_dtype(opts.calib_dtype), device)
    if run.start:
        saved = writer.resumed_tensors()
        inps = [saved[k].to(device) for k in sorted(saved) if k.startswith("b")]  # the next layer's inputs
        fps = [saved[k].to(device) for k in sorted(saved) if k.startswith("f")] if opts.fp_targets else None
    else:
        calib_path = opts.calib or default_calibration_text()
        ids = calibration_windows(Tokenizer(ckpt.tokenizer_path), calib_path, opts.nsamples, opts.seqlen, opts.seed)
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
        cal = _LayerCalibrator(model, i, ckpt, opts, sdt, writer, run, device)
        inps, fps = cal.run(inps, fps)
        cal.seconds["layer_s"] = time.perf_counter() - t0
        for name, t in small.items():
            writer.add(p + name, t)
        model.unload_layer(i)
        stats = {**{k: round(v, 3) for k, v in cal.seconds.items()}, "peak_rss_gib_by_step": cal.peaks}
        run.end_layer(writer, i, stats, inps, fps)
        bar.update(1)


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim), between the steps of a layer.

    glibc serves allocations below its adaptive mmap threshold (up to 32 MB) from its heaps, and freed
    blocks there stay resident until trimmed, so RSS can sit above what is alive. (Fixing the threshold
    instead returned them at once but cost the 270M's calibration a third of its time in page faults.)
    A no-op where libc has no malloc_trim."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:
        pass


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


_LIBC = _load_libc()


def _peak_rss_bytes() -> int:
    """The process's peak RSS (host memory, whatever the device)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_gpu_bytes(device: str) -> int | None:
    """Peak memory torch allocated on ``device`` (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    opts: QuantizeOptions,
    device: str = "cpu",
    progress: bool = True,
    gguf_type: str | None = None,
    imatrix_out: str | Path | None = None,
) -> dict[str, Any]:
    """Quantize ``model_dir`` into ``out_dir`` (written atomically); returns the report (also quantkit.json).

    With ``gguf_type`` (GPTQ only) every linear is rounded onto the fixed grid of the ggml type that type's
    GGUF gives it (chosen from the original weights weighted by diag(H)) and stored as those blocks, for
    ``export_gguf`` to copy. ``imatrix_out``: also write the calibration's importance as a llama.cpp imatrix."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantkitError("--device cuda: no CUDA device is available")
    ckpt = open_checkpoint(model_dir)
    if ckpt.quant_spec is not None:
        raise QuantkitError(f"{model_dir}: already quantized; quantize the original checkpoint")
    check_plan(ckpt, opts)
    if opts.method == "gptq" and opts.calib and not Path(opts.calib).is_file():
        raise QuantkitError(f"{opts.calib}: calibration file not found")
    if (gguf_type or imatrix_out) and opts.method != "gptq":
        raise QuantkitError("--imatrix-out and GPTQ into GGUF blocks need --method gptq")
    block_types = _block_types(ckpt, gguf_type) if gguf_type else None
    sdt = _scale_dtype(opts, ckpt)
    t0 = time.perf_counter()
    n_layers = ckpt.config.num_hidden_layers
    key = resume_key(ckpt, opts, sdt, device, gguf_type, imatrix_out is not None)
    bar = tqdm(total=n_layers, desc=f"{opts.method} layers", unit="layer", disable=not progress)
    with ArtifactWriter(out_dir, resume_key=key) as writer, bar:
        run = _Run(writer, device, block_types, imatrix_out is not None)
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
            _gptq_layers(ckpt, opts, writer, sdt, bar, device, run)
        config = dict(ckpt.raw_config)
        if gguf_type:
            config["quantization_config"] = blocks_quantization_config(gguf_type)
        else:
            observer = "mse" if opts.search.enabled else "minmax"  # compressed-tensors' name for a searched range
            config["quantization_config"] = quantization_config(opts.spec, actorder=opts.act_order, observer=observer)
        writer.write_json("config.json", config)
        writer.copy_tokenizer(ckpt.path)
        report = _report(ckpt, opts, sdt, run, time.perf_counter() - t0, device)
        if imatrix_out:
            calib = Path(opts.calib or default_calibration_text()).name
            report["imatrix"] = str(write_imatrix(imatrix_out, run.imatrix, calib, opts.seqlen))
        writer.write_json("quantkit.json", report)
    return report


def _block_types(ckpt: Checkpoint, gguf_type: str) -> dict[str, Any]:
    """HF weight name -> the ggml type a ``gguf_type`` GGUF stores each decoder-layer linear in."""
    plan = [t for t in plan_tensors(ckpt.config, gguf_type) if t.hf_name.startswith("model.layers.") and not t.is_norm]
    unsupported = sorted({t.qtype.name for t in plan if t.qtype not in LAYOUTS})
    if unsupported:
        raise QuantkitError(f"--type {gguf_type}: GPTQ cannot write {', '.join(unsupported)} blocks (use --method rtn)")
    return {t.hf_name: t.qtype for t in plan}


def resume_key(ckpt: Checkpoint, opts: QuantizeOptions, sdt, device: str, *target: Any) -> str:
    """A hash of everything that decides the output: options, device, quantkit's version, and the identity
    (name, size, modification time) of every input file. A rerun resumes only when it is unchanged."""
    files = [ckpt.path / n for n in ("config.json", "tokenizer.model", *ckpt.headers)]
    if opts.method == "gptq":
        files.append(Path(opts.calib or default_calibration_text()))
    ident = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    blob = {"version": __version__, "options": opts.__dict__, "sdt": str(sdt), "device": device, "files": ident,
            "target": target}  # fmt: skip
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _report(ckpt, opts, sdt, run: _Run, seconds, device) -> dict[str, Any]:
    cfg, stats = ckpt.config, run.stats
    n_linear = cfg.linear_parameters()
    scale_bits = torch.finfo(sdt).bits
    report = {
        "quantkit_version": __version__,
        "source": str(ckpt.path),
        "options": {**opts.__dict__, "scale_dtype": str(sdt).removeprefix("torch.")},
        "format": "compressed-tensors pack-quantized",
        "linear_parameters": n_linear,
        "bits_per_weight": opts.spec.bits_per_weight(scale_bits),
        "seconds": round(seconds, 3),
        "peak_memory_bytes": _peak_rss_bytes(),
        "peak_gpu_memory_bytes": _peak_gpu_bytes(device),
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
