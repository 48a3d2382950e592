"""The K-quants with signed sub-block scales in numpy, byte for byte ggml's `quantize_row_q{3,6}_K_ref`
(what llama-quantize runs without an importance matrix): 16-element sub-blocks searched by
`make_qx_quants` (Q6_K) or `make_q3_quants` (Q3_K), their scales quantized against the signed largest one.
The float32 C-order arithmetic is `quantkit.formats.gguf.ggml_float`'s.
"""

from __future__ import annotations

import numpy as np

from quantkit.formats.gguf.ggml_float import F32, GROUP_MAX_EPS, Scratch, columns, dot, nearest_int, signed_absmax
from quantkit.formats.gguf.layouts import pack_q3_k, pack_q6_k
from quantkit.formats.gguf.weighted_search import make_qx

# ---------------------------------------------------------------------------------------------- Q6_K


def quantize_q6_k(x: np.ndarray, ws: Scratch | None = None, qw: np.ndarray | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 210] Q6_K blocks: 16-element sub-blocks searched by
    make_qx_quants(nmax=32) with weights x^2, or the importance ``qw`` [B, 256] where llama-quantize has one."""
    ws = ws or Scratch()
    B = x.shape[0]
    xs = columns(x, 16, ws)  # [16, 16B]
    w = np.multiply(xs, xs, out=ws.get("w", xs.shape)) if qw is None else columns(qw, 16, ws, "qw")
    scale, best_is, zero_sub = make_qx(xs, w, 32, ws)
    scale = scale.reshape(B, 16)

    big = signed_absmax(scale, 1)  # [B]
    zero = np.abs(big) < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(zero, F32(1), big)
    d16 = (F32(1) / iscale).astype(np.float16)
    sc = nearest_int(iscale[:, None] * scale, -128, 127).astype(np.int8)  # [B, 16]; C: MIN(127, .)

    d = (d16.astype(F32)[:, None] * sc.astype(F32))[:, :, None]  # [B, 16, 1]
    q = ws.get("q", (B, 16, 16))
    with np.errstate(divide="ignore", invalid="ignore"):
        nearest_int(np.divide(x.reshape(B, 16, 16), d, out=q), -32, 31, out=q)
    # sub-blocks with d = 0 keep the search's codes (C skips them)
    keep = np.flatnonzero(d.reshape(-1) == 0)
    if keep.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            L = nearest_int(best_is[keep] * xs[:, keep], -32, 31)
        q.reshape(-1, 16)[keep] = np.where(zero_sub[keep], F32(-32), L).T
    out = pack_q6_k(d16, sc, q.reshape(x.shape))
    out[zero] = 0  # C zeroes a super-block whose sub-block scales are all ~0
    return out


# ---------------------------------------------------------------------------------------------- Q3_K


def _q3_pass(
    x: np.ndarray, w: np.ndarray, wx: np.ndarray, L: np.ndarray, sumlx: np.ndarray, suml2: np.ndarray
) -> np.ndarray:
    """One pass of make_q3_quants over the columns given ([16, S] each, sums [S]), updated in place: each
    element in order moves to its best code for the others' fit when the weighted fit improves. -> whether
    each column changed, bool [S]."""
    changed = np.zeros(x.shape[1], dtype=bool)
    for i in range(16):
        slx = sumlx - wx[i] * L[i]
        sl2 = suml2 - (w[i] * L[i]) * L[i]
        new = nearest_int((x[i] * sl2) / slx, -4, 3)
        slx_new = slx + wx[i] * new
        sl2_new = sl2 + (w[i] * new) * new
        take = (slx > 0) & (new != L[i]) & (sl2_new > 0)
        take &= (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new
        changed |= take
        np.copyto(L[i], new, where=take)
        np.copyto(sumlx, slx_new, where=take)
        np.copyto(suml2, sl2_new, where=take)
    return changed


def _q3(x: np.ndarray, ws: Scratch) -> tuple[np.ndarray, np.ndarray]:
    """ggml make_q3_quants(nmax=4, do_rmse=true): weights x^2; codes from the signed largest value, then up
    to 5 passes that move one code at a time (in element order) while the weighted fit improves.

    x: [16, S] -> scale [S] (value = scale*c) and codes c float32 [16, S] in -4..3 (stored 0, c = -4, for
    all-zero columns). As in C, a column leaves the loop after a pass that changed none of its codes (a
    pass that changes nothing would change nothing again), so each later pass runs on the columns the
    previous one changed: on Gaussian weights about a fifth, then a twentieth.
    """
    m = signed_absmax(x, 0)
    zero = np.abs(m) < GROUP_MAX_EPS
    m = np.where(zero, F32(1), m)
    w = np.multiply(x, x, out=ws.get("w", x.shape))
    wx = np.multiply(w, x, out=ws.get("wx", x.shape))  # C's w*x[i]*l multiplies left to right
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L = nearest_int((F32(-4) / m) * x, -4, 3)  # [16, S]
        sumlx, suml2 = dot(wx, L), dot(w, L, L)
        active = np.flatnonzero(_q3_pass(x, w, wx, L, sumlx, suml2))
        for _ in range(4):
            if not active.size:
                break
            xa, wa, wxa, La = (a[:, active] for a in (x, w, wx, L))  # copies, written back below
            slx, sl2 = sumlx[active], suml2[active]
            changed = _q3_pass(xa, wa, wxa, La, slx, sl2)
            L[:, active], sumlx[active], suml2[active] = La, slx, sl2
            active = active[changed]
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, F32(-4), L)


def quantize_q3_k(x: np.ndarray, ws: Scratch | None = None) -> np.ndarray:
    """float32 [B, 256] super-blocks -> uint8 [B, 110] Q3_K blocks: 16-element sub-blocks searched by
    make_q3_quants, their scales quantized to -32..31 against the signed largest one, codes re-quantized."""
    ws = ws or Scratch()
    B = x.shape[0]
    xs = columns(x, 16, ws)  # [16, 16B]
    scale, L = _q3(xs, ws)
    scale = scale.reshape(B, 16)
    big = signed_absmax(scale, 1)  # [B]
    some = big != 0  # C: if (max_scale); otherwise every stored scale byte is 0 (sc = -32) and d = 0
    iscale = F32(-32) / np.where(some, big, F32(1))
    sc = np.where(some[:, None], nearest_int(iscale[:, None] * scale, -32, 31), F32(-32))  # [B, 16]
    d16 = np.where(some, F32(1) / iscale, F32(0)).astype(np.float16)

    d = (d16.astype(F32)[:, None] * sc)[:, :, None]  # [B, 16, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = nearest_int(x.reshape(B, 16, 16) / d, -4, 3)
    keep = np.flatnonzero(d.reshape(-1) == 0)  # C skips these sub-blocks: the search's codes stay
    q.reshape(-1, 16)[keep] = L[:, keep].T
    return pack_q3_k(d16, sc.astype(np.int8), q.reshape(x.shape))
