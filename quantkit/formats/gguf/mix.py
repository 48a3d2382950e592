"""Size-budget mixes (``--target-bpw B``, ``--max-size SIZE``): a ggml type for every decoder-layer weight and
the token embedding of a GGUF, chosen to minimise the summed predicted output error under a byte budget.

Sensitivity: for each weight W [O, I] and each candidate type T (after llama.cpp's row-length fallback), the
predicted loss is the relative output error of quantizing W alone with T's round-to-nearest encoder,
tr((W - Q) D (W - Q)ᵀ) / tr(W D Wᵀ) with D = diag(E[x²]) the importance matrix's mean squared input per
column (an imatrix file; D = I without one), on evenly spaced sample rows. Relative, because every Gemma
linear's output is normalised before it reaches the residual stream (q_norm / k_norm, and the post-attention /
post-feedforward norms after o_proj / down_proj): an absolute error would weigh layers by their output scale
(measured: absolute errors weighted by an imatrix gave a mix with 5x the KLD of one without).
The tied token embedding is also the output projection: its relative row error counts twice (``uses``), and
it is sampled unweighted (an imatrix has no statistic of which rows are looked up). It is a mix's largest
lever in small models (63% of the Gemma 3 270M's weights, 10% of Gemma 2 9B's): measured on the 270M at
--target-bpw 7 (RTN weighted by llama-imatrix's matrix; llama.cpp's KLD vs F32, WikiText / code), choosing
it with the layers gave a 5.8-bit file of KLD 0.019 / 0.019 (Q5_1 embedding, layers near their imported
types), where keeping it at the file type's Q8_0 and mixing the layers alone gave 7.2 bits and 0.144 / 0.108.
Choice: the types minimising the summed loss within the budget, a knapsack solved by dynamic programming
(``knapsack.choose``). Overridden weights (``--tensor-type token_embd=q6_k`` keeps the embedding out of the
mix) and norms keep their types; their bytes count against the budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from tqdm import tqdm

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.blocks import dequantize_rows, quantize_rows, quantize_rows_weighted
from quantkit.formats.gguf.export import overhead_bytes
from quantkit.formats.gguf.grids import searched_blocks
from quantkit.formats.gguf.knapsack import Budget, Choice, choose
from quantkit.formats.gguf.layouts import block_size
from quantkit.formats.gguf.policy import Override, PlannedTensor, fallback_type, plan_tensors
from quantkit.formats.gguf.stream import torch_threads
from quantkit.io.checkpoint import Checkpoint

# the block types a mix picks from (quantkit encodes them all; llama.cpp loads them all)
CANDIDATES = (QT.Q2_K, QT.Q3_K, QT.Q4_0, QT.Q4_1, QT.IQ4_NL, QT.IQ4_XS, QT.Q4_K, QT.Q5_0, QT.Q5_1, QT.Q5_K,
              QT.Q6_K, QT.Q8_0)  # fmt: skip
# the pinned llama.cpp's Q1_0 (blocks of 128, 1.125 bits per weight) and Q2_0 (blocks of 64, 2.25), for the
# layer weights: the only types under 4.5 bits whose blocks divide a 640-wide row (the Gemma 3 270M's). No
# fallback: a row they do not divide leaves them out.
LOW_BIT = (QT.Q1_0, QT.Q2_0)
# written onto quantkit's searched scales where GPTQ does not write them (grids.searched_blocks): llama.cpp's
# Q2_0 encoder sets d = max |x| and leaves the level 2d unused; Q1_0's d = mean |x| is already least squares
SEARCHED = (QT.Q2_0,)
# and where the mix is written with calibration (GPTQ, or export --imatrix: llama-quantize refuses most of these
# without an importance matrix), the codebook i-quants, which reach below Q2_K's 2.625 bits per weight
CODEBOOKS = (QT.IQ3_S, QT.IQ3_XXS, QT.IQ2_S, QT.IQ2_XS, QT.IQ2_XXS, QT.IQ1_M, QT.IQ1_S)
NEEDS_WEIGHTS = (QT.IQ2_XS, QT.IQ2_XXS, QT.IQ1_S)  # encoders that take no unweighted rows (as libggml's)
EMBEDDING = "token_embd.weight"
MEASURE_ROWS = 8192  # rows of a weight dequantized at a time to check the prediction
SAMPLE_ROWS = 256  # rows of each weight quantized per candidate type to predict its loss
SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'180M' -> 180_000_000, '5.2G', '512MiB', '1000000' -> bytes (K/M/G decimal, KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b?|b?)\s*", text.lower())
    unit = m and m.group(2).removesuffix("b") + ("b" if m.group(2).endswith("ib") else "")
    if m is None or unit not in SIZE_UNITS:
        raise QuantkitError(f"--max-size {text!r}: expected a size such as 180M, 5.2G or 512MiB")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


def budget_for(plan: Sequence[PlannedTensor], target_bpw: float | None, max_size: int | None, overhead: int) -> Budget:
    """The tensor-byte budget of ``--target-bpw`` (bits per weight over every tensor, as the export report
    counts them) or ``--max-size`` (the whole file: ``overhead`` is its header and padding)."""
    if (target_bpw is None) == (max_size is None):
        raise QuantkitError("give one of --target-bpw and --max-size")
    if target_bpw is not None:
        n_params = sum(math.prod(t.shape) for t in plan)
        return Budget(int(target_bpw * n_params / 8), f"--target-bpw {target_bpw:g}")
    return Budget(max_size - overhead, f"--max-size {max_size} (bytes)")


def candidates(row_len: int, codebooks: bool = False, low_bit: bool = True) -> list[QT]:
    """The distinct types a row of ``row_len`` can take: each candidate (with ``codebooks``, the codebook
    i-quants too) through the row-length fallback, and (``low_bit``) Q1_0 / Q2_0 where their blocks divide
    the row."""
    out = [fallback_type(t, row_len) for t in CANDIDATES + (CODEBOOKS if codebooks else ())]
    out += [t for t in LOW_BIT if low_bit and row_len % block_size(t) == 0]
    return [t for t in dict.fromkeys(out) if t != QT.F16]


def relative_error(w: np.ndarray, q: np.ndarray, importance: np.ndarray | None) -> float:
    """tr((W - Q) D (W - Q)ᵀ) / tr(W D Wᵀ) of rows W, Q [S, I] (D = diag(importance), I without one)."""
    d = np.ones(w.shape[1]) if importance is None else importance.astype(np.float64)
    w64 = w.astype(np.float64)
    return float((((w64 - q) ** 2) @ d).sum() / max(float(((w64**2) @ d).sum()), 1e-30))


def sampled_rows(n_rows: int, sample_rows: int = SAMPLE_ROWS) -> np.ndarray:
    """``sample_rows`` evenly spaced row indices of ``n_rows`` (all of them when fewer)."""
    return np.unique(np.linspace(0, n_rows - 1, min(n_rows, sample_rows)).round().astype(np.int64))


def weight_loss(w: np.ndarray, qtype: QT, importance: np.ndarray | None, sample_rows: int = SAMPLE_ROWS) -> float:
    """Predicted relative output error of W float32 [O, I] round-to-nearest in ``qtype`` (importance: [I] or
    None), from ``sample_rows`` evenly spaced rows. The encoders that need importance weights (IQ2_XS,
    IQ2_XXS, IQ1_S) get the importance, or unit weights without one; Q2_0 is rounded onto searched scales,
    as a mix writes it."""
    x = np.ascontiguousarray(w[sampled_rows(w.shape[0], sample_rows)], dtype=np.float32)  # [S, I]
    if qtype in SEARCHED:
        with torch_threads(1):  # many small element-wise passes: OpenMP's barriers cost more than they give
            blocks = searched_blocks(torch.from_numpy(x), qtype, importance)
    elif qtype in NEEDS_WEIGHTS:
        qw = np.ones(x.shape[1], np.float32) if importance is None else importance.astype(np.float32)
        blocks = quantize_rows_weighted(x, qtype, qw)
    else:
        blocks = quantize_rows(x, qtype)
    return relative_error(x, dequantize_rows(blocks, qtype), importance)


def mixable(plan: Sequence[PlannedTensor], overrides: Sequence[Override]) -> list[PlannedTensor]:
    """The weights a mix chooses for: the 2-D weights (decoder layers' and the token embedding) no override
    names."""
    return [t for t in plan if t.gguf_name.startswith(("blk.", EMBEDDING)) and len(t.shape) == 2
            and not any(o.matches(t.gguf_name) for o in overrides)]  # fmt: skip


def uses(t: PlannedTensor) -> int:
    """How many matmuls a weight's error reaches: two for the token embedding, which Gemma ties to the output
    projection (a GGUF of it has no output.weight), else one."""
    return 2 if t.gguf_name == EMBEDDING else 1


def types_for(t: PlannedTensor, codebooks: bool) -> list[QT]:
    """The candidate types of one mixable weight: the token embedding (written by rounding, never by GPTQ,
    and without an importance of its rows) takes no codebook i-quant, nor Q1_0 / Q2_0. Measured on the 270M
    (llama.cpp's KLD on WikiText): a Q2_0 embedding (relative error 0.15, searched scales) with lossless
    layers gave KLD 1.56, where an IQ4_NL one with GPTQ layers squeezed to the same budget gave 0.17; the
    summed relative errors ranked them the other way (0.28 against 0.56). Until the losses are weighed by
    measured KLD, the embedding keeps to 4.5 bits and up."""
    emb = t.gguf_name == EMBEDDING
    return candidates(t.shape[1], codebooks and not emb, low_bit=not emb)


def priced(weights: Sequence[PlannedTensor], codebooks: bool = False) -> dict[str, list[Choice]]:
    """GGUF name -> every candidate type with its bytes (losses unknown: 0)."""
    return {t.gguf_name: [Choice(q, PlannedTensor(t.gguf_name, t.hf_name, t.shape, q).nbytes, 0.0)
                          for q in types_for(t, codebooks)] for t in weights}  # fmt: skip


def measure(
    ckpt: Checkpoint,
    weights: Sequence[PlannedTensor],
    importance: Mapping[str, np.ndarray] | None,
    bar=None,
    codebooks: bool = False,
) -> dict[str, list[Choice]]:
    """GGUF name -> every candidate type's (bytes, predicted loss) for each weight (read one at a time)."""
    out = {}
    for t in weights:
        rows = sampled_rows(t.shape[0])
        w = ckpt.get_rows(t.hf_name, rows, torch.float32).numpy()  # [S, I]
        if not np.isfinite(w).all():
            raise QuantkitError(f"{ckpt.path}: tensor {t.hf_name!r} contains NaN or inf values")
        d = _importance(importance, t)
        n = uses(t)
        opts = []
        for q in types_for(t, codebooks):
            p = PlannedTensor(t.gguf_name, t.hf_name, t.shape, q)
            opts.append(Choice(q, p.nbytes, n * weight_loss(w, q, d, len(rows))))
        out[t.gguf_name] = opts
        if bar is not None:
            bar.update(1)
    return out


def _importance(importance: Mapping[str, np.ndarray] | None, t: PlannedTensor) -> np.ndarray | None:
    """A weight's importance [I]; a layer weight the matrix lacks is an error, the token embedding (whose
    rows an imatrix does not cover) goes unweighted."""
    d = None if importance is None else importance.get(t.gguf_name)
    if importance is not None and t.gguf_name != EMBEDDING and (d is None or d.shape != (t.shape[1],)):
        raise QuantkitError(f"the importance matrix has no {t.shape[1]}-column entry for {t.gguf_name}")
    return d if d is not None and d.shape == (t.shape[1],) else None


def plan_mix(
    ckpt: Checkpoint,
    qtype: str,
    overrides: Sequence[Override],
    budget: Budget,
    importance: Mapping[str, np.ndarray] | None = None,
    bar=None,
    calibrated: bool = False,
) -> tuple[dict[str, QT], dict[str, Choice]]:
    """(GGUF name -> type for every tensor, GGUF name -> the mix's choice for each mixed weight); ``calibrated``:
    the file is written with calibration (GPTQ, or an imatrix), so the fixed tensors follow llama-quantize's
    imatrix rules and the codebook i-quants are candidates too."""
    if ckpt.quant_spec is not None:
        raise QuantkitError(f"{ckpt.path}: a budget mix quantizes from the original weights; give the dense checkpoint")
    plan = plan_tensors(ckpt.config, qtype, calibrated or importance is not None, overrides)
    free = mixable(plan, overrides)
    names = {t.gguf_name for t in free}
    fixed = sum(t.nbytes for t in plan if t.gguf_name not in names)
    choose(priced(free, calibrated), budget, fixed)  # refuses a budget nothing fits before the measuring starts
    chosen = choose(measure(ckpt, free, importance, bar, calibrated), budget, fixed)
    types = {t.gguf_name: t.qtype for t in plan} | {n: c.qtype for n, c in chosen.items()}
    return types, chosen


def measured_losses(
    ckpt: Checkpoint, path: Path, names: Iterable[str], importance: Mapping[str, np.ndarray] | None
) -> dict[str, float]:
    """GGUF name -> tr((W - Q) D (W - Q)ᵀ) of the blocks written at ``path``, every row (the prediction's
    check: it sampled rows)."""
    plan = {t.gguf_name: t for t in plan_tensors(ckpt.config, "f32")}
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    out = {}
    for name in names:
        t, p = stored[name], plan[name]
        d = _importance(importance, p)
        d = np.ones(p.shape[1]) if d is None else d.astype(np.float64)
        blocks = np.asarray(t.data).view(np.uint8).reshape(p.shape[0], -1)
        err = ref = 0.0
        for lo in range(0, p.shape[0], MEASURE_ROWS):  # in slabs: a 9B embedding is 3.7 GB as float32
            rows = np.arange(lo, min(lo + MEASURE_ROWS, p.shape[0]))
            w = ckpt.get_rows(p.hf_name, rows, torch.float32).numpy().astype(np.float64)  # [R, I]
            q = dequantize_rows(blocks[rows], t.tensor_type).reshape(w.shape)
            err, ref = err + float((((w - q) ** 2) @ d).sum()), ref + float(((w**2) @ d).sum())
        out[name] = uses(p) * err / max(ref, 1e-30)
    return out


def mix_report(export: dict, chosen: Mapping[str, Choice], budget: Budget, measured: Mapping[str, float]) -> dict:
    """The mix's part of the report: the budget, and every tensor's type, bytes and predicted / measured loss."""
    tensors = []
    for e in export["tensors"]:
        c = chosen.get(e["name"])
        row = {"name": e["name"], "type": e["type"], "bytes": e["bytes"], "mixed": c is not None}
        if c is not None:
            row |= {"predicted_loss": c.loss, "measured_loss": measured.get(e["name"])}
        tensors.append(row)
    return {
        "budget": budget.what,
        "budget_tensor_bytes": budget.tensor_bytes,
        "tensor_bytes": sum(e["bytes"] for e in export["tensors"]),
        "predicted_loss": sum(c.loss for c in chosen.values()),
        "measured_loss": sum(measured.values()),
        "tensors": tensors,
    }


@dataclass(frozen=True)
class TypeChoice:
    """Every tensor's type (GGUF name -> type), and for a budget mix the budget and each mixed weight's choice."""

    types: dict[str, QT]
    overrides: tuple[Override, ...]
    budget: Budget | None = None
    chosen: Mapping[str, Choice] | None = None

    @property
    def searched(self) -> frozenset[str]:
        """The mixed Q2_0 weights, written onto quantkit's searched scales unless GPTQ writes them
        (``grids.searched_blocks``: llama.cpp's own Q2_0 encoder has 3.5x the error)."""
        return frozenset(n for n, c in (self.chosen or {}).items() if c.qtype in SEARCHED)


def choose_types(
    ckpt: Checkpoint,
    qtype: str,
    overrides: Sequence[Override] = (),
    target_bpw: float | None = None,
    max_size: int | None = None,
    importance: Mapping[str, np.ndarray] | None = None,
    progress: bool = True,
    calibrated: bool = False,
) -> TypeChoice:
    """The file type's types, edited by the overrides (``--tensor-type``) and then by a budget mix
    (``--target-bpw`` / ``--max-size``, if given). ``calibrated``: the file is written with calibration (GPTQ,
    or an export's imatrix): its types are llama-quantize's with an imatrix (GPTQ's Hessian is one, richer),
    and a mix may take the codebook i-quants."""
    plan = plan_tensors(ckpt.config, qtype, calibrated or importance is not None, overrides)
    types = {t.gguf_name: t.qtype for t in plan}
    if target_bpw is None and max_size is None:
        return TypeChoice(types, tuple(overrides))
    budget = budget_for(plan, target_bpw, max_size, overhead_bytes(ckpt, qtype))
    free = mixable(plan, overrides)
    with tqdm(total=len(free), desc="Measuring sensitivity", unit="weight", disable=not progress) as bar:
        types, chosen = plan_mix(ckpt, qtype, overrides, budget, importance, bar, calibrated)
    return TypeChoice(types, tuple(overrides), budget, chosen)


def describe(
    choice: TypeChoice, report: dict, ckpt: Checkpoint, out: Path, importance: Mapping[str, np.ndarray] | None
) -> dict:
    """The report's ``overrides`` and, for a budget mix, ``mix`` (losses measured on the file at ``out``);
    ``report``: the export's report."""
    extra: dict = {"overrides": [f"{o.pattern}={o.qtype.name.lower()}" for o in choice.overrides]}
    if choice.chosen:
        measured = measured_losses(ckpt, out, choice.chosen, importance)
        extra["mix"] = mix_report(report, choice.chosen, choice.budget, measured)
    return extra


def format_mix(mix: dict) -> str:
    """The mix's table: every mixed weight's type, bytes, predicted and measured loss."""
    lines = [f"{'tensor':<28} {'type':<7} {'bytes':>10} {'predicted':>11} {'measured':>11}"]
    for t in mix["tensors"]:
        if t["mixed"]:
            lines.append(f"{t['name']:<28} {t['type']:<7} {t['bytes']:>10} {t['predicted_loss']:>11.4g} "
                         f"{t['measured_loss']:>11.4g}")  # fmt: skip
    lines.append(f"{mix['budget']}: {mix['tensor_bytes']} tensor bytes of {mix['budget_tensor_bytes']} allowed; "
                 f"loss predicted {mix['predicted_loss']:.4g}, measured {mix['measured_loss']:.4g}")  # fmt: skip
    return "\n".join(lines)
