"""ggml block formats: round-trip error per type, exact code -> block mappings, Q4_K_M type choice, and
byte equality with libggml's `quantize_row_*_ref` (through ctypes; skipped without llama-cpp-python)."""

from __future__ import annotations

import platform

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from quantkit.formats.gguf.blocks import (
    block_size,
    dequantize_rows,
    q4_0_from_codes,
    q4_1_from_codes,
    q8_0_from_codes,
    quantize_rows,
    row_bytes,
)
from quantkit.formats.gguf.policy import fallback_type, q4_k_m_type, use_more_bits
from quantkit.formats.gguf.reference import REF_TYPES, quantize_rows_ref

K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
SEARCH_TYPES = [*K_TYPES, QT.IQ4_NL, QT.IQ4_XS]  # scale searches in quantkit's numpy, byte-exact to libggml
ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, *SEARCH_TYPES]
HALF_ULP = 2.0**-11  # relative rounding error of fp32 -> fp16

# Worst |error| / max|x| over one block. Legacy types: half a step, or a whole step where the code clamps
# (the max-magnitude element takes code 0, so the opposite extreme can sit one step past the top code),
# plus the fp16 rounding of d (and of m for Q4_1 / Q5_1). K-quants and IQ4: no closed form (quantized
# sub-scales, searched scales and mins); measured 0.326 (Q2_K), 0.165 (Q3_K), 0.067 (Q4_K), 0.035 (Q5_K),
# 0.016 (Q6_K), 0.094 (IQ4_NL) and 0.084 (IQ4_XS) on these inputs, bounds 20-50 % above that.
MAX_ERR = {
    QT.F32: 0.0,
    QT.F16: HALF_ULP,
    QT.BF16: 2.0**-8,
    QT.Q8_0: 1 / 254 + HALF_ULP,
    QT.Q4_0: (1 + 7 * HALF_ULP) / 8,
    QT.Q5_0: (1 + 15 * HALF_ULP) / 16,
    QT.Q4_1: 1 / 15 + 3 * HALF_ULP,
    QT.Q5_1: 1 / 31 + 3 * HALF_ULP,
    QT.IQ4_NL: 0.12,
    QT.IQ4_XS: 0.11,
    QT.Q2_K: 0.4,
    QT.Q3_K: 0.2,
    QT.Q4_K: 0.1,
    QT.Q5_K: 0.045,
    QT.Q6_K: 0.02,
}
# Below 2**-14 fp16 is subnormal with a fixed step of 2**-24, so a small d (Q6_K: d ~ amax/4096, which
# covers ordinary weights) is off by up to half that step, multiplied by the largest code * sub-scale.
SUBNORMAL_STEP = 2.0**-24
REACH = {QT.F32: 0, QT.F16: 1, QT.BF16: 0, QT.Q8_0: 127, QT.Q4_0: 8, QT.Q5_0: 16, QT.Q4_1: 16, QT.Q5_1: 32}
REACH |= {
    QT.IQ4_NL: 127,
    QT.IQ4_XS: 127 * 32,
    QT.Q2_K: 2 * 3 * 15,
    QT.Q3_K: 4 * 32,
    QT.Q4_K: 2 * 15 * 63,
    QT.Q5_K: 2 * 31 * 63,
    QT.Q6_K: 32 * 128,
}
# Re-quantizing K-quant output re-runs the scale search: measured rms change / first round trip's error
# 0.121 (Q2_K), 0.138 (Q3_K), 0.027 (Q4_K), 0.099 (Q5_K), 0.056 (Q6_K), 0.049 (IQ4_NL), 0.072 (IQ4_XS).
REQUANT_DRIFT = {QT.IQ4_NL: 0.1, QT.IQ4_XS: 0.1, QT.Q2_K: 0.2, QT.Q3_K: 0.2, QT.Q4_K: 0.1, QT.Q5_K: 0.15, QT.Q6_K: 0.1}
# On x86-64 libggml-base is built without FMA and the numpy K-quants reproduce its float32 C-order
# arithmetic: measured 0 differing super-blocks. A build that contracts a*b+c into FMA (e.g. aarch64)
# may flip a code in a few % of blocks.
K_MISMATCH_LIMIT = 0.0 if platform.machine().lower() in ("x86_64", "amd64") else 0.05


