"""ggml block layouts: the one place that says which bytes hold which field of a quantized block.

Each ``pack_<type>`` takes a block's fields as the decoder uses them and returns the bytes ggml stores,
uint8 [B, type_bytes] for B blocks. The integers are the ones the decoder multiplies with:

| type | block | weight value                 | codes c / u       | sub-block scales            |
|------|-------|------------------------------|-------------------|-----------------------------|
| Q8_0 | 32    | d * c                        | c in -128..127    |                             |
| Q4_0 | 32    | d * c                        | c in -8..7        |                             |
| Q5_0 | 32    | d * c                        | c in -16..15      |                             |
| Q4_1 | 32    | d * u + m                    | u in 0..15        |                             |
| Q5_1 | 32    | d * u + m                    | u in 0..31        |                             |
| Q4_K | 256   | d * sc * u - dmin * mn       | u in 0..15        | sc, mn in 0..63, one per 32 |
| Q5_K | 256   | d * sc * u - dmin * mn       | u in 0..31        | sc, mn in 0..63, one per 32 |
| Q6_K | 256   | d * sc * c                   | c in -32..31      | sc in -128..127, one per 16 |
| Q3_K | 256   | d * sc * c                   | c in -4..3        | sc in -32..31, one per 16   |
| Q2_K | 256   | d * sc * u - dmin * mn       | u in 0..3         | sc, mn in 0..15, one per 16 |
| IQ4_NL | 32  | d * IQ4_LEVELS[u]            | u in 0..15        |                             |
| IQ4_XS | 256 | d * sc * IQ4_LEVELS[u]       | u in 0..15        | sc in -32..31, one per 32   |
| Q1_0 | 128   | d * (-1, 1)[u]               | u in 0..1 (sign)  |                             |
| Q2_0 | 64    | d * c                        | c in -1..2        |                             |

d, m, dmin are stored as fp16 (``fp16_bytes``: a float32 input is rounded to nearest even here). Signed codes
are stored with an offset (c + 8 for Q4_0, ...; Q8_0 as int8), which only this module knows. Elements and
bytes per block come from gguf-py's ``GGML_QUANT_SIZES``; decoding is gguf-py's ``gguf.quants.dequantize``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from quantkit.formats.gguf import ggml_types  # noqa: F401  (Q2_0, which gguf-py does not name yet)


@dataclass(frozen=True)
class Layout:
    """How one ggml type decodes a weight: ``g`` weights share a scale (and a min), codes in [lo, hi]."""

    g: int
    lo: int
    hi: int
    offset: int  # added to a code before it goes into its bit field (Q8_0 stores the int8 itself)
    sym: bool  # value = s * c; else s * u + b
    super_block: bool  # K type: 256-weight super-blocks whose sub-block scales are quantized themselves
    levels: tuple[int, ...] | None = None  # non-linear types: value = s * levels[c] (c indexes the table)


# ggml's kvalues_iq4nl: the 16 levels of IQ4_NL / IQ4_XS, ascending
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


LAYOUTS = {
    QT.Q8_0: Layout(32, -128, 127, 0, True, False),
    QT.Q4_0: Layout(32, -8, 7, 8, True, False),
    QT.Q5_0: Layout(32, -16, 15, 16, True, False),
    QT.Q4_1: Layout(32, 0, 15, 0, False, False),
    QT.Q5_1: Layout(32, 0, 31, 0, False, False),
    QT.Q4_K: Layout(32, 0, 15, 0, False, True),
    QT.Q5_K: Layout(32, 0, 31, 0, False, True),
    QT.Q6_K: Layout(16, -32, 31, 32, True, True),
    QT.Q3_K: Layout(16, -4, 3, 4, True, True),
    QT.Q2_K: Layout(16, 0, 3, 0, False, True),
    QT.IQ4_NL: Layout(32, 0, 15, 0, True, False, IQ4_LEVELS),
    QT.IQ4_XS: Layout(32, 0, 15, 0, True, True, IQ4_LEVELS),
    QT.Q1_0: Layout(128, 0, 1, 0, True, False, (-1, 1)),
    QT.Q2_0: Layout(64, -1, 2, 1, True, False),
}
Q3_K_SCALE_OFFSET = 32  # Q3_K stores sc + 32 in 6 bits


def block_size(qtype: QT) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: QT, n: int) -> int:
    """Bytes ggml uses for one row of n elements."""
    blk, size = GGML_QUANT_SIZES[qtype]
    return n // blk * size


# ------------------------------------------------------------------------------------------- bit fields


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """Floats [B] or [B, 1] -> uint8 [B, 2]: little-endian IEEE half, rounded to nearest even. float32 goes
    through torch's cast (the same rounding, ~10x faster than numpy's: measured); float64 is rounded
    once, by numpy, never through float32."""
    a = np.asarray(v)
    h = _torch(a).to(torch.float16).numpy() if a.dtype == np.float32 else a.astype(np.float16)
    return np.ascontiguousarray(h.astype("<f2", copy=False)).reshape(-1, 1).view(np.uint8)


def interleave(u: np.ndarray, width: int) -> np.ndarray:
    """uint8 [..., k, n] with every value below 2**width and k * width == 8 -> uint8 [..., n]: byte l holds
    u[..., j, l] in bits width*j .. width*j + width - 1. Nibbles (width 4), 2-bit fields, bit planes.

    A byte never carries into its neighbour here, so eight bytes are shifted and or-ed as one int64 when the
    rows allow it (8x fewer operations). The arithmetic runs in torch on the same memory: on these short
    strided rows numpy's per-row loop overhead is ~2x slower (measured on Q4_0's [B, 2, 2] int64 rows)."""
    t = _torch(u)
    if t.shape[-1] % 8 == 0:
        t = t.view(torch.int64)
    out = t[..., 0, :] | (t[..., 1, :] << width)
    for j in range(2, t.shape[-2]):
        out |= t[..., j, :] << (width * j)
    return out.view(torch.uint8).numpy()


def _stored(codes: np.ndarray, qtype: QT) -> np.ndarray:
    """Codes as the decoder reads them -> the unsigned integers the bit fields hold."""
    c = codes.astype(np.int8, copy=False)  # every code range fits int8 (callers check the range)
    off = LAYOUTS[qtype].offset
    return (c + np.int8(off) if off else c).view(np.uint8)


def _concat(parts: list[np.ndarray], out: np.ndarray | None) -> np.ndarray:
    """[B, a], [B, b], ... -> [B, a + b + ...] (into ``out`` when given). torch.cat on the same memory:
    numpy's concatenate copies these 2-34 byte rows one by one, ~4x slower (measured)."""
    dst = None if out is None else torch.from_numpy(out).view(torch.int16)
    res = torch.cat([_torch(p).view(torch.int16) for p in parts], dim=1, out=dst)  # every field is 2n bytes
    return res.view(torch.uint8).numpy()


