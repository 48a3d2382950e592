"""Running statistics of an evaluation: perplexity sums, KL divergence per position, top-1 agreement; kept per
dataset and merged over all of them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


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

    def merged(self, other: NllStats) -> NllStats:
        return NllStats(self.total + other.total, self.total_sq + other.total_sq, self.count + other.count)

    def summary(self) -> dict[str, float]:
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        ppl = math.exp(mean)
        se = ppl * math.sqrt(var / (self.count - 1)) if self.count > 1 else float("nan")
        return {"ppl": ppl, "ppl_se": se, "nll": mean}


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1)


def nll(lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -lp.gather(-1, targets[..., None]).squeeze(-1)


@dataclass
class Comparison:
    """One quantized model against the reference, on the same tokens."""

    quant: NllStats = field(default_factory=NllStats)
    kld: list[np.ndarray] = field(default_factory=list)
    same_top1: int = 0

    def add(self, ref_lp: torch.Tensor, q_logits: torch.Tensor, targets: torch.Tensor, floor: float) -> None:
        """ref_lp: reference log-probs [B, S, V]; q_logits [B, S, V]; targets [B, S] (the next tokens). KL terms
        whose reference log-prob is ``floor`` or lower are left out (llama.cpp's rule for a stored reference)."""
        q_lp = log_probs(q_logits)
        self.quant.add(nll(q_lp, targets))
        terms = ref_lp.exp() * (ref_lp - q_lp)
        kl = (terms if floor == -math.inf else torch.where(ref_lp > floor, terms, 0.0)).sum(-1)  # [B, S]
        self.kld.append(kl.flatten().double().numpy())
        self.same_top1 += int((ref_lp.argmax(-1) == q_lp.argmax(-1)).sum())

    def merged(self, other: Comparison) -> Comparison:
        return Comparison(self.quant.merged(other.quant), self.kld + other.kld, self.same_top1 + other.same_top1)

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


@dataclass
class Tally:
    """The reference's statistics and every quantized model's comparison, on one dataset's chunks."""

    ref: NllStats
    comparisons: list[Comparison]

    @classmethod
    def empty(cls, n_models: int) -> Tally:
        return cls(NllStats(), [Comparison() for _ in range(n_models)])

    def add(self, ref_lp: torch.Tensor, q_logits: list[torch.Tensor], targets: torch.Tensor, floor: float) -> None:
        self.ref.add(nll(ref_lp, targets))
        for cmp, ql in zip(self.comparisons, q_logits, strict=True):
            cmp.add(ref_lp, ql, targets, floor)

    def merged(self, other: Tally) -> Tally:
        cmps = [a.merged(b) for a, b in zip(self.comparisons, other.comparisons, strict=True)]
        return Tally(self.ref.merged(other.ref), cmps)

    def summaries(self) -> list[dict[str, Any]]:
        """One result per quantized model (or the reference alone)."""
        r = self.ref.summary()
        return [c.summary(r) for c in self.comparisons] or [{"reference": r}]
