"""This CPU's matmul rate (GFLOP/s) on Gemma 2 9B's linear shapes, fp32 against the bf16 options.

    python scripts/bench_matmul.py [--tokens 512] [--threads 2] [--repeat 3] [--json]

Rows: y = x · Wᵀ for q_proj (3584 -> 4096), gate/up (3584 -> 14336) and down_proj (14336 -> 3584) in
  fp32 F.linear, bf16 F.linear / torch.matmul (oneDNN or MKL: fp32 accumulation, bf16 output), and
  torch.mm(..., out_dtype=float32) on bf16 inputs where this torch has it;
and the Hessian H = XᵀX [I, I] of X [tokens, I] for I = 3584 and 14336: fp32 mm, fp32 syrk-shaped addmm
(the symmetric product), bf16 mm with a bf16 output (precision lost in the output rounding), bf16 inputs with
fp32 output via out_dtype, and bf16 mm in row chunks accumulated into fp32. Each row also gives the max
relative error to the fp64 product of the same (bf16-rounded where the inputs are bf16) operands.
The CPU's capability (torch.backends.cpu.get_cpu_capability) and oneDNN's bf16 support are printed first.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

LINEARS = {"q_proj": (4096, 3584), "gate_proj": (14336, 3584), "down_proj": (3584, 14336)}
HESSIANS = {"H(3584)": 3584, "H(14336)": 14336}


def _time(fn: Callable[[], torch.Tensor], repeat: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up (oneDNN primitive creation, weight reorders)
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - t0) / repeat, out


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def _mm_out_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return None


def linear_rows(tokens: int, repeat: int) -> list[dict]:
    rows = []
    for name, (o, i) in LINEARS.items():
        x, w = torch.randn(tokens, i), torch.randn(o, i) * 0.02
        xb, wb, xn, wn = x.bfloat16(), w.bfloat16(), x.numpy(), w.numpy()
        ref = xb.double() @ wb.double().T
        flops = 2 * tokens * o * i
        kernels: dict[str, Callable[[], torch.Tensor]] = {
            "fp32 F.linear": lambda x=x, w=w: F.linear(x, w),
            "bf16 F.linear": lambda xb=xb, wb=wb: F.linear(xb, wb),
            "bf16 matmul": lambda xb=xb, wb=wb: torch.matmul(xb, wb.T),
            "fp32 numpy (OpenBLAS)": lambda xn=xn, wn=wn: torch.from_numpy(xn @ wn.T),
        }
        if _mm_out_fp32(xb[:8], wb[:8].T) is not None:
            kernels["bf16 mm out_dtype=fp32"] = lambda xb=xb, wb=wb: torch.mm(xb, wb.T, out_dtype=torch.float32)
        for kname, fn in kernels.items():
            s, out = _time(fn, repeat)
            rows.append({"op": f"{name} {tokens}x{i}@{i}x{o}", "kernel": kname, "seconds": s,
                         "gflops": flops / s / 1e9, "max_rel_err": _rel(out, ref)})  # fmt: skip
    return rows


def _chunked_bf16(xb: torch.Tensor, chunk: int) -> torch.Tensor:
    """Σ over row chunks of (X_cᵀ X_c in bf16 -> bf16 output), accumulated into fp32."""
    n = xb.shape[1]
    H = torch.zeros(n, n)
    for r in range(0, xb.shape[0], chunk):
        c = xb[r : r + chunk]
        H += (c.T @ c).float()
    return H


def _upper_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """XᵀX from its upper block triangle only (column block j: rows 0..j of the product), mirrored."""
    n = x.shape[1]
    H = torch.empty(n, n)
    for c in range(0, n, block):
        e = min(c + block, n)
        H[:e, c:e] = x[:, :e].T @ x[:, c:e]
    return H.triu().add_(H.triu(1).T)


def hessian_rows(tokens: int, repeat: int) -> list[dict]:
    rows = []
    for name, i in HESSIANS.items():
        x = torch.randn(tokens, i)
        xb, xn = x.bfloat16(), x.numpy()
        ref32, refb = x.double().T @ x.double(), xb.double().T @ xb.double()
        flops = 2 * tokens * i * i
        H = torch.zeros(i, i)
        kernels: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor]] = {
            "fp32 mm XᵀX": (lambda x=x: x.T @ x, ref32),
            "fp32 addmm_ (in place)": (lambda x=x, H=H: H.addmm_(x.T, x, beta=0.0), ref32),
            "fp32 upper blocks of 1024 (torch)": (lambda x=x: _upper_blocks(x, 1024), ref32),
            "fp32 numpy XᵀX (OpenBLAS syrk)": (lambda xn=xn: torch.from_numpy(xn.T @ xn), ref32),
            "bf16 mm (bf16 output)": (lambda xb=xb: xb.T @ xb, refb),
            "bf16 chunks of 64 rows -> fp32": (lambda xb=xb: _chunked_bf16(xb, 64), refb),
        }
        if _mm_out_fp32(xb[:8].T, xb[:8]) is not None:
            kernels["bf16 mm out_dtype=fp32"] = (lambda xb=xb: torch.mm(xb.T, xb, out_dtype=torch.float32), refb)
        for kname, (fn, ref) in kernels.items():
            s, out = _time(fn, repeat)
            rows.append({"op": f"{name} {i}x{tokens}@{tokens}x{i}", "kernel": kname, "seconds": s,
                         "gflops": flops / s / 1e9, "max_rel_err": _rel(out, ref)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    info = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    rows = linear_rows(a.tokens, a.repeat) + hessian_rows(a.tokens, a.repeat)
    if a.json:
        print(json.dumps({**info, "rows": rows}, indent=1))
        return
    print(", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"{'op':34} {'kernel':32} {'s':>8} {'GFLOP/s':>8} {'max rel err':>11}")
    for r in rows:
        print(f"{r['op']:34} {r['kernel']:32} {r['seconds']:8.3f} {r['gflops']:8.1f} {r['max_rel_err']:11.2e}")


if __name__ == "__main__":
    main()
