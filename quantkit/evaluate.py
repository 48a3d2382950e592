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


@dataclass
class Comparison:
    ref: NllStats = field(default_factory=NllStats)
    quant: NllStats = field(default_factory=NllStats)
    kld: list[np.ndarray] = field(default_factory=list)
    same_top1: int = 0

    def add(self, ref_logits: torch.Tensor, q_logits: torch.Tensor | None, targets: torch.Tensor) -> None:
        """logits [B, S, V] at the scored positions, targets [B, S] (the next tokens)."""
        ref_lp = F.log_softmax(ref_logits.float(), dim=-1)
        self.ref.add(-ref_lp.gather(-1, targets[..., None]).squeeze(-1))
        if q_logits is None:
            return
        q_lp = F.log_softmax(q_logits.float(), dim=-1)
        self.quant.add(-q_lp.gather(-1, targets[..., None]).squeeze(-1))
        kl = (ref_lp.exp() * (ref_lp - q_lp)).sum(-1)  # [B, S]
        self.kld.append(kl.flatten().double().numpy())
        self.same_top1 += int((ref_lp.argmax(-1) == q_lp.argmax(-1)).sum())

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reference": self.ref.summary()}
        if not self.kld:
            return out
        kl = np.concatenate(self.kld)
        r, q = out["reference"], self.quant.summary()
        out.update(
            quantized=q,
            delta_ppl=q["ppl"] - r["ppl"],
            delta_ppl_pct=100.0 * (q["ppl"] / r["ppl"] - 1.0),
            kld_mean=float(kl.mean()),
            kld_p99=float(np.percentile(kl, 99)),
            kld_p999=float(np.percentile(kl, 99.9)),
            top1_agreement=self.same_top1 / kl.size,
        )
        return out


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


def _streamed_logits(
    ckpt: Checkpoint, quantized: bool, dtype, device, batches: list[torch.Tensor], sl: slice, bar
) -> Iterator[torch.Tensor]:
    """All batches through layer i before layer i+1, one layer's weights resident at a time; then the
    head, one batch at a time (only the scored positions' hidden states are kept after the last layer)."""
    model = build_model(ckpt, dtype, device, layers=False)
    hs = [model.embed(ids.to(model.device)) for ids in batches]
    for i in range(ckpt.config.num_hidden_layers):
        load_layer_from(model, ckpt, i, (lambda j: linears_from_checkpoint(ckpt, j)) if quantized else None)
        hs = [model.layers[i](h) for h in hs]
        model.unload_layer(i)
        bar.update(1)
    hs = [h[:, sl] for h in hs]
    return (model.head(h).cpu() for h in hs)


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


def should_stream(ref: Checkpoint, quant: Checkpoint | None, dtype: torch.dtype) -> bool:
    """Stream layers when both models at compute precision would not fit in ~60% of free memory."""
    need = model_bytes(ref, dtype) * (2 if quant is not None else 1)
    return need > 0.6 * available_memory()


@torch.no_grad()
def evaluate(
    ref: Checkpoint,
    chunks: torch.Tensor,
    quant: Checkpoint | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    stream: bool | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """PPL of ``ref`` (and of ``quant`` with Δppl, KL, top-1 agreement) on ``chunks`` [n, ctx]."""
    n, ctx = chunks.shape
    sl = scored(ctx)
    targets = chunks[:, sl.start + 1 : sl.stop + 1]  # [n, S]
    stream = should_stream(ref, quant, dtype) if stream is None else stream
    batches = _batches(chunks, batch_size)
    cmp = Comparison()
    t0 = time.perf_counter()
    if stream:
        total = ref.config.num_hidden_layers * (2 if quant is not None else 1)
        with tqdm(total=total, desc="eval (layer-streamed)", unit="layer", disable=not progress) as bar:
            ref_logits = _streamed_logits(ref, False, dtype, device, batches, sl, bar)
            q_logits = _streamed_logits(quant, True, dtype, device, batches, sl, bar) if quant else None
        for k, lr in enumerate(ref_logits):
            tg = targets[k * batch_size : k * batch_size + len(lr)]
            cmp.add(lr, None if q_logits is None else next(q_logits), tg)
    else:
        ref_model = build_model(ref, dtype, device)
        q_model = None
        if quant is not None:
            q_model = build_model(quant, dtype, device, linears_for=lambda i: linears_from_checkpoint(quant, i))
        ref_iter = _whole_model_logits(ref_model, batches, sl)
        q_iter = _whole_model_logits(q_model, batches, sl) if q_model is not None else None
        for k in tqdm(range(len(batches)), desc="eval", unit="batch", disable=not progress):
            tg = targets[k * batch_size : k * batch_size + len(batches[k])]
            cmp.add(next(ref_iter), None if q_iter is None else next(q_iter), tg)
    seconds = time.perf_counter() - t0
    out = cmp.summary()
    out.update(
        tokens_scored=cmp.ref.count,
        chunks=n,
        ctx=ctx,
        seconds=round(seconds, 3),
        tokens_per_s=n * ctx / seconds,
        mode="layer-streamed" if stream else "whole-model",
    )
    return out
