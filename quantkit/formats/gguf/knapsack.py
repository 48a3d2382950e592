"""The choice under a byte budget: one type per weight, minimising the summed predicted loss, a knapsack
solved by dynamic programming (what ``mix`` measures, this chooses)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from quantkit.errors import QuantkitError

BINS = 1 << 15  # budget units of the knapsack


@dataclass(frozen=True)
class Budget:
    """At most ``tensor_bytes`` for all tensors together; ``what`` names it in messages ('--target-bpw 3.5')."""

    tensor_bytes: int
    what: str


@dataclass(frozen=True)
class Choice:
    qtype: QT
    nbytes: int
    loss: float  # predicted relative output error, tr((W - Q) D (W - Q)ᵀ) / tr(W D Wᵀ)


def pareto(options: Iterable[Choice]) -> list[Choice]:
    """The choices no other beats on both bytes and loss, cheapest first."""
    out: list[Choice] = []
    for c in sorted(options, key=lambda c: (c.nbytes, c.loss)):
        if not out or c.loss < out[-1].loss:
            out.append(c)
    return out


def choose(options: Mapping[str, list[Choice]], budget: Budget, fixed_bytes: int) -> dict[str, Choice]:
    """One choice per weight, minimising the summed loss with ``fixed_bytes`` + their bytes <= the budget: a
    knapsack by dynamic programming over the free bytes in at most BINS units (each choice's bytes rounded up
    to whole units, so the budget holds; optimal for budgets under BINS bytes, within a unit per weight
    otherwise)."""
    names = list(options)
    opts = [pareto(options[n]) for n in names]
    free = budget.tensor_bytes - fixed_bytes
    least = sum(o[0].nbytes for o in opts)
    if least > free:
        raise QuantkitError(
            f"{budget.what}: the smallest mix takes {fixed_bytes + least} bytes of tensors, "
            f"over the {budget.tensor_bytes} allowed"
        )
    unit = max(1, math.ceil(free / BINS))
    cap = free // unit
    best = np.zeros(cap + 1)  # [cap + 1] least loss of the weights so far within b units
    picks = np.zeros((len(names), cap + 1), dtype=np.int16)  # the choice that gave it
    for i, o in enumerate(opts):
        new = np.full(cap + 1, np.inf)
        for k, c in enumerate(o):
            cost = math.ceil(c.nbytes / unit)
            if cost > cap:
                break
            cand = best[: cap + 1 - cost] + c.loss
            better = cand < new[cost:]
            new[cost:][better] = cand[better]
            picks[i, cost:][better] = k
        best = new
    if not np.isfinite(best[cap]):  # rounding up left no room: the cheapest choices fit in bytes, not in units
        return {n: o[0] for n, o in zip(names, opts, strict=True)}
    out, b = {}, cap
    for i in reversed(range(len(names))):
        c = opts[i][picks[i, b]]
        out[names[i]] = c
        b -= math.ceil(c.nbytes / unit)
    return out