def gaussian(rows: int, n: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, n)) * scale).astype(np.float32)


def heavy_tailed(rows: int, n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(3, (rows, n)) * 0.02).astype(np.float32)


def awkward_rows(n: int = 512, seed: int = 1) -> np.ndarray:
    """[16, n] rows of ordinary magnitude with the cases quantizers get wrong."""
    x = gaussian(16, n, seed)
    x[0, :256] = 0  # an all-zero super-block
    x[1, 256:] = -np.abs(x[1, 256:])  # negative-only block
    x[2, 7], x[3, 300] = 2.0, -4.0  # large outliers, both signs
    x[4] = np.abs(x[4]) + 1.0  # offset far from zero
    x[5, 32:64] = -0.01  # a constant sub-block
    x[6] = np.round(x[6] * 800) / 16  # values on a grid: rounding ties
    x[7] *= np.logspace(-3, 1, n, dtype=np.float32)  # sub-block scales spanning 4 decades
    x[8, 16:32] = 0  # one zero Q6_K sub-block
    x[9] = np.abs(x[9])  # positive-only
    return x


def edge_rows(n: int = 512, seed: int = 2) -> np.ndarray:
    """Rows where fp16 super-scales underflow, values are tiny or every value is equal: only byte equality can
    judge them."""
    x = gaussian(12, n, seed)
    x[0] *= 1e-6
    x[1] *= 1e-12
    x[2] = 0.5
    x[3] = -0.25
    x[4] = -0.0
    x[5, :] = 0
    x[5, 100] = 1.0
    x[6] = np.random.default_rng(seed).integers(-8, 8, n).astype(np.float32) * 0.125
    x[7] *= 1e4
    x[8] *= 1e-18  # tiny: squares and sub-block scales near float32's smallest normals
    x[9, ::7] *= 1e-13  # sub-blocks whose largest values sit near ggml's all-zero threshold
    x[9, np.arange(n) % 7 != 0] = 0
    x[10] = 0  # all zeros (+0.0)
    x[11] *= 1e-38  # float32 subnormals: 1 / (a sub-block's range) is inf, C's nearest_int of it is no rounding
    return x


def block_max(a: np.ndarray, blk: int) -> np.ndarray:
    return np.abs(a).reshape(-1, blk).max(axis=1)


def rel_rms(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2)))


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_round_trip_error_is_bounded(qtype: QT) -> None:
    x = np.concatenate([gaussian(32, 512), heavy_tailed(16, 512), awkward_rows()])
    q = quantize_rows(x, qtype)
    assert q.dtype == np.uint8 and q.shape == (x.shape[0], row_bytes(qtype, 512))
    y = gq.dequantize(q, qtype)
    assert y.shape == x.shape and y.dtype == np.float32

    blk = max(block_size(qtype), 32)
    err, amax = block_max(y - x, blk), block_max(x, blk)
    bound = MAX_ERR[qtype] * (1 + 1e-5) * amax + REACH[qtype] * SUBNORMAL_STEP / 2
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), f"{qtype.name}: block {worst} error {err[worst]:.3g} > {bound[worst]:.3g}"
    assert np.all(err[amax == 0] == 0), "all-zero blocks must decode to zeros"


