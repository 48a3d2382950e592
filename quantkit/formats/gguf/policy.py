"""llama-quantize's choice of ggml type for each tensor of a GGUF file type, for Gemma 2 / Gemma 3.

A file type (``--type q4_k_m``) names a main type; llama-quantize then gives some tensors another one: the
tied embedding (also the output) more bits, the K mixes more bits on attn_v / ffn_down of some layers, and
a fallback where a row's length is not a multiple of the type's block. Norms are always F32.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.blocks import block_size, row_bytes
from quantkit.formats.gguf.file_types import FILE_TYPE_NAMES
from quantkit.formats.gguf.names import GLOBAL_TENSORS, HF_KINDS, LAYER_TENSORS
from quantkit.io.config import ModelConfig
from quantkit.io.dtypes import FLOAT_NAMES, TORCH_DTYPES
from quantkit.io.layout import layer_shapes

# --type -> (type of the 2-D weights, general.file_type)
FILE_TYPES: dict[str, tuple[QT, FT]] = {k: (QT[t], FT[f]) for k, (t, f) in FILE_TYPE_NAMES.items()}
# the float ggml types, which are the safetensors dtypes of the same name -> torch dtype
TORCH_FLOATS = {QT[name]: TORCH_DTYPES[name] for name in FLOAT_NAMES}
FLOAT_TYPES = tuple(TORCH_FLOATS)

FALLBACK = {QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def tensor_kind(name: str) -> str:
    """'blk.3.attn_v.weight', 'model.layers.3.self_attn.v_proj.weight' or 'v_proj' -> 'attn_v'."""
    parts = name.removesuffix(".weight").split(".")
    return HF_KINDS.get(parts[-1], parts[-1])


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama-quant.cpp: the first and last eighth of the layers, and every third layer in between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def fallback_type(qtype: QT, row_len: int) -> QT:
    """llama-quantize's substitute when row_len is not a multiple of qtype's block (F16 as a last resort)."""
    if row_len % block_size(qtype) == 0:
        return qtype
    alt = FALLBACK.get(qtype, QT.F16)
    return alt if row_len % block_size(alt) == 0 else QT.F16


K_MIXES = {"q3_k_m": QT.Q3_K, "q4_k_m": QT.Q4_K, "q5_k_m": QT.Q5_K}  # mix -> its default type


def k_mix_type(mix: str, hf_or_gguf_kind: str, layer: int | None, n_layers: int, row_len: int) -> QT:
    """Type llama-quantize gives a 2-D weight in a Q3_K_M / Q4_K_M / Q5_K_M file (tied embeddings, Gemma).

    token_embd (the tied output) -> Q6_K. Q4_K_M / Q5_K_M: attn_v and ffn_down on use_more_bits layers -> Q6_K.
    Q3_K_M: attn_v -> Q5_K on layers 0-1, else Q4_K; ffn_down -> Q5_K on the first n/16 layers, else Q4_K;
    attn_output -> Q4_K. Any other weight gets the mix's type; norms stay F32. Then the row-length fallback
    (Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, else F16)."""
    kind = tensor_kind(hf_or_gguf_kind)
    if kind.endswith("norm"):
        return QT.F32
    qtype = K_MIXES[mix]
    if kind == "token_embd":
        return fallback_type(QT.Q6_K, row_len)
    if kind in ("attn_v", "ffn_down") and layer is None:
        raise ValueError(f"{kind} needs a layer index")
    if mix == "q3_k_m":
        if kind == "attn_v":
            qtype = QT.Q5_K if layer < 2 else QT.Q4_K
        elif kind == "ffn_down":
            qtype = QT.Q5_K if layer < n_layers // 16 else QT.Q4_K
        elif kind == "attn_output":
            qtype = QT.Q4_K
    elif kind in ("attn_v", "ffn_down") and use_more_bits(layer, n_layers):
        qtype = QT.Q6_K
    return fallback_type(qtype, row_len)


def q4_k_m_type(hf_or_gguf_kind: str, layer: int | None, n_layers: int, row_len: int) -> QT:
    """``k_mix_type`` for Q4_K_M."""
    return k_mix_type("q4_k_m", hf_or_gguf_kind, layer, n_layers, row_len)


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


# ------------------------------------------------------------------------------------------ type choice


def weight_type(qtype: str, kind: str, layer: int | None, n_layers: int, row_len: int) -> QT:
    """llama-quantize's type for one 2-D weight of a ``qtype`` file (kind: GGUF kind, e.g. 'attn_v')."""
    if qtype in K_MIXES:
        return k_mix_type(qtype, kind, layer, n_layers, row_len)
    main = FILE_TYPES[qtype][0]
    if kind == "token_embd" and main not in (*FLOAT_TYPES, QT.Q8_0):
        main = QT.Q6_K  # the tied embedding is the output tensor
    return fallback_type(main, row_len)


def plan_tensors(cfg: ModelConfig, qtype: str) -> list[PlannedTensor]:
    """Every GGUF tensor in file order, with its HF source name, shape and ggml type."""
    if qtype not in FILE_TYPES:
        raise QuantkitError(f"GGUF type {qtype!r} is not supported (choose from {', '.join(FILE_TYPES)})")
    n, h = cfg.num_hidden_layers, cfg.hidden_size
    shapes = layer_shapes(cfg)

    def planned(gguf_name: str, hf_name: str, shape: tuple[int, ...], layer: int | None) -> PlannedTensor:
        kind = gguf_name.split(".")[-2]
        t = QT.F32 if len(shape) == 1 else weight_type(qtype, kind, layer, n, shape[1])
        return PlannedTensor(gguf_name, hf_name, shape, t)

    emb, norm = GLOBAL_TENSORS["model.embed_tokens"], GLOBAL_TENSORS["model.norm"]
    plan = [planned(f"{emb}.weight", "model.embed_tokens.weight", (cfg.vocab_size, h), None)]
    for i in range(n):
        for hf, kind in LAYER_TENSORS.items():
            if hf in shapes:
                plan.append(planned(f"blk.{i}.{kind}.weight", f"model.layers.{i}.{hf}.weight", shapes[hf], i))
    plan.append(planned(f"{norm}.weight", "model.norm.weight", (h,), None))
    return plan
