"""Perplexity (llama-perplexity's method), KL divergence and top-1 agreement of a quantized model against
its reference, on the same tokens.

Each chunk of ``ctx`` tokens starts with BOS; positions ctx/2 .. ctx-2 are scored. Log-
softmax and KL are computed in fp32 from the final (soft-capped) logits; statistics accumulate in fp64.
Two execution modes give the same numbers: whole-model (both models resident) and layer-streamed (groups
of chunks through every layer of one model after the other, holding one layer's weights plus one group's
hidden states, so memory does not grow with the number of chunks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from quantkit.formats.packed.linear import linears_from_checkpoint
from quantkit.io.budget import available_memory
from quantkit.io.checkpoint import Checkpoint
from quantkit.model import Gemma, build_model, load_layer_from

ModelFactory = Callable[[bool], Gemma]


@dataclass
class NllStats:
    """Running sums for PPL = exp(mean nll) and its standard error PPL·sqrt(var(nll)/(n-1))."""

    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0

    def add(self, nll: torch.Tensor) -> None:
        v = nll.double()
        self.total += float(v.sum())
        self.total_sq += float((v * v).sum())
        self.count += v.numel()

    def summary(self) -> dict[str, float]:
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        ppl = math.exp(mean)
        se = ppl * math.sqrt(var / (self.count - 1)) if self.count > 1 else float("nan")
        return {"ppl": ppl, "ppl_se": se, "nll": mean}


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1)


def _nll(lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -lp.gather(-1, targets[..., None]).squeeze(-1)


@dataclass
class Comparison:
    """One quantized model against the reference, on the same tokens."""

    quant: NllStats = field(default_factory=NllStats)
    kld: list[np.ndarray] = field(default_factory=list)
    same_top1: int = 0

    def add(self, ref_lp: torch.Tensor, q_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """ref_lp: reference log-probs [B, S, V]; q_logits [B, S, V]; targets [B, S] (the next tokens)."""
        q_lp = _log_probs(q_logits)
        self.quant.add(_nll(q_lp, targets))
        kl = (ref_lp.exp() * (ref_lp - q_lp)).sum(-1)  # [B, S]
        self.kld.append(kl.flatten().double().numpy())
        self.same_top1 += int((ref_lp.argmax(-1) == q_lp.argmax(-1)).sum())

    def summary(self, r: dict[str, float]) -> dict[str, Any]:
        kl = np.concatenate(self.kld)
        q = self.quant.summary()
        return {
            "reference": r,
            "quantized": q,
            "delta_ppl": q["ppl"] - r["ppl"],
            "delta_ppl_pct": 100.0 * (q["ppl"] / r["ppl"] - 1.0),
            "kld_mean": float(kl.mean()),
            "kld_p99": float(np.percentile(kl, 99)),
            "kld_p999": float(np.percentile(kl, 99.9)),
            "top1_agreement": self.same_top1 / kl.size,
        }


def scored(ctx: int) -> slice:
    """Positions whose next-token prediction counts: first = ctx // 2 .. ctx - 2."""
    return slice(ctx // 2, ctx - 1)


def _batches(chunks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(chunks.split(batch_size))


def _whole_model_logits(model: Gemma, batches: list[torch.Tensor], sl: slice) -> Iterator[torch.Tensor]:
    for ids in batches:
        yield model(ids.to(model.device), sl).cpu()


GLOBALS = ("model.embed_tokens.weight", "model.norm.weight")


def _same_globals(a: Checkpoint, b: Checkpoint) -> bool:
    """Whether two checkpoints hold identical embedding and final norm (quantize copies them verbatim)."""
    return all(a.shape_of(n) == b.shape_of(n) and torch.equal(a.get(n), b.get(n)) for n in GLOBALS)


def _scored_hidden(model: Gemma, ckpt: Checkpoint, quantized: bool, batches: list[torch.Tensor], sl: slice, bar):
    """One group of batches through every layer of ``ckpt``: ``Gemma.forward`` with the loop turned inside
    out (the model's own ``embed`` and ``layers[i]``, one layer's weights resident at a time, each batch's
    hidden states replaced in place, never duplicated); returns the scored positions' final hidden states,
    one [B, S, H] per batch, for ``head``."""
    hs = [model.embed(ids.to(model.device)) for ids in batches]
    linears = (lambda j: linears_from_checkpoint(ckpt, j)) if quantized else None
    for i in range(ckpt.config.num_hidden_layers):
        load_layer_from(model, ckpt, i, linears)
        for j in range(len(hs)):
            hs[j] = model.layers[i](hs[j])
        model.unload_layer(i)
        bar.update(1)
    for j in range(len(hs)):
        hs[j] = hs[j][:, sl].clone()
    return hs


def _streamed_logits(models, batches, sl, dtype, device, group: int, progress) -> Iterator[list[torch.Tensor]]:
    """Layer-streamed evaluation, group-major: each group of ``group`` batches goes through all layers of
    the reference, then of each quantized model, then the heads; so memory holds one layer's weights, one
    group's hidden states and the (shared) embedding, whatever the number of chunks. Yields, batch by
    batch, the scored-position logits of every model."""
    same = [_same_globals(models[0][0], ck) for ck, _ in models[1:]]  # before any embedding is resident
    ref = build_model(models[0][0], dtype, device, layers=False)
    built = [ref]
    for (ck, _), shared in zip(models[1:], same, strict=True):
        if shared:  # quantize copies them verbatim: share the embedding and norm
            m = Gemma(ck.config, dtype, device)
            m.embed_tokens, m.norm = ref.embed_tokens, ref.norm
        else:
            m = build_model(ck, dtype, device, layers=False)
        built.append(m)
    n_groups = -(-len(batches) // group)
    total = n_groups * sum(ck.config.num_hidden_layers for ck, _ in models)
    with tqdm(total=total, desc="eval (layer-streamed)", unit="layer", disable=not progress) as bar:
        for g0 in range(0, len(batches), group):
            part = batches[g0 : g0 + group]
            hidden = [_scored_hidden(m, ck, q, part, sl, bar) for m, (ck, q) in zip(built, models, strict=True)]
            for j in range(len(part)):
                yield [m.head(hs[j]).cpu() for m, hs in zip(built, hidden, strict=True)]
                for hs in hidden:
                    hs[j] = None


def group_batches(cfg, dtype: torch.dtype, ctx: int, batch_size: int, budget: int = 1 << 30) -> int:
    """Batches per group so that one model's hidden states for a group take about ``budget`` bytes."""
    per_batch = batch_size * ctx * cfg.hidden_size * torch.finfo(dtype).bits // 8
    return max(1, budget // per_batch)


def model_bytes(ckpt: Checkpoint, dtype: torch.dtype) -> int:
    return ckpt.num_parameters() * torch.finfo(dtype).bits // 8


def _whole_model_streams(models, batches, sl, dtype, device) -> Iterator[list[torch.Tensor]]:
    built = [
        build_model(ck, dtype, device, linears_for=(lambda i, ck=ck: linears_from_checkpoint(ck, i)) if q else None)
        for ck, q in models
    ]
    return zip(*[_whole_model_logits(m, batches, sl) for m in built], strict=True)


@torch.no_grad()
def evaluate_many(
    ref: Checkpoint,
    chunks: torch.Tensor,
    quants: list[Checkpoint],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    stream: bool | None = None,
    batch_size: int = 1,
    progress: bool = True,
    group_bytes: int = 1 << 30,
) -> list[dict[str, Any]]:
    """Score ``ref`` and every model in ``quants`` on ``chunks`` [n, ctx] in one pass over the text (the
    reference runs once). Returns one result per quantized model (or the reference alone). Layer-streamed,
    chunks go through the layers in groups whose hidden states take about ``group_bytes`` per model."""
    n, ctx = chunks.shape
    sl = scored(ctx)
    targets = chunks[:, sl.start + 1 : sl.stop + 1]  # [n, S]
    if stream is None:
        stream = model_bytes(ref, dtype) * (1 + len(quants)) > 0.6 * available_memory(unknown=8 << 30)
    batches = _batches(chunks, batch_size)
    t0 = time.perf_counter()
    models = [(ref, False)] + [(q, True) for q in quants]
    if stream:
        group = group_batches(ref.config, dtype, ctx, batch_size, group_bytes)
        logits = _streamed_logits(models, batches, sl, dtype, device, group, progress)
    else:
        logits = _whole_model_streams(models, batches, sl, dtype, device)
    ref_stats, comparisons = NllStats(), [Comparison() for _ in quants]
    start = 0
    bar = tqdm(total=len(batches), desc="eval", unit="batch", disable=not progress or stream)
    for ref_logits, *q_logits in logits:
        ref_lp = _log_probs(ref_logits)
        tg = targets[start : start + len(ref_lp)]
        start += len(ref_lp)
        ref_stats.add(_nll(ref_lp, tg))
        for cmp, ql in zip(comparisons, q_logits, strict=True):
            cmp.add(ref_lp, ql, tg)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    r = ref_stats.summary()
    results = [c.summary(r) for c in comparisons] or [{"reference": r}]
    info = {
        "tokens_scored": ref_stats.count,
        "chunks": n,
        "ctx": ctx,
        "seconds": round(seconds, 3),
        "tokens_per_s": n * ctx * len(models) / seconds,  # forward-pass tokens, all models together
        "mode": "layer-streamed" if stream else "whole-model",
    }
    return [{**res, **info} for res in results]


def evaluate(ref: Checkpoint, chunks: torch.Tensor, quant: Checkpoint | None = None, **kwargs) -> dict[str, Any]:
    """PPL of ``ref`` (and of ``quant`` with Δppl, KL, top-1 agreement) on ``chunks`` [n, ctx]."""
    return evaluate_many(ref, chunks, [quant] if quant is not None else [], **kwargs)[0]
