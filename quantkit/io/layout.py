"""What a Gemma 2/3 checkpoint holds: tensor names and shapes implied by config.json, and the forms a decoder
linear may take (dense weight, compressed-tensors pack-quantized, or ggml blocks), with the checks that a
checkpoint's headers match them.

A linear of shape [O, I] is stored as one of:
    dense        {name}.weight [O, I] in BF16, F16 or F32
    packed       {name}.weight_packed I32 [O, ceil(I*b/32)], weight_scale [O, G], weight_shape [2],
                 weight_zero_point I32 [ceil(O*b/32), G] (asymmetric only); G groups per row
    ggml blocks  {name}.ggml_blocks U8 [O, I / block * block bytes], ggml_type I32 [1], weight_shape [2]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.errors import QuantkitError
from quantkit.io.config import ModelConfig
from quantkit.io.dtypes import FLOAT_NAMES
from quantkit.quant.primitives import QuantSpec

if TYPE_CHECKING:
    from quantkit.io.checkpoint import Checkpoint

EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"  # tied to the embedding; never read
# Multimodal Gemma 3 checkpoints keep the text model under this prefix; vision tensors are dropped.
_PREFIX_MAP = (("language_model.model.", "model."), ("model.language_model.", "model."))
_DROP_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)

# dtype of each tensor of a quantized linear, by its name's last part
BLOCK_DTYPES = {"ggml_blocks": ("U8",), "ggml_type": ("I32",), "weight_shape": ("I64",)}
PACKED_DTYPES = {"weight_packed": ("I32",), "weight_zero_point": ("I32",), "weight_shape": ("I64", "I32"),
                 "weight_scale": FLOAT_NAMES}  # fmt: skip


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def layer_members(names: Iterable[str], i: int, exclude: set[str] = frozenset()) -> dict[str, str]:
    """Decoder layer ``i``'s tensors among ``names``: name inside the layer ('mlp.up_proj.weight') -> full name,
    except those named in ``exclude``."""
    p = layer_prefix(i)
    return {n[len(p) :]: n for n in names if n.startswith(p) and n[len(p) :] not in exclude}


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Module name inside a decoder layer -> weight shape, in HF order (norms [H] or [Dh], linears [O, I])."""
    h, d = cfg.hidden_size, cfg.head_dim
    lin = cfg.linear_shapes()
    shapes: dict[str, tuple[int, ...]] = {"input_layernorm": (h,)}
    shapes |= {n: lin[n] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")}
    if cfg.has_qk_norm:
        shapes |= {"self_attn.q_norm": (d,), "self_attn.k_norm": (d,)}
    shapes |= {"post_attention_layernorm": (h,), "pre_feedforward_layernorm": (h,)}
    shapes |= {n: lin[n] for n in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    shapes["post_feedforward_layernorm"] = (h,)
    return shapes


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for every tensor a Gemma 2/3 text checkpoint must hold (the embedding, which
    may carry padding rows, is checked separately)."""
    shapes: dict[str, tuple[int, ...]] = {"model.norm.weight": (cfg.hidden_size,)}
    per_layer = layer_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        shapes |= {f"{layer_prefix(i)}{n}.weight": s for n, s in per_layer.items()}
    return shapes


def canonical_name(stored: str) -> str | None:
    """A stored tensor name as the text model's HF name; None for a tensor the text model does not use."""
    if stored.startswith(_DROP_PREFIXES) or stored == HEAD:
        return None
    for old, new in _PREFIX_MAP:
        if stored.startswith(old):
            return new + stored[len(old) :]
    return stored


def quant_spec_from_config(raw: dict, source: str) -> QuantSpec | None:
    """The weight grid of a compressed-tensors pack-quantized checkpoint, or None for a dense one (or one
    whose linears are ggml blocks)."""
    qc = raw.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise QuantkitError(f"{source}: quantization_config is {qc!r}, not an object")
    if (qc.get("quant_method"), qc.get("format")) == ("quantkit", "ggml-blocks"):
        return None
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "pack-quantized":
        raise QuantkitError(
            f"{source}: quantization_config {qc.get('quant_method')!r}/{qc.get('format')!r} is not read; "
            "quantkit reads compressed-tensors pack-quantized checkpoints"
        )
    groups = qc.get("config_groups")
    groups = list(groups.values()) if isinstance(groups, dict) else []
    w = groups[0].get("weights") if len(groups) == 1 and isinstance(groups[0], dict) else None
    if not isinstance(w, dict) or w.get("type") != "int":
        raise QuantkitError(f"{source}: expected one int weight scheme in quantization_config.config_groups")
    bits, sym, group = w.get("num_bits"), w.get("symmetric"), w.get("group_size")
    if w.get("strategy") == "channel":
        group = -1
    elif w.get("strategy") != "group":
        raise QuantkitError(f"{source}: weights strategy {w.get('strategy')!r} is not read (group or channel)")
    for key, value, ok in (
        ("num_bits", bits, isinstance(bits, int) and not isinstance(bits, bool)),
        ("symmetric", sym, isinstance(sym, bool)),
        ("group_size", group, isinstance(group, int) and not isinstance(group, bool)),
    ):
        if not ok:
            raise QuantkitError(f"{source}: quantization_config weights.{key} is {value!r} (missing or mistyped)")
    return QuantSpec(bits=bits, group_size=group, sym=sym)


def check_layout(ckpt: Checkpoint) -> None:
    """Every tensor config.json implies is there with its shape and a float dtype (or as a quantized linear
    in one of the forms above), the embedding holds at least the vocabulary, and nothing else is stored."""
    cfg = ckpt.config
    known = {EMBEDDING}
    for name, shape in expected_shapes(cfg).items():
        module = name.removesuffix(".weight")
        if ckpt.has_blocks(module):
            known |= _check_blocks(ckpt, module, shape)
        elif ckpt.quant_spec is not None and ckpt.is_linear_quantized(module):
            known |= _check_packed(ckpt, module, shape)
        else:
            _check_dense(ckpt, name, shape)
            known.add(name)
    extra = sorted(set(ckpt.locations) - known)
    if extra:
        raise QuantkitError(
            f"{ckpt.path}: unexpected tensor {extra[0]!r} ({len(extra)} in all) for a "
            f"{cfg.num_hidden_layers}-layer {cfg.architecture} (check num_hidden_layers in config.json)"
        )
    _check_embedding(ckpt)
    for name in known:
        dt = ckpt.dtype_of(name)
        if name.rsplit(".", 1)[-1] not in PACKED_DTYPES | BLOCK_DTYPES and dt not in FLOAT_NAMES:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} has dtype {dt}; expected BF16, F16 or F32")


def _check_dense(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> None:
    if name not in ckpt.locations:
        raise QuantkitError(f"{ckpt.path}: tensor {name!r} missing from the checkpoint")
    got = ckpt.shape_of(name)
    if got != shape:
        shard = ckpt.locations[name][0]
        raise QuantkitError(
            f"{ckpt.path / shard}: tensor {name!r} has shape {list(got)}, config.json implies {list(shape)}"
        )


def _check_embedding(ckpt: Checkpoint) -> None:
    """The embedding [V', H] may carry padding rows beyond the vocabulary (V' >= V)."""
    cfg = ckpt.config
    if EMBEDDING not in ckpt.locations:
        raise QuantkitError(f"{ckpt.path}: tensor {EMBEDDING!r} missing from the checkpoint")
    got = ckpt.shape_of(EMBEDDING)
    if len(got) != 2 or got[1] != cfg.hidden_size or got[0] < cfg.vocab_size:
        raise QuantkitError(
            f"{ckpt.path}: {EMBEDDING} has shape {list(got)}, config.json implies [{cfg.vocab_size}, {cfg.hidden_size}]"
        )


def _check_weight_shape(ckpt: Checkpoint, module: str, shape: tuple[int, ...]) -> None:
    got = tuple(int(v) for v in ckpt.get(f"{module}.weight_shape"))
    if got != shape:
        raise QuantkitError(f"{ckpt.path}: {module}.weight_shape is {list(got)}, config.json implies {list(shape)}")


def _check_packed(ckpt: Checkpoint, module: str, shape: tuple[int, ...]) -> set[str]:
    """Dtypes and shapes of one pack-quantized linear's tensors (from the headers); returns their names."""
    spec = ckpt.quant_spec
    parts = [p for p in PACKED_DTYPES if p != "weight_zero_point" or not spec.sym]
    o, i = shape
    want = {
        "weight_packed": (o, -(-i * spec.bits // 32)),
        "weight_scale": (o, spec.groups(i)),
        "weight_shape": (2,),
        "weight_zero_point": (-(-o * spec.bits // 32), spec.groups(i)),
    }
    for part in parts:
        name = f"{module}.{part}"
        if name not in ckpt.locations:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} missing from the quantized checkpoint")
        dt, got = ckpt.dtype_of(name), ckpt.shape_of(name)
        if dt not in PACKED_DTYPES[part]:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} is {dt}; expected {' or '.join(PACKED_DTYPES[part])}")
        if got != want[part]:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} has shape {list(got)}, expected {list(want[part])}")
    _check_weight_shape(ckpt, module, shape)
    return {f"{module}.{p}" for p in parts}


def _check_blocks(ckpt: Checkpoint, module: str, shape: tuple[int, ...]) -> set[str]:
    """Dtypes and shapes of one linear stored as ggml blocks; returns their tensor names."""
    names = {part: f"{module}.{part}" for part in BLOCK_DTYPES}
    for part, name in names.items():
        if name not in ckpt.locations:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} missing from the quantized checkpoint")
        dt = ckpt.dtype_of(name)
        if dt not in BLOCK_DTYPES[part]:
            raise QuantkitError(f"{ckpt.path}: tensor {name!r} is {dt}; expected {BLOCK_DTYPES[part][0]}")
    _check_weight_shape(ckpt, module, shape)
    try:
        qtype = GGMLQuantizationType(int(ckpt.get(names["ggml_type"])[0]))
    except ValueError:
        raise QuantkitError(f"{ckpt.path}: {module}.ggml_type is not a ggml type id") from None
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    o, i = shape
    if i % block or ckpt.shape_of(names["ggml_blocks"]) != (o, i // block * block_bytes):
        raise QuantkitError(f"{ckpt.path}: {module}.ggml_blocks does not hold {list(shape)} {qtype.name} weights")
    return set(names.values())
