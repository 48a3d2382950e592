"""llama-quantize's choice of ggml type for each tensor of a GGUF file type, for Gemma 2 / Gemma 3.

A file type (``--type q4_k_m``) names a main type; llama-quantize then gives some tensors another one: the
tied embedding (also the output) more bits, the mixes more bits on attn_v / ffn_down / attn_output of some
layers (``MIX_RULES``), and a fallback where a row's length is not a multiple of the type's block. Norms are
always F32. Q2_K_S needs an importance matrix for its Q2_K weights, IQ3_XXS / IQ3_XS files for their IQ3_XXS
and IQ2_S weights, IQ2_* files for their IQ2 weights, IQ1_S / IQ1_M files for their IQ1 and IQ2_XXS weights
(``requires_imatrix``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.blocks import GGUF_PY_TYPES, NUMPY_QUANTIZERS, TORCH_QUANTIZERS, block_size, row_bytes
from quantkit.formats.gguf.file_types import FILE_TYPE_NAMES, PURE
from quantkit.formats.gguf.names import GLOBAL_TENSORS, HF_KINDS, LAYER_TENSORS
from quantkit.io.config import ModelConfig
from quantkit.io.dtypes import FLOAT_NAMES, TORCH_DTYPES
from quantkit.io.layout import layer_shapes

# --type -> (type of the 2-D weights, general.file_type)
FILE_TYPES: dict[str, tuple[QT, FT]] = {k: (QT[t], FT[f]) for k, (t, f) in FILE_TYPE_NAMES.items()}
# the float ggml types, which are the safetensors dtypes of the same name -> torch dtype
TORCH_FLOATS = {QT[name]: TORCH_DTYPES[name] for name in FLOAT_NAMES}
FLOAT_TYPES = tuple(TORCH_FLOATS)

# every ggml type quantkit encodes (a --tensor-type override may name any of them)
ENCODABLE = tuple(dict.fromkeys((*GGUF_PY_TYPES, *TORCH_QUANTIZERS, *NUMPY_QUANTIZERS)))

FALLBACK = {
    QT.Q2_K: QT.Q4_0,
    QT.Q3_K: QT.Q4_0,
    QT.Q4_K: QT.Q5_0,
    QT.Q5_K: QT.Q5_1,
    QT.Q6_K: QT.Q8_0,
    QT.IQ4_XS: QT.IQ4_NL,
    QT.IQ3_XXS: QT.IQ4_NL,
    QT.IQ3_S: QT.IQ4_NL,
    QT.IQ2_S: QT.IQ4_NL,
    QT.IQ2_XXS: QT.IQ4_NL,
    QT.IQ2_XS: QT.IQ4_NL,
    QT.Q2_0: QT.Q4_0,
    QT.IQ1_S: QT.IQ4_NL,
    QT.IQ1_M: QT.IQ4_NL,
}
# llama-quantize's tensor_requires_imatrix: weights of these types (the token embedding and output excepted)
# need an importance matrix, and so do Q2_K ones in a Q2_K_S file
IMATRIX_TYPES = (QT.IQ3_XXS, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ1_M, QT.IQ1_S)
# the file types whose tied embedding (also the output) gets Q5_K rather than Q6_K
EMBD_Q5_K = (
    FT.MOSTLY_IQ3_XXS,
    FT.MOSTLY_IQ2_XXS,
    FT.MOSTLY_IQ2_XS,
    FT.MOSTLY_IQ2_S,
    FT.MOSTLY_IQ2_M,
    FT.MOSTLY_IQ1_S,
    FT.MOSTLY_IQ1_M,
)
IQ2_LOW, IQ2_HIGH = (FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS), (FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M)


def tensor_kind(name: str) -> str:
    """'blk.3.attn_v.weight', 'model.layers.3.self_attn.v_proj.weight' or 'v_proj' -> 'attn_v'."""
    parts = name.removesuffix(".weight").split(".")
    return HF_KINDS.get(parts[-1], parts[-1])


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama-quant.cpp: the first and last eighth of the layers, and every third layer in between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def fallback_type(qtype: QT, row_len: int) -> QT:
    """llama-quantize's substitute when row_len is not a multiple of qtype's block (F16 as a last resort); a
    one-line error for a type of a larger block without one (Q1_0), as llama-quantize's."""
    if row_len % block_size(qtype) == 0:
        return qtype
    if qtype not in FALLBACK and block_size(qtype) > 32:  # Q1_0: llama-quantize throws, so does quantkit
        raise QuantkitError(
            f"rows of {row_len} are not a multiple of {qtype.name}'s block of {block_size(qtype)}, and "
            f"llama-quantize defines no fallback type for {qtype.name}"
        )
    alt = FALLBACK.get(qtype, QT.F16)
    return alt if row_len % block_size(alt) == 0 else QT.F16


