"""ggml's weighted scale searches in numpy, bit for bit: ``make_qx_quants`` (signed codes), ``make_qkx3_quants``
(codes with a min) and ``make_qp_quants`` (positive sub-block scales), as ggml-quants.c runs them when
llama-quantize is given an importance matrix (and, for make_qx_quants, without one: weights x^2).

Arrays are [n, S]: a group's n elements on axis 0, S groups side by side, every sum a C-order float32 loop
over axis 0 (``quantkit.formats.gguf.ggml_float``). C stores some codes in uint8_t arrays; where a negative
code can reach one (make_qp_quants of a negative scale), ``wrap_u8`` keeps C's value.
"""

from __future__ import annotations

import numpy as np

from quantkit.formats.gguf.ggml_float import F32, GROUP_MAX_EPS, Scratch, csum, dot, nearest_int, signed_absmax


def wrap_u8(v: np.ndarray) -> np.ndarray:
    """An int code (float32) as C's uint8_t holds it: v mod 256."""
    return np.mod(v, F32(256))


def make_qx(x: np.ndarray, w: np.ndarray, nmax: int, ws: Scratch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, w): 19 trial scales -(nmax + 0.1 t) / max, t in -9..9.

    x, w: [n, S] -> signed scale [S] (value = scale * c), the best trial's inverse scale [S] (the codes are
    c = clamp(nearest(iscale * x), -nmax, nmax - 1), recomputed by ``qx_codes``) and the all-zero columns
    (scale 0, stored codes 0, i.e. c = -nmax).
    """
    x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)  # dot sums in C order only over C-contiguous rows
    m = signed_absmax(x, 0)
    zero = np.abs(m) < GROUP_MAX_EPS
    m = np.where(zero, F32(1), m)
    wx = np.multiply(w, x, out=ws.get("wx", x.shape))  # the first product of C's left-to-right w*x*l
    l = ws.get("l", x.shape)  # noqa: E741  [n, S]

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # sum w*x*l, sum w*l*l
        nearest_int(np.multiply(iscale, x, out=l), -nmax, nmax - 1, out=l)
        return dot(wx, l), dot(w, l, l)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        best_is = F32(-nmax) / m
        sumlx, suml2 = sums(best_is)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for t in (*range(-9, 0), *range(1, 10)):
            iscale = -(F32(nmax) + F32(0.1) * F32(t)) / m
            sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            np.copyto(best_is, iscale, where=better)
            np.copyto(scale, sumlx / suml2, where=better)
            np.copyto(best, scale * sumlx, where=better)
    return np.where(zero, F32(0), scale), best_is, zero


def qx_codes(x: np.ndarray, best_is: np.ndarray, zero: np.ndarray, nmax: int) -> np.ndarray:
    """make_qx's codes c [n, S] in -nmax..nmax-1 (-nmax in all-zero columns)."""
    with np.errstate(invalid="ignore", over="ignore"):
        c = nearest_int(best_is * x, -nmax, nmax - 1)
    return np.where(zero, F32(-nmax), c)


