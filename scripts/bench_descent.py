"""Time the descent after GPTQ (quant.descent) against GPTQ's own pass, on one weight of a given shape.

    python scripts/bench_descent.py --shape 3584x14336 --type q4_k --sweeps 2

A random weight [O, I] and the Hessian of correlated random inputs (4·I samples); GPTQ onto the type's grid
(act-order, damp 0.1, H shrunk a quarter towards its diagonal: the GGUF defaults), then the descent in that
metric. Prints a table: seconds of the grid, GPTQ, the sweeps and the refit, and the error in GPTQ's metric
after each. Ratios are the numbers to read (a shared machine moves the seconds).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from gguf import GGMLQuantizationType as QT

from quantkit.formats.gguf.grids import choose_grid
from quantkit.quant.descent import coordinate_descent, refit_block_scales
from quantkit.quant.gptq import factor_hessian, gptq_quantize
from quantkit.quant.hessian import Hessian, shrink_offdiagonal
from quantkit.quant.primitives import QuantSpec


def _problem(o: int, i: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * i, i, generator=gen)
    x = (x + 0.5 * x.roll(1, 1)) * (0.2 + 3 * torch.rand(i, generator=gen))  # neighbours correlated
    return torch.randn(o, i, generator=gen) * 0.02, x.T @ x / x.shape[0]


def _err(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    d = W - Q
    return float(((d @ H) * d).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="3584x14336", help="O x I")
    ap.add_argument("--type", default="q4_k")
    ap.add_argument("--sweeps", type=int, default=2)
    ap.add_argument("--shrink", type=float, default=0.25)
    ap.add_argument("--damp", type=float, default=0.1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    o, i = map(int, a.shape.lower().split("x"))
    qtype = QT[a.type.upper()]
    W, H = _problem(o, i)
    t = {}
    t0 = time.perf_counter()
    grid = choose_grid(W, qtype, H.diagonal(), refine=0)
    t["grid_s"] = time.perf_counter() - t0
    Hm = H.clone()
    shrink_offdiagonal(Hm, a.shrink)
    hess = Hessian(i, "cpu")
    hess.H = Hm.clone()
    t0 = time.perf_counter()
    fac = factor_hessian(hess, a.damp, True)
    res = gptq_quantize(W, fac, QuantSpec(4, 32), grid=grid)
    t["gptq_s"] = time.perf_counter() - t0
    Hm.diagonal().add_(fac.lam)
    err = {"gptq": _err(W, res.weight.dequantize(), Hm)}
    t0 = time.perf_counter()
    gw, _ = coordinate_descent(W, res.weight, Hm, a.sweeps)
    t["descent_s"] = time.perf_counter() - t0
    err["descent"] = _err(W, gw.dequantize(), Hm)
    if not grid.layout.super_block:
        t0 = time.perf_counter()
        gw, _ = refit_block_scales(W, gw, Hm)
        t["refit_s"] = time.perf_counter() - t0
        err["refit"] = _err(W, gw.dequantize(), Hm)
    row = {"shape": f"{o}x{i}", "type": qtype.name, "sweeps": a.sweeps, "threads": torch.get_num_threads(),
           **{k: round(v, 2) for k, v in t.items()},
           "descent_over_gptq": round(t["descent_s"] / t["gptq_s"], 2),
           **{f"err_{k}_rel": round(v / err["gptq"], 4) for k, v in err.items()}}  # fmt: skip
    if a.json:
        print(json.dumps(row))
        return
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
