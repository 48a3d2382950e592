"""Quantization settings: one frozen dataclass, named TOML recipes under ``recipes/``, CLI overrides.

Three layers, later ones winning: a base, then the recipe (if any), then the flags. The base is
``QuantizeOptions()`` (plain GPTQ: no act-order, min-max groups, symmetric) under a recipe; otherwise
``best_defaults``: the settings the int4 g128 recipes measured best on the real Gemma 3 270M
(docs/defaults.md), so the plain ``quantkit quantize MODEL -o OUT`` gives the best artifact; ``fast``
keeps the best grid but runs plain GPTQ.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.codebook_grid import CODEBOOK_TYPES
from quantkit.formats.gguf.policy import FILE_TYPES, FLOAT_TYPES
from quantkit.io.dtypes import COMPUTE_CHOICES
from quantkit.io.texts import shipped
from quantkit.quant.primitives import QuantSpec
from quantkit.quant.scale_search import ScaleSearch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES_DIR = shipped("recipes")


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything that decides a quantized artifact. Same options + same input = byte-identical output."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    method: str = "gptq"  # "gptq" | "rtn"
    calib: str | None = None  # calibration text or set (GPTQ); default: io.calibration.DEFAULT_CALIB
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    act_order: bool = False
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    blocksize: int = 128
    # the calibration's compute dtype: its layer forwards and the activations carried between layers (the
    # Hessians accumulate in fp32 either way); "auto" = bfloat16 for a bf16 checkpoint on bf16 hardware
    calib_dtype: str = "auto"
    scale_dtype: str = "auto"  # "auto" = the checkpoint's dtype (compressed-tensors); fp16 for GGUF
    batch_size: int = 8  # calibration sequences per forward
    # group scale search (quantkit.quant.scale_search): "minmax" | "unit" | "diag" | "block" (weighted by H)
    scale_search: str = "minmax"
    search_steps: int = 50  # shrink factors tried, from 1 down to search_min_shrink
    search_min_shrink: float = 0.5
    refine_iters: int = 0  # GPTQ: rounds of (least-squares scale refit, GPTQ on that grid); best pass kept
    fp_targets: bool = False  # GPTQ: match the unquantized model's layer outputs (GPTQ v2 / GPTAQ)
    # GPTQ solves with (1 - s) H + s diag(H): s = 0 is GPTQ, s = 1 rounding weighted by diag(H) alone (no error
    # fed to other columns). A shrinkage of the calibration's input covariance towards its diagonal.
    hessian_shrink: float = 0.0
    # GPTQ onto a GGUF type's scalar grid: sweeps of coordinate descent over the codes after GPTQ, in GPTQ's own
    # metric, then every block's fp16 scale refitted by least squares (quant.descent); 0 = plain GPTQ
    descent_sweeps: int = 0

    def __post_init__(self):
        if self.method not in ("gptq", "rtn"):
            raise QuantkitError(f"--method {self.method!r}: choose gptq or rtn")
        if not 0.0 < self.damp < 1.0:
            raise QuantkitError(f"--damp {self.damp}: must be in (0, 1)")
        if not 0.0 <= self.hessian_shrink <= 1.0:
            raise QuantkitError(f"--hessian-shrink {self.hessian_shrink}: must be in [0, 1]")
        if self.calib_dtype not in COMPUTE_CHOICES:
            raise QuantkitError(f"calib_dtype {self.calib_dtype!r}: choose {', '.join(COMPUTE_CHOICES)}")
        if self.scale_dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise QuantkitError(f"scale_dtype {self.scale_dtype!r}: choose auto, float16, bfloat16 or float32")
        if self.nsamples < 1 or self.seqlen < 2:
            raise QuantkitError("--nsamples must be >= 1 and --seqlen >= 2")
        if self.batch_size < 1 or self.blocksize < 1 or self.seed < 0:
            raise QuantkitError("batch_size and blocksize must be >= 1, seed >= 0")
        QuantSpec(self.bits, self.group_size, self.sym)  # validates bits and group size
        ScaleSearch(self.scale_search, self.search_steps, self.search_min_shrink)  # validates the search
        if self.descent_sweeps < 0:
            raise QuantkitError(f"--descent-sweeps {self.descent_sweeps}: must be >= 0")
        if self.refine_iters < 0:
            raise QuantkitError(f"refine_iters {self.refine_iters}: must be >= 0")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)

    @property
    def search(self) -> ScaleSearch:
        return ScaleSearch(self.scale_search, self.search_steps, self.search_min_shrink)

    def replace(self, **changes: Any) -> QuantizeOptions:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe by path or by name (``recipes/NAME.toml``); unknown keys are an error."""
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPES_DIR / f"{name_or_path.removesuffix('.toml')}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
        raise QuantkitError(f"recipe {name_or_path!r} not found (known: {', '.join(known)})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise QuantkitError(f"{path}: invalid TOML ({e})") from None
    data.pop("description", None)
    fields = {f.name for f in dataclasses.fields(QuantizeOptions)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise QuantkitError(f"{path}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(fields))})")
    defaults = QuantizeOptions()
    for key, value in data.items():
        want = type(getattr(defaults, key)) if key != "calib" else str
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
        if not ok and not (want is float and isinstance(value, int) and not isinstance(value, bool)):
            raise QuantkitError(f"{path}: {key} = {value!r} is not of type {want.__name__}")
    return data


# GPTQ settings that each lowered the 270M's KLD (int4 g128, 64 x 512 calibration tokens, 40 chunks; see
# README "How the int4 g128 KLD came down"): act-order + H-block range search 0.244 -> 0.169, fp_targets
# -> 0.140. They cost time, not bits: ``--fast`` leaves them off.
BEST_GPTQ: dict[str, Any] = {"act_order": True, "scale_search": "block", "fp_targets": True}
# The int4 grid: a 4-bit zero point per group with fp16 scales, KLD 0.140 -> 0.099 at 4.156 bits/weight (below
# a symmetric grid's 4.25 with fp32 scales). Other widths keep the symmetric grid: vLLM's WNA16 kernels take
# zero points for 4 and 8 bits only, and int8 is near-lossless without one.
BEST_INT4_GRID: dict[str, Any] = {"sym": False, "scale_dtype": "float16"}


# GPTQ into GGUF blocks is tuned for its worst domain (issue 19: calibrate on one set, score on text it has
# not seen). fp_targets moves each linear's target from W to the weight that best reproduces the unquantized
# model on the calibration text; on held-out text that target does worse than W in the worst domain, and
# stronger damping (0.1 of mean diag H, against 0.01) helps it again. Measured on the 270M (the shipped
# calibration mix, 64 x 512; llama.cpp's KLD vs F32, 20 x 512 per domain, WikiText / code / chat / French;
# llama-quantize --imatrix in brackets):
#   q4_0     fp_targets 0.117 / 0.060 / 0.048 / 0.118, none 0.118 / 0.074 / 0.069 / 0.134, none and damp 0.1
#            0.114 / 0.084 / 0.078 / 0.127  [0.192 / 0.220 / 0.209 / 0.224]: worst 0.61x -> 0.59x (a tie)
#   q3_k_m   0.091 / 0.048 / 0.039 / 0.100, 0.078 / 0.055 / 0.048 / 0.092, 0.076 / 0.056 / 0.054 / 0.091
#            [0.104 / 0.115 / 0.129 / 0.145]: worst 0.88x -> 0.72x
#   iq4_xs   0.082 / 0.045 / 0.036 / 0.079, 0.070 / 0.046 / 0.040 / 0.072, 0.066 / 0.044 / 0.041 / 0.064
#            [0.087 / 0.091 / 0.092 / 0.097]: worst 0.94x -> 0.76x
#   iq3_xxs  0.255 / 0.151 / 0.100 / 0.241, none 0.194 / 0.105 / 0.095 / 0.196 (damp 0.1 not measured)
#            [0.235 / 0.218 / 0.204 / 0.222]: worst 1.09x -> 0.88x
# The price is paid on the easier domains (q4_0 on code 0.27x -> 0.38x). The codebook files (LDLQ) keep damp
# 0.01: with shrink 0.25, damp 0.1 moved their worst domain by 0.01-0.02 (iq2_m WikiText / French / code / chat
# 0.253 / 0.247 / 0.151 / 0.147 -> 0.251 / 0.238 / 0.161 / 0.155 [0.362 / 0.381 / 0.337 / 0.328]; iq3_xxs
# 0.186 / 0.175 -> 0.182 / 0.172), a tie paid for on code and chat. The packed int4 path keeps fp_targets
# (measured on its own recipe).
# With ``--fp-targets`` asked for, a linear on a level table or codebook (OWN_TARGET_TYPES) still rounds
# towards W: that was the setting where fp_targets lost in every domain (iq3_xxs) or the worst (iq4_xs).
LEVEL_TABLE_TYPES = frozenset({GGMLQuantizationType.IQ4_NL, GGMLQuantizationType.IQ4_XS})
OWN_TARGET_TYPES = frozenset(CODEBOOK_TYPES) | LEVEL_TABLE_TYPES
GGUF_DAMP = 0.1
# Shrinking H a quarter of the way towards its diagonal (``hessian_shrink``) lowered the worst domain where
# the main type is a uniform or codebook grid, and tied on IQ4_XS's level table. Same setup, WikiText / French
# (llama-quantize --imatrix in brackets):
#   q4_0     0.112 / 0.125 -> 0.113 / 0.120  [0.191 / 0.223]: worst 0.58x -> 0.59x (a tie), French 0.56x -> 0.54x
#   q3_k_m   0.075 / 0.093 -> 0.071 / 0.090  [0.104 / 0.145]: worst 0.72x -> 0.68x
#   iq3_xxs  0.194 / 0.183 -> 0.184 / 0.163  [0.235 / 0.223]: worst 0.83x -> 0.78x
#   iq4_xs   0.063 / 0.064 -> 0.064 / 0.065  [0.087 / 0.097]: 0.72x -> 0.74x (a tie): left at 0
# (a shrink of 0.5 on q3_k_m: 0.073 / 0.089; damp 0.3 instead: 0.079 / 0.099, worse than 0.1).
GGUF_SHRINK = 0.25
# After GPTQ, two sweeps of coordinate descent over the codes in GPTQ's own metric (damped, shrunk H), then the
# single-scale blocks' fp16 d (and m) refitted by least squares (quant.descent). Same setup, WikiText / French
# (llama-quantize --imatrix in brackets):
#   q4_0     0.1125 / 0.1227 -> 0.1037 / 0.1116  [0.191 / 0.223]: worst 0.59x -> 0.54x (the codes alone:
#            0.1094 / 0.1144; the scales by two conjugate-gradient iterations, as now: 0.1055 / 0.1108)
#   q3_k_m   0.0706 / 0.0894 -> 0.0671 / 0.0831  [0.104 / 0.145]: worst 0.68x -> 0.645x (6 sweeps: 0.0673 /
#            0.0817; 2 sweeps in H itself, undamped: 0.0703 / 0.0886; the codes alone: 0.0703 / 0.0872; the
#            scales alone: 0.0709 / 0.0863)
#   q2_k     0.1690 / 0.1770 -> 0.1637 / 0.1688  [0.308 / 0.334]: worst 0.55x -> 0.53x
# On level tables it tied in the worst domain, so linears on IQ4_NL / IQ4_XS keep GPTQ's codes
# (descent.descends): iq4_xs (all its linears IQ4_NL / IQ4_XS) 0.0625 / 0.0680 -> 0.0613 / 0.0645
# [0.087 / 0.097], iq3_xxs (IQ4_NL, Q5_0 attn_v, codebook o / down) 0.1835 / 0.1723 -> 0.1875 / 0.1653
# [0.235 / 0.223]. A sweep costs about one GPTQ pass.
GGUF_DESCENT_SWEEPS = 2


def gguf_defaults(gguf_type: str | None) -> dict[str, Any]:
    """What a ``quantize --format gguf --type gguf_type`` run changes in the defaults (no recipe named): no
    fp_targets; damp 0.1 where the main type is not a codebook i-quant; H shrunk towards its diagonal where it
    is not a level table (IQ4_NL / IQ4_XS); uniform-grid linears descended after GPTQ."""
    main = FILE_TYPES[gguf_type][0] if gguf_type in FILE_TYPES else None
    if main is None or main in FLOAT_TYPES:
        return {}
    return (
        {"fp_targets": False}
        | ({} if main in CODEBOOK_TYPES else {"damp": GGUF_DAMP})
        | ({} if main in LEVEL_TABLE_TYPES else {"hessian_shrink": GGUF_SHRINK})
        | {"descent_sweeps": GGUF_DESCENT_SWEEPS}
    )


def best_defaults(method: str | None, bits: int | None, fast: bool = False) -> dict[str, Any]:
    """The base when no recipe is named (None = the field's default): for GPTQ the best grid for ``bits``,
    and unless ``fast`` the best GPTQ settings. RTN keeps the plain settings (the baseline GPTQ must beat)."""
    if (method or QuantizeOptions.method) != "gptq":
        return {}
    out: dict[str, Any] = {} if fast else dict(BEST_GPTQ)
    if (bits or QuantizeOptions.bits) == 4:
        out.update(BEST_INT4_GRID)
    return out


def resolve_options(recipe: str | None = None, fast: bool = False, **overrides: Any) -> QuantizeOptions:
    """The base (``best_defaults``, or plain ``QuantizeOptions()`` under a recipe), then the recipe, then
    CLI flags (None = not given)."""
    if recipe and fast:
        raise QuantkitError("--fast and --recipe: choose one (a recipe names every setting it changes)")
    base = load_recipe(recipe) if recipe else best_defaults(overrides.get("method"), overrides.get("bits"), fast)
    try:
        opts = QuantizeOptions(**base)
    except TypeError as e:
        raise QuantkitError(f"recipe {recipe}: {e}") from None
    return opts.replace(**overrides)