Rule = Callable[[int, int, int], "QT | None"]
_BITS = lambda t: lambda i, n, g: t if use_more_bits(i, n) else None  # noqa: E731
_FIRST_EIGHTH = lambda t: lambda i, n, g: t if i < n // 8 else None  # noqa: E731
_GQA4 = lambda t: lambda i, n, g: t if g >= 4 else None  # noqa: E731
_ALWAYS = lambda t: lambda i, n, g: t  # noqa: E731
_MIDDLE = lambda t: lambda i, n, g: t if n // 8 <= i < 7 * n // 8 else None  # noqa: E731
# llama_tensor_get_type_impl for a dense Gemma (no experts, not Falcon, not a 70B), without an imatrix:
# GGUF kind -> file type -> rule (layer i, n_layers n, n_gqa g) -> the weight's type, None: the file's main
# type. llama-quantize visits tensors layer by layer, so its counters i_attention_wv and i_ffn_down are the
# layer index; n_gqa is n_head / n_head_kv.
MIX_RULES: dict[str, dict[FT, Rule]] = {
    "attn_v": {
        FT.MOSTLY_Q2_K: lambda i, n, g: QT.Q4_K if g >= 4 else QT.Q3_K,
        FT.MOSTLY_Q2_K_S: _GQA4(QT.Q4_K),
        FT.MOSTLY_Q3_K_M: lambda i, n, g: QT.Q5_K if i < 2 else QT.Q4_K,
        FT.MOSTLY_Q3_K_L: _ALWAYS(QT.Q5_K),
        FT.MOSTLY_IQ4_NL: _GQA4(QT.Q5_K),
        FT.MOSTLY_IQ4_XS: _GQA4(QT.Q5_K),
        FT.MOSTLY_Q4_K_M: _BITS(QT.Q6_K),
        FT.MOSTLY_Q5_K_M: _BITS(QT.Q6_K),
        FT.MOSTLY_Q4_K_S: lambda i, n, g: QT.Q5_K if i < 4 else None,
        FT.MOSTLY_IQ3_XXS: lambda i, n, g: QT.Q4_K if g >= 4 else QT.IQ3_S,  # IQ3_XXS with an imatrix (IMATRIX_RULES)
        FT.MOSTLY_IQ3_XS: _GQA4(QT.Q4_K),
        FT.MOSTLY_IQ3_S: _GQA4(QT.Q4_K),
        FT.MOSTLY_IQ3_M: _ALWAYS(QT.Q4_K),
        **{f: lambda i, n, g: QT.Q4_K if g >= 4 else QT.Q2_K for f in IQ2_LOW},
        **{f: lambda i, n, g: QT.Q4_K if g >= 4 else QT.IQ3_S for f in IQ2_HIGH},
        FT.MOSTLY_IQ1_S: lambda i, n, g: QT.Q4_K if g >= 4 else QT.Q2_K,
        FT.MOSTLY_IQ1_M: lambda i, n, g: QT.Q4_K if g >= 4 else QT.Q2_K,
    },
    "attn_k": {FT.MOSTLY_IQ3_XS: _ALWAYS(QT.IQ3_XXS), FT.MOSTLY_IQ3_XXS: _ALWAYS(QT.IQ2_S)},
    "attn_q": {FT.MOSTLY_IQ3_XS: _ALWAYS(QT.IQ3_XXS), FT.MOSTLY_IQ3_XXS: _ALWAYS(QT.IQ2_S)},
    "ffn_gate": {FT.MOSTLY_IQ3_XS: _MIDDLE(QT.IQ3_XXS)},
    "ffn_up": {FT.MOSTLY_IQ3_XS: _MIDDLE(QT.IQ3_XXS)},
    "ffn_down": {
        FT.MOSTLY_Q2_K: _ALWAYS(QT.Q3_K),
        FT.MOSTLY_Q2_K_S: _FIRST_EIGHTH(QT.Q4_K),
        FT.MOSTLY_Q3_K_M: lambda i, n, g: QT.Q5_K if i < n // 16 else QT.Q4_K,
        FT.MOSTLY_Q3_K_L: _ALWAYS(QT.Q5_K),
        FT.MOSTLY_Q4_K_M: _BITS(QT.Q6_K),
        FT.MOSTLY_IQ4_NL: _FIRST_EIGHTH(QT.Q5_K),
        FT.MOSTLY_IQ4_XS: _FIRST_EIGHTH(QT.Q5_K),
        FT.MOSTLY_Q5_K_M: _BITS(QT.Q6_K),
        FT.MOSTLY_Q4_K_S: _FIRST_EIGHTH(QT.Q5_K),
        FT.MOSTLY_IQ3_XXS: lambda i, n, g: QT.Q4_K if i < n // 8 else QT.Q3_K,  # main type with an imatrix
        FT.MOSTLY_IQ3_M: _FIRST_EIGHTH(QT.Q4_K),
        **{f: _FIRST_EIGHTH(QT.Q2_K) for f in IQ2_LOW},
        **{f: _FIRST_EIGHTH(QT.IQ3_S) for f in IQ2_HIGH},
        FT.MOSTLY_IQ1_S: _FIRST_EIGHTH(QT.Q2_K),
        FT.MOSTLY_IQ1_M: _FIRST_EIGHTH(QT.Q2_K),
    },
    "attn_output": {
        FT.MOSTLY_Q2_K: _ALWAYS(QT.Q3_K),
        FT.MOSTLY_Q3_K_M: _ALWAYS(QT.Q4_K),
        FT.MOSTLY_Q3_K_L: _ALWAYS(QT.Q5_K),
        FT.MOSTLY_IQ3_XXS: _ALWAYS(QT.IQ3_S),
        FT.MOSTLY_IQ3_M: _ALWAYS(QT.Q4_K),
        **{f: _ALWAYS(QT.IQ3_S) for f in IQ2_HIGH},
        FT.MOSTLY_IQ1_S: _ALWAYS(QT.IQ2_XXS),
        FT.MOSTLY_IQ1_M: _ALWAYS(QT.IQ2_XXS),
    },
}