def _torch(a: np.ndarray) -> torch.Tensor:
    """A torch view of ``a`` (a contiguous copy where it is strided or read-only)."""
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def check_codes(codes: np.ndarray, qtype: QT) -> None:
    """Raise ValueError unless every code lies in the type's range."""
    lay = LAYOUTS[qtype]
    if codes.size and (codes.min() < lay.lo or codes.max() > lay.hi):
        raise ValueError(f"{qtype.name}: codes must lie in [{lay.lo}, {lay.hi}], got [{codes.min()}, {codes.max()}]")


def pack_scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: 6-bit scales and mins uint8 [B, 8] -> 12 bytes [B, 12]. Bytes 0-3: sc 0-3 (6 bits) and the
    top 2 bits of sc 4-7; bytes 4-7: the same for the mins; bytes 8-11: low nibbles of sc 4-7 | mn 4-7."""
    sc, mn = sc.astype(np.uint8, copy=False), mn.astype(np.uint8, copy=False)
    hi = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6), hi], axis=1)


def pack_q3_k_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K: scales int [B, 16] in -32..31 -> 12 bytes [B, 12]. Stored s = sc + 32; bytes 0-7: low nibbles of
    s 0-7 | s 8-15; bytes 8-11: byte 8 + j % 4 holds the top 2 bits of s j at bit 2 * (j // 4)."""
    s = (sc.astype(np.int16) + Q3_K_SCALE_OFFSET).astype(np.uint8)
    B = s.shape[0]
    return np.concatenate([interleave((s & 15).reshape(B, 2, 8), 4), interleave((s >> 4).reshape(B, 4, 4), 2)], axis=1)


# ---------------------------------------------------------------------------------------- legacy blocks
# d, m [B] or [B, 1] (floats, stored as fp16); codes int [B, 32] in the type's range; -> uint8 [B, type_bytes]

Array = np.ndarray