def make_qkx3(x: np.ndarray, w: np.ndarray, nmax: int, ws: Scratch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx3_quants(n, nmax, x, w, L, &the_min, Laux, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=false).

    x, w: [n, S] -> scale [S], the_min [S] (value = scale * L - the_min) and codes L float32 [n, S] in
    0..nmax. Weighted least squares of x ~ a * L + b over 37 trial inverse scales; later trials measure from
    the best min found so far, as in C.
    """
    x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)  # dot sums in C order only over C-contiguous rows
    lo = np.minimum(x.min(axis=0), 0)  # [S]
    hi = x.max(axis=0)
    flat = hi <= lo  # C: all codes 0, scale 0, the_min = -min
    flat_min = lo.copy()
    lo = np.where(flat, hi - 1, lo)  # keeps hi - lo non-zero; flat results are overwritten at the end
    sum_w, sum_x = csum(w), dot(w, x)
    la, tmp = ws.get("la", x.shape), ws.get("tmp", x.shape)

    def codes(iscale: np.ndarray, lo: np.ndarray) -> np.ndarray:
        return nearest_int(np.multiply(iscale, np.subtract(x, lo, out=la), out=la), 0, nmax, out=la)

    def error(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # sum w * (a*L + b - x)^2
        diff = np.subtract(np.add(np.multiply(a, la, out=tmp), b, out=tmp), x, out=tmp)
        return dot(w, np.multiply(diff, diff, out=tmp))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (hi - lo)
        scale = F32(1) / iscale
        codes(iscale, lo)
        best = error(scale, lo)
        best_is, best_lo = iscale, lo.copy()
        for step in range(37):
            iscale = (F32(-0.9) + F32(0.05) * F32(step) + F32(nmax)) / (hi - lo)
            codes(iscale, lo)
            sum_l, sum_l2, sum_xl = dot(w, la), dot(w, la, la), dot(w, la, x)  # C: w*l, w*l*l, w*l*x
            D = sum_w * sum_l2 - sum_l * sum_l
            a = (sum_w * sum_xl - sum_x * sum_l) / D
            b = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = b > 0  # the min may not be positive: refit the scale with b = 0
            a = np.where(clamp, sum_xl / sum_l2, a)
            b = np.where(clamp, F32(0), b)
            err = error(a, b)
            better = (D > 0) & (err < best)
            np.copyto(best_is, iscale, where=better)
            np.copyto(best_lo, lo, where=better)
            np.copyto(best, err, where=better)
            np.copyto(scale, a, where=better)
            np.copyto(lo, b, where=better)
        L = nearest_int(best_is * (x - best_lo), 0, nmax)
    L[:, flat] = 0
    return np.where(flat, F32(0), scale), -np.where(flat, flat_min, lo), L


def make_qp(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(n, nmax, x, L, w): the sub-block scales x [n, S] (>= 0 but for odd data) against their
    largest -> super-scale [S] and codes L [n, S] (C's uint8 values, <= nmax): 9 trial scales, then up to 5
    passes that move one code at a time (in element order) while the weighted fit improves."""
    x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)  # dot sums in C order only over C-contiguous rows
    mx = np.maximum(x.max(axis=0), 0)
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / mx
        scale = F32(1) / iscale
        L = wrap_u8(nearest_int(iscale * x, None, None))
        d = x - scale * L
        best = dot(w, d, d)  # C: w*diff*diff
        for t in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_t = (F32(0.1) * F32(t) + F32(nmax)) / mx
            lt = np.minimum(nearest_int(iscale_t * x, None, None), F32(nmax))
            d = x - (F32(1) / iscale_t) * lt
            mse = dot(w, d, d)
            better = mse < best
            np.copyto(best, mse, where=better)
            np.copyto(iscale, iscale_t, where=better)
        l = np.minimum(nearest_int(iscale * x, None, None), F32(nmax))  # noqa: E741
        L = wrap_u8(l)
        wx = w * x
        sumlx, suml2 = dot(wx, l), dot(w, l, l)
        for _ in range(5):
            changed = False
            for i in range(x.shape[0]):
                slx = sumlx - wx[i] * L[i]
                sl2 = suml2 - (w[i] * L[i]) * L[i]
                new = np.minimum(nearest_int((x[i] * sl2) / slx, None, None), F32(nmax))
                slx_new = slx + wx[i] * new
                sl2_new = sl2 + (w[i] * new) * new
                take = (slx > 0) & (sl2 > 0) & (new != L[i])
                take &= (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new
                if take.any():
                    changed = True
                    np.copyto(L[i], wrap_u8(new), where=take)
                    np.copyto(sumlx, slx_new, where=take)
                    np.copyto(suml2, sl2_new, where=take)
            if not changed:
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L[:, zero] = 0
    return np.where(zero, F32(0), scale), L
