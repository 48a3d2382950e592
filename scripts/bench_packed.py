"""Speed of the dequantizing linear against dense F.linear and torch's weight-only CPU kernels.

    python scripts/bench_packed.py [--tokens 512] [--shapes 9b|270m] [--repeat 5] [--json]

Prints one row per (shape, kernel): ms per call, ratio to dense fp32 F.linear measured in the same run,
max |Δ| to F.linear on the dequantized weight (0 = bit-exact), and peak RSS. torch's
_weight_int8pack_mm (per-channel int8 only) and _weight_int4pack_mm_for_cpu (bf16 activations only) are
measured where they apply; quantkit uses them only if they are both exact and faster. "held": the int4 asym
PackedLinear inside ``holding_weights`` (calibration passes, layer-streamed eval): dequantized once, the
per-call cost of every batch after the first.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

from quantkit.formats.packed.linear import PackedLinear, holding_weights
from quantkit.quant.primitives import QuantSpec, rtn

SHAPES = {
    "9b": {"q_proj": (4096, 3584), "down_proj": (3584, 14336)},
    "270m": {"q_proj": (1024, 640), "down_proj": (640, 2048)},
}


def _time(fn, repeat: int) -> tuple[float, torch.Tensor]:
    out = fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - t0) / repeat * 1e3, out


def bench(shape: tuple[int, int], tokens: int, repeat: int) -> list[dict]:
    o, i = shape
    w = torch.randn(o, i) * 0.02
    x = torch.randn(tokens, i)
    rows = []
    ms_dense, _ = _time(lambda: F.linear(x, w), repeat)
    rows.append({"kernel": "dense fp32 F.linear", "ms": ms_dense, "max_abs_diff": 0.0})
    for spec in (QuantSpec(8, 128, True), QuantSpec(4, 128, True), QuantSpec(4, 128, False)):
        qw = rtn(w, spec, torch.bfloat16)
        layer = PackedLinear(qw)
        ms, y = _time(lambda layer=layer: layer(x), repeat)
        ref = F.linear(x, qw.dequantize())
        name = f"PackedLinear int{spec.bits} g128 {'sym' if spec.sym else 'asym'}"
        rows.append({"kernel": name, "ms": ms, "max_abs_diff": float((y - ref).abs().max())})
    with holding_weights([layer]):  # the last spec (int4 asym): dequantized at the first call only
        ms, y = _time(lambda layer=layer: layer(x), repeat)
    rows.append({"kernel": f"{name}, held", "ms": ms, "max_abs_diff": float((y - ref).abs().max())})
    qw = rtn(w, QuantSpec(8, -1, True), torch.float32)  # per-channel: what _weight_int8pack_mm supports
    scales = qw.scale[:, 0].contiguous()
    ms, y = _time(lambda: torch._weight_int8pack_mm(x, qw.codes, scales), repeat)
    ref = F.linear(x, qw.dequantize())
    rows.append(
        {"kernel": "torch _weight_int8pack_mm (per-channel)", "ms": ms, "max_abs_diff": float((y - ref).abs().max())}
    )
    layer = PackedLinear(qw)
    ms, y = _time(lambda: layer(x), repeat)
    rows.append({"kernel": "PackedLinear int8 per-channel", "ms": ms, "max_abs_diff": float((y - ref).abs().max())})
    for r in rows:
        r.update(shape=f"{o}x{i}", tokens=tokens, ratio_to_dense=r["ms"] / ms_dense)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="270m")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for shape in SHAPES[args.shapes].values():
        rows += bench(shape, args.tokens, args.repeat)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.json:
        print(json.dumps({"rows": rows, "peak_rss_gib": peak, "threads": torch.get_num_threads()}, indent=2))
        return 0
    print(f"{args.tokens} tokens, {torch.get_num_threads()} threads, peak RSS {peak:.2f} GiB")
    print("| shape | kernel | ms/call | x dense | max abs diff |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['kernel']} | {r['ms']:.2f} | {r['ratio_to_dense']:.2f} | {r['max_abs_diff']:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
