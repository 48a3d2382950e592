"""Importance-weighted scale (clipping) search on quantkit's per-group grid.

Min-max scales waste grid levels on a group's few extreme weights. Here each row's group range is shrunk by
factors p = 1, ..., ``min_shrink`` and the candidate with the smallest weighted rounding error is kept:

    unit   : Σ_j (w_j − q_j)²                      (no calibration statistics)
    diag   : Σ_j H_jj (w_j − q_j)²                 (the importance llama.cpp's imatrix collects)
    block  : (w − q)ᵀ H_gg (w − q)                 (the group's block of the input Hessian)

The grid itself is unchanged (same bits, group size, one scale per group, zero point 0 when symmetric), and
p = 1 is exactly ``choose_qparams``' min-max result, kept unless another candidate is strictly better, so the
search never raises its own objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.primitives import (
    QuantizedWeight,
    QuantSpec,
    choose_qparams,
    group_range,
    qparams_from_range,
    quantize,
)

OBJECTIVES = ("minmax", "unit", "diag", "block")


@dataclass(frozen=True)
class ScaleSearch:
    """How group parameters are chosen: ``objective`` "minmax" (no search) or one of the weighted errors."""

    objective: str = "minmax"
    steps: int = 50  # candidates p = 1 - k (1 - min_shrink) / (steps - 1), k = 0 .. steps-1
    min_shrink: float = 0.5

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise QuantkitError(f"scale_search {self.objective!r}: choose from {', '.join(OBJECTIVES)}")
        if self.steps < 1 or not 0.0 < self.min_shrink <= 1.0:
            raise QuantkitError("scale_search: steps must be >= 1 and min_shrink in (0, 1]")

    @property
    def enabled(self) -> bool:
        return self.objective != "minmax"

    def importance(self, H: torch.Tensor | None, cols: slice, g: int) -> torch.Tensor | None:
        """What ``search_qparams`` weighs the errors of columns ``cols`` with, from H [I, I] (None: unit)."""
        if H is None or self.objective == "unit":
            return None
        h = H[cols, cols]
        if self.objective == "diag":
            return torch.diag(h)  # [n]
        n = h.shape[0]
        return h.reshape(n // g, g, n // g, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, g, g]


def _weighted_error(d: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """d [O, G, g] errors, h None | [G*g] diag | [G, g, g] blocks -> [O, G] weighted squared error."""
    if h is None:
        return (d * d).sum(-1)
    if h.dim() == 1:
        return (d * d * h.reshape(1, d.shape[1], -1)).sum(-1)
    dg = d.transpose(0, 1)  # [G, O, g]
    return (torch.bmm(dg, h) * dg).sum(-1).T


def _rounding_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """w − dequantize(quantize(w)) on the given grid, as [O, G, g] (the same fp32 operations, broadcast)."""
    wg = w.float().reshape(w.shape[0], scale.shape[1], -1)  # [O, G, g]
    s = scale.float()[..., None]
    z = 0.0 if zero is None else zero.float()[..., None]
    c = torch.round(wg / s + z).clamp(spec.qmin, spec.qmax)
    return wg - (c - z) * s


SEARCH_ELEMENTS = 1 << 22  # weights searched per pass: bounds the [rows, G, g] fp32 temporaries to ~16 MB each


def search_qparams(
    w: torch.Tensor,
    spec: QuantSpec,
    scale_dtype: torch.dtype = torch.float32,
    search: ScaleSearch = ScaleSearch("unit"),
    h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row and group, the shrink of the min-max range with the least weighted error.

    w [O, I]; h None (unit weights), [I] (diag importance) or [G, g, g] (Hessian blocks) -> scale [O, G],
    zero [O, G] int8 | None, in the same form as ``choose_qparams``. Rows are independent, so they are
    searched a slice at a time."""
    o, i = w.shape
    h = None if h is None else h.to(w.device, torch.float32)
    rows = max(1, SEARCH_ELEMENTS // i)
    parts = [_search_rows(w[r : r + rows].float(), spec, scale_dtype, search, h) for r in range(0, o, rows)]
    scale = torch.cat([sc for sc, _ in parts])
    return scale, None if spec.sym else torch.cat([z for _, z in parts])


def _search_rows(
    w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype, search: ScaleSearch, h: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``search_qparams`` of the fp32 rows w [R, I]. Every candidate's errors are formed in the same two
    scratch buffers (a fresh 16 MB tensor per operation costs its page faults again), with the operations
    and their order of ``_rounding_error`` and ``_weighted_error`` (a test checks the results are equal)."""
    lo, hi = group_range(w, spec)  # [R, G]
    wg = w.reshape(w.shape[0], lo.shape[1], -1)  # [R, G, g]
    e = torch.empty_like(wg)  # the rounding errors
    t = (
        torch.empty_like(wg.transpose(0, 1), memory_format=torch.contiguous_format)
        if h is not None and h.dim() == 3
        else None
    )  # [G, R, g]

    def error(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:  # [R, G]
        s, z = scale.float()[..., None], 0.0 if zero is None else zero.float()[..., None]
        torch.div(wg, s, out=e).add_(z)
        e.round_().clamp_(spec.qmin, spec.qmax).sub_(z)
        torch.sub(wg, e.mul_(s), out=e)  # w - (c - z) s
        if h is None:
            return e.mul_(e).sum(-1)
        if h.dim() == 1:
            return e.mul_(e).mul_(h.reshape(1, e.shape[1], -1)).sum(-1)
        eg = e.transpose(0, 1)  # [G, R, g]
        return torch.bmm(eg, h, out=t).mul_(eg).sum(-1).T

    best_scale, best_zero = qparams_from_range(lo, hi, spec, scale_dtype)
    best = error(best_scale, best_zero)
    for k in range(1, search.steps):
        p = 1.0 - k * (1.0 - search.min_shrink) / (search.steps - 1)
        scale, zero = qparams_from_range(lo * p, hi * p, spec, scale_dtype)
        err = error(scale, zero)
        better = err < best  # [R, G]; strict, so ties keep the larger range
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def choose_group_params(
    w: torch.Tensor,
    spec: QuantSpec,
    scale_dtype: torch.dtype,
    search: ScaleSearch | None,
    h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max parameters, or the searched ones when ``search`` is enabled."""
    if search is None or not search.enabled:
        return choose_qparams(w, spec, scale_dtype)
    return search_qparams(w, spec, scale_dtype, search, h)


def rtn_searched(
    w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype, search: ScaleSearch, h: torch.Tensor | None = None
) -> QuantizedWeight:
    """Round-to-nearest on the searched grid (unit weights unless an importance ``h`` is given)."""
    scale, zero = choose_group_params(w, spec, scale_dtype, search, h)
    return QuantizedWeight(quantize(w, scale, zero, spec), scale, zero, spec)