# with an importance matrix (llama-quant.cpp's qs.has_imatrix) some rules change: ffn_down's IQ4_NL / IQ4_XS
# keep their first eighth in the main type, Q4_0 / Q5_0 put it in Q4_1 / Q5_1, IQ3_XXS keeps the main type;
# IQ3_XXS's attn_v stays IQ3_XXS below n_gqa 4
IMATRIX_RULES: dict[str, dict[FT, Rule | None]] = {
    "ffn_down": {
        FT.MOSTLY_IQ4_NL: None,
        FT.MOSTLY_IQ4_XS: None,
        FT.MOSTLY_Q4_0: _FIRST_EIGHTH(QT.Q4_1),
        FT.MOSTLY_Q5_0: _FIRST_EIGHTH(QT.Q5_1),
        FT.MOSTLY_IQ3_XXS: None,
    },
    "attn_v": {FT.MOSTLY_IQ3_XXS: _GQA4(QT.Q4_K)},
}


def weight_type(
    qtype: str,
    hf_or_gguf_kind: str,
    layer: int | None,
    n_layers: int,
    row_len: int,
    n_gqa: int = 1,
    imatrix: bool = False,
) -> QT:
    """llama-quantize's type for one weight of a ``qtype`` file (kind: GGUF or HF, e.g. 'attn_v', 'v_proj').

    Float files keep every weight in their type. Otherwise the tied embedding (the output too) gets Q6_K (Q5_K
    in IQ3_XXS, IQ2_* and IQ1_* files; Q8_0 in Q8_0 files, and where its row is not a multiple of the main type's
    block), the mixes' rules (``MIX_RULES``) pick other types for some layer weights, and then a row not a
    multiple of the type's block falls back (Q2_K / Q3_K / Q2_0 -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
    IQ4_XS / IQ3_* / IQ2_* / IQ1_* -> IQ4_NL, else F16). Norms are F32. ``imatrix``: llama-quantize was given an
    importance matrix (``IMATRIX_RULES``)."""
    kind = tensor_kind(hf_or_gguf_kind)
    if kind.endswith("norm"):
        return QT.F32
    main, ftype = FILE_TYPES[qtype]
    if main in FLOAT_TYPES:
        return main
    if kind == "token_embd":
        if main == QT.Q8_0 or row_len % block_size(main):
            return fallback_type(QT.Q8_0, row_len)
        return fallback_type(QT.Q5_K if ftype in EMBD_Q5_K else QT.Q6_K, row_len)
    rules = MIX_RULES.get(kind, {})
    if imatrix and kind in IMATRIX_RULES:
        rules = {k: v for k, v in rules.items() if k not in IMATRIX_RULES[kind]} | IMATRIX_RULES[kind]
    rule = None if qtype in PURE else rules.get(ftype)
    if rule is not None:
        if layer is None:
            raise ValueError(f"{kind} needs a layer index")
        main = rule(layer, n_layers, n_gqa) or main
    return fallback_type(main, row_len)