def test_rms_error_orders_the_types() -> None:
    """Gaussian weights: more bits, less error. Uniform-noise estimate step/sqrt(12): Q4_K's 32-runs span
    ~4.1 sigma over 15 steps -> 0.079; Q6_K's 16-runs peak at ~2 sigma over 32 steps -> 0.018."""
    x = gaussian(64, 1024, seed=3)
    rms = {t: rel_rms(dequantize_rows(quantize_rows(x, t), t), x) for t in ALL_TYPES}
    assert rms[QT.Q4_K] < 0.08 and rms[QT.Q6_K] < 0.02
    order = [
        QT.F32,
        QT.F16,
        QT.BF16,
        QT.Q8_0,
        QT.Q6_K,
        QT.Q5_K,
        QT.Q5_1,
        QT.Q5_0,
        QT.Q4_K,
        QT.Q4_1,
        QT.Q4_0,
        QT.Q3_K,
        QT.Q2_K,
    ]
    assert [rms[t] for t in order] == sorted(rms[t] for t in order), {t.name: round(rms[t], 5) for t in order}


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_requantizing_dequantized_weights_is_stable(qtype: QT) -> None:
    """Values already on the grid: legacy types give back the same bytes; the K-quants and IQ4 types re-run
    their search and may move a few codes."""
    x = np.concatenate([gaussian(16, 1024), heavy_tailed(16, 1024)])
    q = quantize_rows(x, qtype)
    y = dequantize_rows(q, qtype)
    q2 = quantize_rows(y, qtype)
    if qtype in SEARCH_TYPES:
        z = dequantize_rows(q2, qtype)
        assert rel_rms(z, y) < REQUANT_DRIFT[qtype] * rel_rms(y, x)
    else:
        np.testing.assert_array_equal(q2, q)


def test_quantize_rows_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of Q4_K's block 256"):
        quantize_rows(np.zeros((2, 640), np.float32), QT.Q4_K)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rows(np.zeros(256, np.float32), QT.Q8_0)
    assert quantize_rows(np.zeros((2, 640), np.float32), QT.Q5_0).shape == (2, 20 * 22)


# --------------------------------------------------------------------------------- integer codes -> blocks