def pack_q8_0(d: Array, codes: Array, out: Array | None = None) -> Array:
    """-> [B, 34]: d | qs[32] (int8)."""
    return _concat([fp16_bytes(d), _stored(codes, QT.Q8_0)], out)


def pack_q4_0(d: Array, codes: Array, out: Array | None = None) -> Array:
    """-> [B, 18]: d | qs[16]. Stored L = code + 8; byte j holds L j in the low nibble, L j + 16 in the high one."""
    return _concat([fp16_bytes(d), _nibbles(_stored(codes, QT.Q4_0))], out)


def pack_q4_1(d: Array, m: Array, codes: Array) -> Array:
    """-> [B, 20]: d | m | qs[16] (as Q4_0, no offset)."""
    return _concat([fp16_bytes(d), fp16_bytes(m), _nibbles(_stored(codes, QT.Q4_1))], None)


def pack_q5_0(d: Array, codes: Array) -> Array:
    """-> [B, 22]: d | qh[4] | qs[16] (code + 16)."""
    return _concat([fp16_bytes(d), *_q5_fields(_stored(codes, QT.Q5_0))], None)


def pack_q5_1(d: Array, m: Array, codes: Array) -> Array:
    """-> [B, 24]: d | m | qh[4] | qs[16]."""
    return _concat([fp16_bytes(d), fp16_bytes(m), *_q5_fields(_stored(codes, QT.Q5_1))], None)


def pack_iq4_nl(d: Array, codes: Array) -> Array:
    """level indices [B, 32] -> [B, 18]: d | qs[16] (nibbles as Q4_0, no offset)."""
    return _concat([fp16_bytes(d), _nibbles(_stored(codes, QT.IQ4_NL))], None)