def q4_k_m_type(hf_or_gguf_kind: str, layer: int | None, n_layers: int, row_len: int) -> QT:
    """``weight_type`` for Q4_K_M."""
    return weight_type("q4_k_m", hf_or_gguf_kind, layer, n_layers, row_len)


def requires_imatrix(qtype: str, t: PlannedTensor) -> bool:
    """llama-quantize's tensor_requires_imatrix, on the type a weight finally gets (after the row-length
    fallback): the IQ3_XXS / IQ2 / IQ1 types, and Q2_K in a Q2_K_S file; the token embedding excepted."""
    if t.gguf_name.startswith(("token_embd.", "output.")):
        return False
    return t.qtype in IMATRIX_TYPES or (t.qtype == QT.Q2_K and FILE_TYPES[qtype][1] == FT.MOSTLY_Q2_K_S)


@dataclass(frozen=True)
class PlannedTensor:
    gguf_name: str
    hf_name: str  # e.g. model.layers.0.self_attn.q_proj.weight
    shape: tuple[int, ...]  # numpy order: [O, I] for weights, [n] for norms
    qtype: QT

    @property
    def is_norm(self) -> bool:
        return self.hf_name.endswith("norm.weight")

    @property
    def nbytes(self) -> int:
        return self.shape[0] * row_bytes(self.qtype, self.shape[1]) if len(self.shape) == 2 else 4 * self.shape[0]


@dataclass(frozen=True)
class Override:
    """``--tensor-type PATTERN=TYPE``, as llama-quantize reads it: PATTERN (lower-cased) is a regular
    expression searched in each GGUF tensor name ('attn_v', 'blk\\.1[0-9]\\.ffn_down'); the first override
    that matches a weight gives its type, in place of the file type's rules, before the row-length fallback."""

    pattern: str
    qtype: QT

    def matches(self, gguf_name: str) -> bool:
        return re.search(self.pattern, gguf_name) is not None


def parse_override(text: str) -> Override:
    """'attn_v=q8_0' -> Override('attn_v', Q8_0); a malformed one is a one-line error."""
    pattern, sep, name = text.partition("=")
    if not sep or not pattern or not name:
        raise QuantkitError(f"--tensor-type {text!r}: expected PATTERN=TYPE, e.g. attn_v=q8_0")
    pattern = pattern.lower()
    try:
        re.compile(pattern)
    except re.error as e:
        raise QuantkitError(f"--tensor-type {text!r}: {pattern!r} is not a regular expression ({e})") from None
    qtype = next((t for t in ENCODABLE if t.name.lower() == name.lower()), None)
    if qtype is None:
        names = ", ".join(t.name.lower() for t in ENCODABLE)
        raise QuantkitError(f"--tensor-type {text!r}: quantkit does not encode {name!r} (choose from {names})")
    return Override(pattern, qtype)