def codes_and_scales(lo: int, hi: int, rows: int = 8, n: int = 256, seed: int = 4) -> tuple[np.ndarray, ...]:
    """Random codes [rows, n] in [lo, hi] and fp16 scales [rows, n/32]."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(lo, hi + 1, (rows, n)).astype(np.int8 if lo < 0 else np.uint8)
    scale = (rng.uniform(1e-4, 1e-2, (rows, n // 32))).astype(np.float16)
    return codes, scale


def test_q4_0_from_codes_is_lossless() -> None:
    codes, _ = codes_and_scales(-8, 7)
    codes[0, :32] = -8  # an extreme run
    scale128 = np.random.default_rng(5).uniform(1e-4, 1e-2, (8, 2)).astype(np.float16)
    scale = np.repeat(scale128, 4, axis=1)  # a 128-group scale covers four 32-runs
    q = q4_0_from_codes(codes, scale)
    assert q.shape == (8, 8 * 18)
    expect = codes.astype(np.float32) * np.repeat(scale, 32, axis=1).astype(np.float32)
    np.testing.assert_array_equal(gq.dequantize(q, QT.Q4_0), expect)


def test_q8_0_from_codes_is_lossless() -> None:
    codes, scale = codes_and_scales(-128, 127)
    codes[1, :2] = [-128, 127]
    q = q8_0_from_codes(codes, scale)
    expect = codes.astype(np.float32) * np.repeat(scale, 32, axis=1).astype(np.float32)
    np.testing.assert_array_equal(gq.dequantize(q, QT.Q8_0), expect)


def test_q4_1_from_codes_loses_only_the_rounding_of_m() -> None:
    u, scale = codes_and_scales(0, 15)
    zero = np.random.default_rng(6).integers(0, 16, scale.shape).astype(np.float32)
    y = gq.dequantize(q4_1_from_codes(u, scale, zero), QT.Q4_1)
    s, z = np.repeat(scale, 32, axis=1).astype(np.float32), np.repeat(zero, 32, axis=1)
    exact = s * (u.astype(np.float32) - z)
    m = s * z  # |m|: fp16 rounding moves it by at most half an ulp, the only error besides float32 sums
    np.testing.assert_array_less(np.abs(y - exact), m * HALF_ULP + 1e-7)
    np.testing.assert_array_equal(y[zero.repeat(32, axis=1) == 0], exact[zero.repeat(32, axis=1) == 0])


def test_from_codes_checks_ranges_and_shapes() -> None:
    codes, scale = codes_and_scales(-8, 7)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        q4_0_from_codes(codes * 2, scale)
    with pytest.raises(ValueError, match="one parameter per 32-run"):
        q4_0_from_codes(codes, scale[:, :2])


# --------------------------------------------------------------------------- Q4_K_M type choice


def test_q4_k_m_gives_q6_k_to_attn_v_and_ffn_down_on_21_of_42_layers() -> None:
    expected = [*range(0, 5), 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, *range(36, 42)]
    assert [i for i in range(42) if use_more_bits(i, 42)] == expected and len(expected) == 21
    for i in range(42):
        bump = QT.Q6_K if i in expected else QT.Q4_K
        assert q4_k_m_type("attn_v", i, 42, 3584) == bump
        assert q4_k_m_type(f"model.layers.{i}.mlp.down_proj.weight", i, 42, 14336) == bump
        assert q4_k_m_type(f"blk.{i}.attn_q.weight", i, 42, 3584) == QT.Q4_K
        assert q4_k_m_type("o_proj", i, 42, 4096) == QT.Q4_K
    assert q4_k_m_type("token_embd", None, 42, 3584) == QT.Q6_K
    assert q4_k_m_type("blk.0.attn_norm.weight", 0, 42, 3584) == QT.F32


def test_q4_k_m_row_length_fallbacks_for_gemma3_270m() -> None:
    assert q4_k_m_type("attn_q", 5, 18, 640) == QT.Q5_0
    assert q4_k_m_type("attn_v", 0, 18, 640) == QT.Q8_0  # Q6_K layer
    assert q4_k_m_type("attn_v", 5, 18, 640) == QT.Q5_0
    assert q4_k_m_type("ffn_down", 5, 18, 2048) == QT.Q4_K  # row = intermediate size, divisible by 256
    assert q4_k_m_type("embed_tokens", None, 18, 640) == QT.Q8_0
    assert fallback_type(QT.Q5_K, 640) == QT.Q5_1
    assert fallback_type(QT.Q6_K, 100) == QT.F16 and fallback_type(QT.Q4_0, 100) == QT.F16
    assert fallback_type(QT.Q8_0, 640) == QT.Q8_0


# ----------------------------------------------------------------------- byte equality with libggml


def differing_blocks(ours: np.ndarray, ref: np.ndarray, qtype: QT) -> tuple[np.ndarray, str]:
    """Per-block inequality mask, plus a description of the first differing block for the message."""
    size = row_bytes(qtype, block_size(qtype))
    a, b = ours.reshape(-1, size), ref.reshape(-1, size)
    bad = (a != b).any(axis=1)
    if not bad.any():
        return bad, ""
    i = int(np.argmax(bad))
    where = np.nonzero(a[i] != b[i])[0]
    return (
        bad,
        f"first bad block {i}: bytes {where[:8].tolist()} ours {a[i, where[:8]]} ref {b[i, where[:8]]}",
    )


# the codebook types: tests/test_codebook_iquants.py (IQ3), test_codebook_iq2.py (IQ2) and test_iquants_iq1.py (IQ1;
# IQ1_S, IQ2_XXS and IQ2_XS need an importance vector), on these rows and more
CODEBOOK = (QT.IQ3_XXS, QT.IQ3_S, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ1_S, QT.IQ1_M)


@pytest.mark.parametrize("qtype", [t for t in REF_TYPES if t not in CODEBOOK], ids=lambda t: t.name)
def test_matches_libggml_reference(libggml, qtype: QT) -> None:
    """A few hundred super-blocks (gaussian, heavy-tailed, awkward). gguf-py's legacy types differ from C
    only in the sign of d on all-zero blocks, so those blocks are left out there."""
    x = np.concatenate([gaussian(128, 512), heavy_tailed(96, 512, seed=7), awkward_rows()])
    ours, ref = quantize_rows(x, qtype), quantize_rows_ref(x, qtype, libggml)
    bad, first = differing_blocks(ours, ref, qtype)
    if qtype in SEARCH_TYPES:
        assert bad.mean() <= K_MISMATCH_LIMIT, f"{bad.sum()}/{bad.size} blocks differ; {first}"
    else:
        nonzero = block_max(x, block_size(qtype)) > 0
        assert not bad[nonzero].any(), f"{bad[nonzero].sum()} non-zero blocks differ; {first}"


@pytest.mark.parametrize("qtype", SEARCH_TYPES, ids=lambda t: t.name)
def test_k_quant_edge_cases_match_libggml(libggml, qtype: QT) -> None:
    """fp16 super-scales that underflow, constant and all-zero rows, tiny values, ties, large values: judged
    by bytes alone."""
    x = edge_rows()
    bad, first = differing_blocks(quantize_rows(x, qtype), quantize_rows_ref(x, qtype, libggml), qtype)
    assert bad.mean() <= K_MISMATCH_LIMIT, f"{bad.sum()}/{bad.size} blocks differ; {first}"


# ---------------------------------------------------------------- torch Q8_0 / Q4_0 against both oracles


def legacy_edge_blocks(seed: int = 8) -> np.ndarray:
    """[R, 32] blocks that separate exact from almost-exact Q8_0 / Q4_0 quantizers."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(-16, 17, (64, 32)).astype(np.float32) / 2  # halves: x*id lands on .5 exactly
    grid[:32, 0], grid[32:, 0] = 127.0, -8.0  # amax 127 -> Q8_0 id = 1; max -8 -> Q4_0 d = 1, id = 1
    blocks = [
        grid,
        np.zeros((1, 32), np.float32),  # all zero: C keeps max = +0, so d = +0/-8 = -0.0 for Q4_0
        np.full((1, 32), -0.0, np.float32),
        np.where(rng.random((4, 32)) < 0.5, -0.0, 0.0).astype(np.float32),
        (rng.standard_normal((8, 32)) * 1e-40).astype(np.float32),  # subnormal inputs and scales
        (rng.standard_normal((8, 32)) * 2e-38).astype(np.float32),  # d subnormal in fp32, zero in fp16
        (rng.standard_normal((8, 32)) * 1e-6).astype(np.float32),  # d subnormal in fp16
        (rng.standard_normal((8, 32)) * 6e4).astype(np.float32),  # d near fp16's top
    ]
    ties = rng.standard_normal((16, 32)).astype(np.float32)
    ties[:8, 5], ties[:8, 20] = 3.0, -3.0  # equal magnitudes, both signs: the first one sets Q4_0's sign
    ties[8:, 5], ties[8:, 20] = -3.0, 3.0
    blocks.append(ties)
    return np.concatenate(blocks)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0], ids=lambda t: t.name)