def pack_iq4_xs(d: Array, sc: Array, codes: Array) -> Array:
    """sc in -32..31 [B, 8], level indices [B, 256] -> [B, 136]: d | scales_h (u16: bits 2j, 2j + 1 = the top
    2 bits of s j) | scales_l[4] (low nibbles of s 2k | s 2k + 1) | qs[128] (per 32-run as IQ4_NL). s = sc + 32."""
    s = (sc.astype(np.int16) + 32).astype(np.uint16)
    B = s.shape[0]
    high = ((s >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)  # disjoint bits
    low = (s & 15).astype(np.uint8)
    qs = _nibbles(_stored(codes, QT.IQ4_XS).reshape(-1, 32)).reshape(B, 128)
    return _concat(
        [fp16_bytes(d), high.astype("<u2").reshape(B, 1).view(np.uint8), low[:, 0::2] | (low[:, 1::2] << 4), qs], None
    )


def pack_q1_0(d: Array, codes: Array) -> Array:
    """sign bits [B, 128] (1: +d) -> [B, 18]: d | qs[16], bit j of byte l = code 8 l + j."""
    return _concat([fp16_bytes(d), interleave(_stored(codes, QT.Q1_0).reshape(-1, 16, 8).swapaxes(1, 2), 1)], None)


def pack_q2_0(d: Array, codes: Array) -> Array:
    """codes [B, 64] in -1..2 -> [B, 18]: d | qs[16]; stored u = code + 1, bits 2j, 2j + 1 of byte l = u 4 l + j."""
    return _concat([fp16_bytes(d), interleave(_stored(codes, QT.Q2_0).reshape(-1, 16, 4).swapaxes(1, 2), 2)], None)


def _nibbles(u: Array) -> Array:
    """stored codes [B, 32] below 16 -> [B, 16]: byte j = u[j] | u[j + 16] << 4."""
    return interleave(u.reshape(-1, 2, 16), 4)


def _q5_fields(u: Array) -> list[Array]:
    """stored 5-bit codes [B, 32] -> qh [B, 4] (bit j of a little-endian u32 = bit 4 of code j), qs [B, 16]."""
    hi = ((u >> 4) & 1).reshape(-1, 4, 8).swapaxes(1, 2)  # [B, bit i, byte b] = code 8b + i
    return [interleave(hi, 1), _nibbles(u & 15)]


# ----------------------------------------------------------------------------------------- K super-blocks
# d, dmin [B] or [B, 1]; sub-block scales (and mins) [B, 256 / g]; codes [B, 256]; -> uint8 [B, type_bytes]


def pack_q4_k(d: Array, dmin: Array, sc: Array, mn: Array, codes: Array) -> Array:
    """sc, mn uint8 in 0..63 -> [B, 144]: d | dmin | scales[12] | qs[128]."""
    u = _stored(codes, QT.Q4_K)
    return _concat([fp16_bytes(d), fp16_bytes(dmin), pack_scale_min_k4(sc, mn), _k_nibbles(u)], None)


def pack_q5_k(d: Array, dmin: Array, sc: Array, mn: Array, codes: Array) -> Array:
    """As Q4_K with 5-bit codes -> [B, 176]: d | dmin | scales[12] | qh[32] (bit 4 of each code) | qs[128]."""
    u = _stored(codes, QT.Q5_K)
    qh = _bit_planes((u >> 4) & 1)
    return _concat([fp16_bytes(d), fp16_bytes(dmin), pack_scale_min_k4(sc, mn), qh, _k_nibbles(u & 15)], None)


def pack_q6_k(d: Array, sc: Array, codes: Array) -> Array:
    """sc int8 -> [B, 210]: ql[128] | qh[64] | scales[16] | d. Stored L = code + 32; per 128-run, ql byte l
    holds the low nibbles of L l and l + 64, qh byte l the top 2 bits of L l, l + 32, l + 64, l + 96."""
    u = _stored(codes, QT.Q6_K)
    ql = interleave((u & 15).reshape(-1, 2, 64), 4).reshape(-1, 128)
    qh = interleave((u >> 4).reshape(-1, 4, 32), 2).reshape(-1, 64)
    return _concat([ql, qh, sc.astype(np.int8, copy=False).view(np.uint8), fp16_bytes(d)], None)


def pack_q3_k(d: Array, sc: Array, codes: Array) -> Array:
    """sc in -32..31 -> [B, 110]: hmask[32] | qs[64] | scales[12] | d. Stored L = code + 4: bit 2 in hmask (bit
    planes), the low 2 bits in qs (per 128-run, byte l holds L l, l + 32, l + 64, l + 96)."""
    u = _stored(codes, QT.Q3_K)
    qs = interleave((u & 3).reshape(-1, 4, 32), 2).reshape(-1, 64)
    return _concat([_bit_planes((u >> 2) & 1), qs, pack_q3_k_scales(sc), fp16_bytes(d)], None)


def pack_q2_k(d: Array, dmin: Array, sc: Array, mn: Array, codes: Array) -> Array:
    """sc, mn in 0..15 -> [B, 84]: scales[16] (sc | mn << 4) | qs[64] | d | dmin. Per 128-run, qs byte l holds
    the 2-bit codes l, l + 32, l + 64, l + 96."""
    u = _stored(codes, QT.Q2_K)
    scales = (sc.astype(np.uint8) & 15) | (mn.astype(np.uint8) << 4)
    qs = interleave(u.reshape(-1, 4, 32), 2).reshape(-1, 64)
    return _concat([scales, qs, fp16_bytes(d), fp16_bytes(dmin)], None)


def pack_iq3_xxs(d: Array, points: Array, signs: Array, sc: Array) -> Array:
    """IQ3_XXS: fp16 d [B], codebook points [B, 8 runs, 8 groups] (0..255), 7-bit sign bytes [B, 8, 4], 4-bit
    run scales [B, 8] -> [B, 98]: d | qs[64] (the points, run by run) | per run a u32: its four sign bytes at
    bits 0, 7, 14, 21 and its scale at bit 28."""
    B = points.shape[0]
    s = signs.astype(np.uint32)
    aux = s[..., 0] | (s[..., 1] << 7) | (s[..., 2] << 14) | (s[..., 3] << 21) | (sc.astype(np.uint32) << 28)
    qs = points.astype(np.uint8).reshape(B, 64)
    return _concat([fp16_bytes(d), qs, aux.astype("<u4").view(np.uint8).reshape(B, 32)], None)


def pack_iq3_s(d: Array, points: Array, signs: Array, sc: Array, written: Array) -> Array:
    """IQ3_S: fp16 d [B], codebook points [B, 8 runs, 8 groups] (0..511), sign bytes [B, 8, 4] (bit i: weight
    8j + i negative), 4-bit run scales [B, 8] -> [B, 110]: d | qs[64] (the low 8 bits of the points) | qh[8]
    (bit k of byte r: bit 8 of run r's point k) | signs[32] | scales[4] (runs 2j | 2j + 1 << 4). Only the
    ``written`` runs [B, 8] store their qs, qh and signs; as in C, whose qs and signs pointers advance only
    past a run it writes, a run after an all-zero one stores them one slot early, and the last slots stay 0."""
    B = points.shape[0]
    p = points.astype(np.int64) * written[..., None]
    qh = ((p >> 8) << np.arange(8)).sum(-1).astype(np.uint8)  # disjoint bits
    slot = np.cumsum(written, axis=1) - 1  # [B, 8]: where each written run goes
    rows, runs = np.nonzero(written)
    qs, sg = np.zeros((B, 8, 8), np.uint8), np.zeros((B, 8, 4), np.uint8)
    qs[rows, slot[rows, runs]] = (p[rows, runs] & 255).astype(np.uint8)
    sg[rows, slot[rows, runs]] = signs[rows, runs].astype(np.uint8)
    u = sc.astype(np.uint8)
    scales = u[:, 0::2] | (u[:, 1::2] << 4)
    return _concat([fp16_bytes(d), qs.reshape(B, 64), qh, sg.reshape(B, 32), scales], None)


def pack_iq1_s(d: Array, points: Array, sc: Array, minus: Array) -> Array:
    """IQ1_S: fp16 d [B], points [B, 8 runs, 4 groups] (0..2047), 3-bit run scales and whether a run's shift is
    -delta [B, 8] -> [B, 50]: d | qs[32] (the points' low 8 bits) | qh[8] (u16 per run: bits 3k..3k+2 the top
    3 bits of point k, bits 12-14 the scale, bit 15 the shift's sign)."""
    p = points.astype(np.uint16)
    qh = ((p >> 8) << (3 * np.arange(4, dtype=np.uint16))).sum(-1, dtype=np.uint16)  # disjoint bits
    qh = (qh | (sc.astype(np.uint16) << 12) | (minus.astype(np.uint16) << 15)).astype("<u2").view(np.uint8)
    return _concat([fp16_bytes(d), (p & 255).astype(np.uint8).reshape(-1, 32), qh.reshape(-1, 16)], None)


def pack_iq1_m(dh: Array, points: Array, sc: Array, minus: Array) -> Array:
    """IQ1_M: fp16 dh [B], points [B, 16 runs, 2 groups], 3-bit run scales [B, 16], whether a group's shift is
    -delta [B, 16, 2] -> [B, 56]: qs[32] | qh[16] (per run: group 0's top 3 bits, bit 3 its shift sign, group 1's
    at bits 4-7) | scales (u16 j: bits 3m..3m+2 run 4j + m's scale, bits 12-15 nibble j of dh's bits)."""
    p, B = points.astype(np.uint16), points.shape[0]
    hi = (p >> 8) | (minus.astype(np.uint16) << 3)  # [B, 16, 2]
    bits = np.asarray(dh, dtype=np.float16).reshape(B, 1).view(np.uint16)
    scales = (sc.astype(np.uint16).reshape(B, 4, 4) << (3 * np.arange(4, dtype=np.uint16))).sum(-1, dtype=np.uint16)
    scales |= ((bits >> (4 * np.arange(4, dtype=np.uint16))) & 15) << 12
    qs, qh = (p & 255).astype(np.uint8).reshape(B, 32), (hi[..., 0] | (hi[..., 1] << 4)).astype(np.uint8)
    return _concat([qs, qh, scales.astype("<u2").view(np.uint8).reshape(B, 8)], None)


def _k_nibbles(u: Array) -> Array:
    """stored codes [B, 256] below 16 -> qs [B, 128]: per 64-run, sub-block 2i in the low nibbles, 2i + 1 high."""
    return interleave(u.reshape(-1, 2, 32), 4).reshape(-1, 128)


def _bit_planes(bits: Array) -> Array:
    """one bit per code [B, 256] -> [B, 32]: bit j of byte l is code 32 j + l."""
    return interleave(bits.reshape(-1, 8, 32), 1)


# the packer of each type: keyword fields (d, m, dmin, sc, mn) and codes, as the tables above name them
PACKERS = {
    QT.Q8_0: pack_q8_0,
    QT.Q4_0: pack_q4_0,
    QT.Q5_0: pack_q5_0,
    QT.Q4_1: pack_q4_1,
    QT.Q5_1: pack_q5_1,
    QT.Q4_K: pack_q4_k,
    QT.Q5_K: pack_q5_k,
    QT.Q6_K: pack_q6_k,
    QT.Q3_K: pack_q3_k,
    QT.Q2_K: pack_q2_k,
    QT.IQ4_NL: pack_iq4_nl,
    QT.IQ4_XS: pack_iq4_xs,
    QT.Q1_0: pack_q1_0,
    QT.Q2_0: pack_q2_0,
}
