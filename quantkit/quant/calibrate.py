"""GPTQ calibration of one decoder layer, true-sequential, through the layer's own forward stages.

The calibration activations go through decoder layer i by ``DecoderLayer``'s stages (the ones its forward is
made of), each linear's input Hessian is accumulated in fp32, and the subsets q,k,v -> o -> gate,up -> down
are quantized in that order: each subset's quantized linears are what the following stages run. The
layer's outputs are exactly ``DecoderLayer.forward`` with the quantized linears installed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from gguf import GGMLQuantizationType

from quantkit.formats.gguf.codebook_grid import CODEBOOK_TYPES, BlockWeight, CodebookGrid, choose_codebook_grid
from quantkit.formats.gguf.grids import BlockGrid, choose_grid
from quantkit.formats.gguf.imatrix import ImportanceStats
from quantkit.formats.packed.linear import CastLinear, PackedLinear, dense_linear, holding_weights
from quantkit.io.checkpoint import Checkpoint
from quantkit.io.layout import layer_prefix
from quantkit.model import LINEAR_NAMES, Gemma
from quantkit.quant.descent import GPTQMetric, descends
from quantkit.quant.gptq import GPTQResult, factor_hessian, fp_target, gptq_quantize, weighted_norms
from quantkit.quant.grid_refine import gptq_refined
from quantkit.quant.hessian import Drift, Hessian, shrink_offdiagonal, unshrunk_row_errors
from quantkit.quant.ldlq import ldlq_quantize
from quantkit.quant.memory import peak_rss_gib, release_freed_memory
from quantkit.quant.primitives import QuantizedWeight, rtn
from quantkit.quant.recipes import OWN_TARGET_TYPES, QuantizeOptions

# true-sequential order; modules of one subset read the same input, so they share one Hessian
SUBSETS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

Emit = Callable[[str, QuantizedWeight | BlockWeight], None]  # (module path, its quantized weight)
Pair = tuple[torch.Tensor, torch.Tensor | None]  # a stage's output on the quantized and the unquantized path


def weight_rel_err(w: torch.Tensor, qw: QuantizedWeight | BlockWeight) -> float:
    """‖W − dequant(W)‖² / ‖W‖²."""
    w = w.float()
    return float(((w - qw.dequantize()) ** 2).sum() / (w**2).sum().clamp_min(1e-30))


DIAGNOSTIC_ROWS = 1024  # a linear's output errors in the report are measured on this many of its rows (at most)
DIAGNOSTIC_WIDTH = 4096  # longer rows are sampled fewer, down to DIAGNOSTIC_ROWS / 4 (``diagnostic_rows``)


def diagnostic_rows(o: int, i: int) -> torch.Tensor:
    """The rows of an [o, i] linear the report's output errors are measured on: all of them, or evenly spaced
    ones. tr(W H Wᵀ) costs rows · i² (a whole 9B down_proj's: 0.7 TFLOP), so rows longer than DIAGNOSTIC_WIDTH
    get fewer, as many as cost what DIAGNOSTIC_ROWS rows of that width do, but at least a quarter of them (a
    9B down_proj: 256 of 14336-wide rows, 105 GFLOP per product). Rows are alike enough for 1024 to give the
    relative errors to about a percent, 256 to about two."""
    n = max(DIAGNOSTIC_ROWS // 4, min(DIAGNOSTIC_ROWS, DIAGNOSTIC_ROWS * DIAGNOSTIC_WIDTH**2 // i**2))
    return torch.arange(o) if o <= n else torch.arange(n) * o // n


def _rtn_error(
    w: torch.Tensor, grid: BlockGrid | CodebookGrid | None, o: QuantizeOptions, sdt: torch.dtype, rows: torch.Tensor
) -> torch.Tensor:
    """W − RTN(W) on ``rows``, float32 [r, I]: the round-to-nearest baseline on the grid GPTQ uses (a codebook
    type's: its encoder's own choice)."""
    wr = w[rows].float()
    if grid is None:
        return wr - rtn(wr, o.spec, sdt).dequantize()  # groups lie within a row: the same as RTN of all rows
    if isinstance(grid, CodebookGrid):
        return wr - grid.rtn().dequantize()[rows]
    return wr - grid.round_rows(w, rows)[1]


@dataclass(frozen=True)
class Calibration:
    """What the calibration of every layer of one run shares."""

    ckpt: Checkpoint
    opts: QuantizeOptions
    sdt: torch.dtype  # the scales' dtype
    device: str
    block_types: Mapping[str, GGMLQuantizationType] = field(default_factory=dict)  # HF weight name -> ggml
    # type, when the target is a GGUF (each linear is then rounded onto that type's grid)
    imatrix: ImportanceStats | None = None  # collects the importance matrix when one is written


class _Timer:
    """Adds the wall time of each ``with`` block to ``seconds[key]``."""

    def __init__(self, seconds: dict[str, float], key: str):
        self.seconds, self.key = seconds, key

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds[self.key] += time.perf_counter() - self.t0


class LayerCalibrator:
    """GPTQ for decoder layer ``i`` of ``model`` (its norms loaded; its linears are read from the checkpoint
    when quantized). Each quantized weight goes to ``emit`` as soon as it is made; ``stats`` (per linear
    path), ``seconds`` (per kind of work) and ``peaks`` (peak RSS in GiB after each subset) record the run.

    The layer runs stage by stage, batch by batch, keeping only one list of hidden states [B, T, H] across
    the layer (plus, briefly, the attention outputs); every other activation is recomputed per batch and
    folded into its Hessian at once, so e.g. down_proj's inputs are never all held:
      x1 = attn_input(h)                                  -> H(q,k,v) -> quantize q, k, v
      a  = attention(x1) with quantized q, k, v            -> H(o)     -> quantize o   (a kept per batch)
      h <- attn_residual(h, a); x2 = mlp_input(h)          -> H(gate, up) -> quantize gate, up
      m  = mlp_hidden(x2)                                  -> H(down)  -> quantize down
      h <- mlp_residual(h, m)  (m recomputed)              -> the next layer's inputs
    Each stage is the very method ``DecoderLayer.forward`` calls, on the same batch, so the outputs are
    that forward's with the quantized linears in place, bit for bit. Only ``fp_targets``, whose unquantized
    path runs beside, holds the layer's dense linears (in the checkpoint's dtype); that path's down_proj is
    never quantized, so its mlp_residual is taken in the H(down) pass, and only the quantized path
    recomputes m.
    """

    def __init__(self, model: Gemma, i: int, cal: Calibration, emit: Emit):
        self.model, self.i, self.layer, self.cal, self.emit = model, i, model.layers[i], cal, emit
        self.stats: dict[str, dict[str, float | str]] = {}
        self.seconds = dict.fromkeys(("forward_s", "hessian_s", "grid_s", "solver_s", "diagnostics_s"), 0.0)
        self.fwd, self.hes = _Timer(self.seconds, "forward_s"), _Timer(self.seconds, "hessian_s")
        self.grd, self.sol = _Timer(self.seconds, "grid_s"), _Timer(self.seconds, "solver_s")
        self.dia = _Timer(self.seconds, "diagnostics_s")
        self.peaks: dict[str, float] = {}  # the process's peak RSS (GiB) once each subset is quantized

    @torch.no_grad()
    def run(self, hs: list[torch.Tensor], fs: list[torch.Tensor] | None = None) -> tuple[list, list | None]:
        """hs: this layer's inputs, one [B, T, H] per batch; replaced in place by the layer's outputs.

        With ``fs`` (``fp_targets``) the unquantized model's hidden states [B, T, H] per batch are carried
        beside ``hs``: every stage also runs on them with the layer's dense linears, each subset's inputs x
        (quantized path) and x_fp (unquantized path) give H and the drift D, and each linear is quantized
        towards fp_target(W); ``fs`` is replaced in place too. Without it the walk and its bytes are plain
        GPTQ's."""
        ly, n = self.layer, range(len(hs))
        dense = None if fs is None else self._dense_linears()
        extras = ly.attention_inputs(hs[0])  # cos, sin, mask: the same for every batch

        def both(fn: Callable[[torch.Tensor], torch.Tensor], j: int) -> Pair:
            """fn on batch j of the quantized path, and of the unquantized one when it is carried."""
            with self.fwd:
                x = fn(hs[j])
                if dense is None:
                    return x, None
                with self._using(dense):
                    return x, fn(fs[j])

        def residual(j: int, stage: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: Pair) -> None:
            with self.fwd:
                hs[j] = stage(hs[j], x[0])
                if dense is not None:
                    with self._using(dense):
                        fs[j] = stage(fs[j], x[1])

        def attention(h: torch.Tensor) -> torch.Tensor:
            return ly.attention(ly.attn_input(h), extras)

        def mlp_hidden(h: torch.Tensor) -> torch.Tensor:
            return ly.mlp_hidden(ly.mlp_input(h))

        def down_inputs(j: int) -> Pair:
            """m of batch j on both paths; the unquantized path's layer output is taken from it at once."""
            x = both(mlp_hidden, j)
            if dense is not None:
                with self.fwd, self._using(dense):
                    fs[j] = ly.mlp_residual(fs[j], x[1])
            return x

        held = [ly, *(dense or {}).values()]  # each pass below makes each float weight it runs once
        with holding_weights(held):
            stats = self._stats((both(ly.attn_input, j) for j in n), weights_of=SUBSETS[0])
        self._quantize(SUBSETS[0], *stats)
        with holding_weights(held):
            a = [both(attention, j) for j in n]
            stats = self._stats(a, consume=False, weights_of=SUBSETS[1])  # a feeds the residual below
        self._quantize(SUBSETS[1], *stats)
        with holding_weights(held):
            for j in n:
                residual(j, ly.attn_residual, a[j])
                a[j] = None
            del a
            stats = self._stats((both(ly.mlp_input, j) for j in n), weights_of=SUBSETS[2])
        self._quantize(SUBSETS[2], *stats)
        with holding_weights(held):
            stats = self._stats((down_inputs(j) for j in n), weights_of=SUBSETS[3])  # m never all held
        self._quantize(SUBSETS[3], *stats)
        with holding_weights([ly]):
            for j in n:
                with self.fwd:
                    hs[j] = ly.mlp_residual(hs[j], mlp_hidden(hs[j]))  # m recomputed
        return hs, fs

    def _dense_linears(self) -> dict[str, torch.nn.Module]:
        """The layer's unquantized linears in the checkpoint's dtype, cast per call: no fp32 copy."""
        p = layer_prefix(self.i)
        return {n: CastLinear(self.cal.ckpt.get(f"{p}{n}.weight", check_finite=True).to(self.cal.device))
                for n in LINEAR_NAMES}  # fmt: skip

    def _stats(
        self, pairs: Iterable[Pair], consume: bool = True, weights_of: tuple[str, ...] = ()
    ) -> tuple[Hessian, Drift | None]:
        """H (and, with the unquantized path, D) of a subset's inputs, batch by batch; ``consume``: the
        unquantized inputs are not used again; ``weights_of``: the subset whose W D the drift may
        accumulate directly (``Drift``'s ``weights``)."""
        hess = drift = None
        for x, x_fp in pairs:
            if hess is None:
                hess = Hessian(x.shape[-1], self.cal.device)
                if x_fp is not None:  # the weights are read only where the drift keeps W D itself
                    rows = [self.cal.ckpt.config.linear_shapes()[n][0] for n in weights_of]
                    p, direct = layer_prefix(self.i), weights_of and Drift.direct(rows, x.shape[-1])
                    ws = {n: self.cal.ckpt.get(f"{p}{n}.weight") for n in weights_of} if direct else None
                    drift = Drift(x.shape[-1], self.cal.device, ws)
            with self.hes:
                hess.add(x)
                if drift is not None:
                    drift.add(x_fp, x, consume)
        return hess, drift

    def _quantize(self, names: tuple[str, ...], hess: Hessian, drift: Drift | None = None) -> None:
        """Quantize the linears ``names`` (one subset: they read the same input, whose Hessian is ``hess``);
        with ``drift`` each one's target is the weight that best reproduces the unquantized model (fp_target)."""
        o, p, cal = self.cal.opts, layer_prefix(self.i), self.cal
        ws = {n: cal.ckpt.get(f"{p}{n}.weight", check_finite=True) for n in names}
        if cal.imatrix is not None:
            for n in names:
                cal.imatrix.add_from_hessian(self.i, n, hess.H, hess.n)
        w0 = next(iter(ws.values()))
        with self.grd:  # a GGUF type's fixed grid per linear (its scales), from W weighted by diag(H)
            grids = {n: self._grid(p + n, w, hess.H) for n, w in ws.items()}
        with self.dia:  # tr(W H Wᵀ) and RTN's tr(D H Dᵀ) on the diagnostic rows need H, before it is factored
            rows = {n: diagnostic_rows(*w.shape) for n, w in ws.items()}
            norms = {
                n: weighted_norms([w[rows[n]], _rtn_error(w, grids[n], o, cal.sdt, rows[n])], hess.H)
                for n, w in ws.items()
            }  # [den, rtn num]
            g = w0.shape[1] if o.spec.group_size == -1 else o.spec.group_size
            imp = o.search.importance(hess.H, slice(None), g) if o.search.enabled else None
            imp = None if imp is None else imp.clone()  # H's storage is reused by its factor
            H_kept = hess.H.clone() if o.refine_iters else None  # the refit needs H after the factor
            shrunk = 0.0 < o.hessian_shrink < 1.0 and not (o.refine_iters and not any(grids.values()))
            diag = hess.H.diagonal().clone().cpu() if shrunk else None  # (the refit solves with H itself)
            descent = o.descent_sweeps > 0 and o.hessian_shrink < 1 and any(map(descends, grids.values()))
            H_m = hess.H.clone() if descent else None  # made GPTQ's metric, for the descent after GPTQ
        with self.sol:
            # the linears GPTQ aims at the unquantized model (fp_targets): not those on a level table or codebook
            towards_fp = {n for n, g in grids.items() if g is None or g.qtype not in OWN_TARGET_TYPES}
            wds = {} if drift is None else drift.products({n: ws[n] for n in towards_fp})  # D gone before the factor
            group = 8 if any(isinstance(g, CodebookGrid) for g in grids.values()) else 1  # slabs stay together
            shrink_offdiagonal(hess.H, o.hessian_shrink)
            fac = factor_hessian(hess, o.damp, o.act_order, group)  # one factor for the whole subset
            metric = None if H_m is None else GPTQMetric.of(H_m, o.hessian_shrink, fac.lam)
        for name, w in ws.items():
            with self.sol:
                wd = wds.pop(name, None)  # (a Drift that kept W D itself holds every linear's)
                target = fp_target(w, wd, fac) if wd is not None and name in towards_fp else w.to(cal.device)
                res = self._solve(target, fac, grids[name], imp, H_kept, metric)
            self.emit(p + name, res.weight)
            self.model.set_linear(self.i, name, self._module(res.weight).to(cal.device))
            den, rtn_num = norms[name]
            with self.dia:
                out_err = res.row_sq_output_err[rows[name]]  # in the metric GPTQ solved in
                if diag is not None:  # back to H
                    e = target[rows[name]].cpu().float() - res.weight.dequantize()[rows[name]]
                    out_err = unshrunk_row_errors(out_err, e, diag, o.hessian_shrink)
                self.stats[p + name] = {
                    "weight_rel_err": weight_rel_err(w, res.weight),
                    "output_rel_err": float(out_err.sum()) / den if den > 0 else 0.0,
                    "rtn_output_rel_err": rtn_num / den if den > 0 else 0.0,
                    "error_rows": len(rows[name]),  # the output errors' rows (diagnostic_rows)
                    "damp": res.damp,
                }
                if grids[name] is not None:
                    self.stats[p + name]["ggml_type"] = grids[name].qtype.name
        release_freed_memory()
        self.peaks["+".join(n.split(".")[-1] for n in names)] = peak_rss_gib()

    def _module(self, qw: QuantizedWeight | BlockWeight) -> torch.nn.Module:
        """The linear that runs ``qw`` in the following stages: packed codes, or a GGUF grid's weights."""
        return PackedLinear(qw) if isinstance(qw, QuantizedWeight) else dense_linear(qw.dequantize(self.model.dtype))

    def _grid(self, path: str, w: torch.Tensor, H: torch.Tensor) -> BlockGrid | CodebookGrid | None:
        """The fixed ggml grid this linear is rounded onto when the target is a GGUF type (else None),
        chosen from the original weights weighted by diag(H) (a scalar grid without the Lloyd steps)."""
        qtype = self.cal.block_types.get(path + ".weight")
        if qtype in CODEBOOK_TYPES:
            return choose_codebook_grid(w, qtype, H.diagonal())
        return None if qtype is None else choose_grid(w, qtype, H.diagonal(), refine=0)

    def _solve(
        self, w: torch.Tensor, fac, grid: BlockGrid | CodebookGrid | None, imp, H_kept, metric: GPTQMetric | None
    ) -> GPTQResult:
        """GPTQ of one linear: onto ``grid`` (a GGUF type's; then descended in GPTQ's ``metric``, when given),
        else on the recipe's grid (searched scales, optionally refitted)."""
        o, sdt = self.cal.opts, self.cal.sdt
        if isinstance(grid, CodebookGrid):
            return ldlq_quantize(w, fac, grid, o.blocksize)
        if grid is not None:
            res = gptq_quantize(w, fac, o.spec, sdt, o.blocksize, grid=grid)
            return metric.descend(w, res, o.descent_sweeps) if metric and descends(grid) else res
        if o.refine_iters:
            return gptq_refined(w, H_kept, o.spec, sdt, o.blocksize, o.damp, o.act_order, o.search, o.refine_iters)
        return gptq_quantize(w, fac, o.spec, sdt, o.blocksize, search=o.search, importance=imp)

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
