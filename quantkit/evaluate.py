"""Perplexity (llama-perplexity's method), KL divergence and top-1 agreement of a quantized model against
its reference, on the same tokens.

Each chunk of ``ctx`` tokens starts with BOS; positions ctx/2 .. ctx-2 are scored (formats.md §7). Log-
softmax and KL are computed in fp32 from the final (soft-capped) logits; statistics accumulate in fp64.
Two execution modes give the same numbers: whole-model (both models resident) and layer-streamed (all
chunks through layer i, then layer i+1, holding one layer's weights plus the hidden states).
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

from .checkpoint import Checkpoint
from .model import Gemma, build_model, load_layer_from
from .packed import linears_from_checkpoint

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
        h = model.embed(ids.to(model.device))
        for layer in model.layers:
            h = layer(h)
        yield model.head(h[:, sl]).cpu()


GLOBALS = ("model.embed_tokens.weight", "model.norm.weight")


def _same_globals(a: Checkpoint, b: Checkpoint) -> bool:
    """Whether two checkpoints hold identical embedding and final norm (quantize copies them verbatim)."""
    return all(a.shape_of(n) == b.shape_of(n) and torch.equal(a.get(n), b.get(n)) for n in GLOBALS)


def _streamed_logits(
    ckpt: Checkpoint, quantized: bool, dtype, device, batches: list[torch.Tensor], sl: slice, bar, shared=None
) -> Iterator[torch.Tensor]:
    """All batches through layer i before layer i+1, one layer's weights resident at a time; then the
    head, one batch at a time (only the scored positions' hidden states are kept after the last layer).
    ``shared``: a model whose (identical) embedding and final norm are reused instead of loaded again."""
    if shared is not None:
        model = Gemma(ckpt.config, dtype, device)
        model.embed_tokens, model.norm = shared.embed_tokens, shared.norm
    else:
        model = build_model(ckpt, dtype, device, layers=False)
    hs = [model.embed(ids.to(model.device)) for ids in batches]
    for i in range(ckpt.config.num_hidden_layers):
        load_layer_from(model, ckpt, i, (lambda j: linears_from_checkpoint(ckpt, j)) if quantized else None)
        hs = [model.layers[i](h) for h in hs]
        model.unload_layer(i)
        bar.update(1)
    hs = [h[:, sl] for h in hs]
    return model, (model.head(h).cpu() for h in hs)


def model_bytes(ckpt: Checkpoint, dtype: torch.dtype) -> int:
    return ckpt.num_parameters() * torch.finfo(dtype).bits // 8


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _logit_streams(models, batches, sl, stream, dtype, device, progress) -> list[Iterator[torch.Tensor]]:
    """One iterator of scored-position logits per (checkpoint, quantized) pair, batch by batch."""
    if stream:
        total = sum(ck.config.num_hidden_layers for ck, _ in models)
        streams, ref_model = [], None
        with tqdm(total=total, desc="eval (layer-streamed)", unit="layer", disable=not progress) as bar:
            for ck, q in models:
                shared = ref_model if ref_model is not None and _same_globals(models[0][0], ck) else None
                model, logits = _streamed_logits(ck, q, dtype, device, batches, sl, bar, shared)
                ref_model = ref_model or model
                streams.append(logits)
        return streams
    built = [
        build_model(ck, dtype, device, linears_for=(lambda i, ck=ck: linears_from_checkpoint(ck, i)) if q else None)
        for ck, q in models
    ]
    return [_whole_model_logits(m, batches, sl) for m in built]


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
) -> list[dict[str, Any]]:
    """Score ``ref`` and every model in ``quants`` on ``chunks`` [n, ctx] in one pass over the text (the
    reference runs once). Returns one result per quantized model (or the reference alone)."""
    n, ctx = chunks.shape
    sl = scored(ctx)
    targets = chunks[:, sl.start + 1 : sl.stop + 1]  # [n, S]
    if stream is None:
        stream = model_bytes(ref, dtype) * (1 + len(quants)) > 0.6 * available_memory()
    batches = _batches(chunks, batch_size)
    t0 = time.perf_counter()
    models = [(ref, False)] + [(q, True) for q in quants]
    streams = _logit_streams(models, batches, sl, stream, dtype, device, progress)
    ref_stats, comparisons = NllStats(), [Comparison() for _ in quants]
    start = 0
    for _ in tqdm(range(len(batches)), desc="eval", unit="batch", disable=not progress or stream):
        ref_lp = _log_probs(next(streams[0]))
        tg = targets[start : start + len(ref_lp)]
        start += len(ref_lp)
        ref_stats.add(_nll(ref_lp, tg))
        for cmp, qs in zip(comparisons, streams[1:], strict=True):
            cmp.add(ref_lp, next(qs), tg)
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