def test_torch_legacy_quantizers_match_libggml_and_gguf_py(libggml, qtype: QT) -> None:
    """Every block byte-identical to libggml's quantize_row_*_ref; gguf-py agrees on all blocks that are not
    all zeros (there it can take the sign of d from a -0.0 element, C never does)."""
    rng = np.random.default_rng(9)
    x = np.concatenate(
        [
            legacy_edge_blocks(),
            (rng.standard_normal((4096, 32)) * 0.02).astype(np.float32),
            heavy_tailed(1024, 32, seed=10),
        ]
    )  # rows of one block
    ours = quantize_rows(x, qtype)
    bad, first = differing_blocks(ours, quantize_rows_ref(x, qtype, libggml), qtype)
    assert not bad.any(), f"{bad.sum()}/{bad.size} blocks differ from libggml; {first}"
    with np.errstate(all="ignore"):  # 1/d overflows on the subnormal blocks
        py = np.ascontiguousarray(gq.quantize(x, qtype)).view(np.uint8).reshape(ours.shape)
    bad_py, first = differing_blocks(ours, py, qtype)
    nonzero = block_max(x, 32) > 0
    assert not bad_py[nonzero].any(), f"{bad_py[nonzero].sum()} non-zero blocks differ from gguf-py; {first}"
    assert not nonzero.all()  # the all-zero blocks were there


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0], ids=lambda t: t.name)
def test_torch_legacy_quantizers_match_gguf_py_at_scale(qtype: QT) -> None:
    """Four million gaussian and heavy-tailed weights, several torch chunks: every byte equals gguf-py's."""
    x = np.concatenate([gaussian(2048, 1024, seed=11), heavy_tailed(2048, 1024, seed=12)])
    py = np.ascontiguousarray(gq.quantize(x, qtype)).view(np.uint8).reshape(x.shape[0], -1)
    np.testing.assert_array_equal(quantize_rows(x, qtype), py)