def check_overrides(qtype: str, overrides: Sequence[Override]) -> None:
    """llama-quantize ignores --tensor-type in a float file; quantkit says so instead."""
    if overrides and FILE_TYPES[qtype][0] in FLOAT_TYPES:
        raise QuantkitError(f"--tensor-type needs a quantized --type ({qtype} keeps every weight as it is)")


# ------------------------------------------------------------------------------------------ type choice


def plan_tensors(
    cfg: ModelConfig, qtype: str, imatrix: bool = False, overrides: Sequence[Override] = ()
) -> list[PlannedTensor]:
    """Every GGUF tensor in file order, with its HF source name, shape and ggml type (``imatrix``: as
    llama-quantize chooses them when given an importance matrix); ``overrides`` as llama-quantize's
    --tensor-type. As in llama-quantize, an overridden weight skips the rules, so it does not advance their
    per-kind counter (the layer index of the rules for attn_v and ffn_down)."""
    if qtype not in FILE_TYPES:
        raise QuantkitError(f"GGUF type {qtype!r} is not supported (choose from {', '.join(FILE_TYPES)})")
    check_overrides(qtype, overrides)
    n, h = cfg.num_hidden_layers, cfg.hidden_size
    n_gqa = cfg.num_attention_heads // cfg.num_key_value_heads
    shapes = layer_shapes(cfg)
    seen: dict[str, int] = {}  # kind -> weights of that kind the rules have typed so far

    def planned(gguf_name: str, hf_name: str, shape: tuple[int, ...], layer: int | None) -> PlannedTensor:
        kind = gguf_name.split(".")[-2]
        if len(shape) == 1:
            return PlannedTensor(gguf_name, hf_name, shape, QT.F32)
        manual = next((o.qtype for o in overrides if o.matches(gguf_name)), None)
        if manual is not None:
            return PlannedTensor(gguf_name, hf_name, shape, fallback_type(manual, shape[1]))
        i = seen.get(kind, 0)
        seen[kind] = i + 1
        t = weight_type(qtype, kind, None if layer is None else i, n, shape[1], n_gqa, imatrix)
        return PlannedTensor(gguf_name, hf_name, shape, t)

    emb, norm = GLOBAL_TENSORS["model.embed_tokens"], GLOBAL_TENSORS["model.norm"]
    plan = [planned(f"{emb}.weight", "model.embed_tokens.weight", (cfg.vocab_size, h), None)]
    for i in range(n):
        for hf, kind in LAYER_TENSORS.items():
            if hf in shapes:
                plan.append(planned(f"blk.{i}.{kind}.weight", f"model.layers.{i}.{hf}.weight", shapes[hf], i))
    plan.append(planned(f"{norm}.weight", "model.norm.weight", (h,), None))
    return plan


def retype(plan: list[PlannedTensor], types: Mapping[str, QT]) -> list[PlannedTensor]:
    """``plan`` with the types of ``types`` (GGUF name -> ggml type, e.g. a budget mix), each through
    llama.cpp's row-length fallback; norms stay F32. A name not in the plan is a bug, not a user error."""
    names = {t.gguf_name for t in plan}
    unknown = sorted(set(types) - names)
    if unknown:
        raise ValueError(f"types for tensors not in the file: {unknown[:4]}")
    out = []
    for t in plan:
        q = types.get(t.gguf_name, t.qtype)
        if q != t.qtype and q not in ENCODABLE and q not in FLOAT_TYPES:  # the plan's own: check_encodable's
            raise ValueError(f"{t.gguf_name}: quantkit does not encode {q.name}")
        out.append(t if t.is_norm else PlannedTensor(t.gguf_name, t.hf_name, t.shape, fallback_type(q, t.shape[1])))
    return out
