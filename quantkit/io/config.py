"""Model configuration read from a checkpoint's config.json (Gemma 2 and Gemma 3 text).

Values come from the file, with transformers' defaults for absent keys. Both the transformers 4.x style
(flat ``rope_theta``, ``rope_local_base_freq``, ``sliding_window_pattern``) and the 5.x style
(``rope_parameters`` per layer type, ``layer_types``) are read. Field names follow config.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

SLIDING, FULL = "sliding_attention", "full_attention"

# model_type -> (architecture name, defaults that differ between the two families)
_FAMILIES: dict[str, dict[str, Any]] = {
    "gemma2": {
        "arch": "Gemma2ForCausalLM",
        "vocab_size": 256000,
        "max_position_embeddings": 8192,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window_pattern": 2,
        "rope_global": 10000.0,
        "rope_local": 10000.0,
    },
    "gemma3_text": {
        "arch": "Gemma3ForCausalLM",
        "vocab_size": 262208,
        "max_position_embeddings": 131072,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "sliding_window_pattern": 6,
        "rope_global": 1_000_000.0,
        "rope_local": 10000.0,
    },
}
_SUPPORTED_ACTIVATIONS = {"gelu_pytorch_tanh", "gelu_tanh"}


@dataclass(frozen=True)
class ModelConfig:
    """The hyper-parameters the forward pass, quantizers and exporters need."""

    model_type: str  # "gemma2" | "gemma3_text"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_theta: float  # global (full-attention) layers
    rope_local_base_freq: float  # sliding layers
    rope_scaling_factor: float  # linear scaling on global layers (1.0 = none)
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    rms_norm_eps: float
    max_position_embeddings: int
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    torch_dtype: str = "bfloat16"

    @property
    def architecture(self) -> str:
        return _FAMILIES[self.model_type]["arch"]

    @property
    def has_qk_norm(self) -> bool:
        return self.model_type == "gemma3_text"

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def rope(self, layer: int) -> tuple[float, float]:
        """(base, linear scaling factor) of the rotary embedding used by ``layer``."""
        if self.is_sliding(layer):
            return self.rope_local_base_freq, 1.0
        return self.rope_theta, self.rope_scaling_factor

    def linear_parameters(self) -> int:
        """Weights in the decoder layers' linear projections, all layers: what quantization acts on."""
        return self.num_hidden_layers * sum(o * i for o, i in self.linear_shapes().values())

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of each linear projection in a decoder layer, keyed by its HF module suffix."""
        h, f, q, kv = (
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_key_value_heads,
        )
        d = self.head_dim
        return {
            "self_attn.q_proj": (q * d, h),
            "self_attn.k_proj": (kv * d, h),
            "self_attn.v_proj": (kv * d, h),
            "self_attn.o_proj": (h, q * d),
            "mlp.gate_proj": (f, h),
            "mlp.up_proj": (f, h),
            "mlp.down_proj": (h, f),
        }


INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38
MAX_LAYERS = 4096  # a sanity bound far above any real model: per-layer tables are built from this count


class _Values:
    """Typed, range-checked reads of config.json values; every refusal names the key and what it must be."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def bad(self, key: str, value: Any, must: str) -> QuantkitError:
        return QuantkitError(f"{self.source}: {key} is {value!r}; it must be {must} (fix config.json)")

    def int(self, key: str, default: Any = ..., minimum: int = 1, value: Any = ..., maximum: int = INT32_MAX) -> int:
        """An integer in [minimum, maximum]; sizes fit int32 as in llama.cpp, and every bound is checked before
        anything is built from the value (a corrupt size must not become a huge loop or allocation)."""
        if value is ...:
            if key not in self.raw and default is ...:
                raise QuantkitError(f"{self.source}: missing required key {key!r}")
            value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self.bad(key, value, f"an integer in {minimum}..{maximum}")
        return value

    def number(self, key: str, default: Any, positive: bool = True, optional: bool = False, value: Any = ...):
        value = self.raw.get(key, default) if value is ... else value
        if value is None and optional:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (positive and value <= 0) or value < 0 or value > FLOAT32_MAX:
            kind = "a positive number" if positive else "a number >= 0"
            kind += " within float32's range"  # GGUF stores these as f32
            raise self.bad(key, value, kind + (" or null" if optional else ""))
        return float(value)

    def token_id(self, key: str, default: int, vocab: int) -> int:
        value = self.raw.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise self.bad(key, value, f"a token id in 0..{vocab - 1}")
        return value

    def mapping(self, key: str) -> dict[str, Any] | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise self.bad(key, value, "an object or null")
        return value


def _rope(raw: dict[str, Any], fam: dict[str, Any], v: _Values) -> tuple[float, float, float]:
    """(global base, local base, global linear factor) from either config style."""
    global_base, local_base = fam["rope_global"], fam["rope_local"]
    scaling = v.mapping("rope_scaling")
    params = v.mapping("rope_parameters")
    if params is not None and (FULL in params or SLIDING in params):  # 5.x, per layer type
        full, slide = params.get(FULL) or {}, params.get(SLIDING) or {}
        if not isinstance(full, dict) or not isinstance(slide, dict):
            raise v.bad("rope_parameters", params, "an object of objects per layer type")
        global_base = full.get("rope_theta", raw.get("rope_theta", global_base))
        local_base = slide.get("rope_theta", raw.get("rope_local_base_freq", local_base))
        scaling = full if full.get("rope_type", "default") != "default" else scaling
    elif params is not None:  # 5.x, one set for every layer (Gemma 2)
        global_base = params.get("rope_theta", global_base)
        local_base = global_base
        scaling = params if params.get("rope_type", "default") != "default" else scaling
    else:
        global_base = raw.get("rope_theta", global_base)
        local_base = raw.get("rope_local_base_freq", global_base if raw["model_type"] == "gemma2" else local_base)
    factor = 1.0
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "default"):
            raise QuantkitError(f"{v.source}: rope scaling type {kind!r} is not supported (only linear)")
        if kind == "linear":
            factor = v.number("rope scaling factor", None, value=scaling.get("factor", 1.0))
    rope_theta = v.number("rope_theta", None, value=global_base)
    return rope_theta, v.number("rope_local_base_freq", None, value=local_base), factor


def _text_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Select the text part of a config and check it describes a Gemma 2 / Gemma 3 causal LM."""
    if raw.get("model_type") == "gemma3" and isinstance(raw.get("text_config"), dict):
        raw = {"model_type": "gemma3_text", **raw["text_config"]}
        raw["model_type"] = "gemma3_text"
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in _FAMILIES:
        archs = raw.get("architectures")
        raise QuantkitError(
            f"{source}: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
            "quantkit handles Gemma2ForCausalLM and Gemma3ForCausalLM"
        )
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if not isinstance(act, str) or act not in _SUPPORTED_ACTIVATIONS:
        raise QuantkitError(f"{source}: hidden activation {act!r} is not Gemma's tanh-GELU")
    if raw.get("attention_bias"):
        raise QuantkitError(f"{source}: attention_bias=true is not a Gemma 2/3 layout")
    return raw


def _layer_types(raw: dict[str, Any], fam: dict[str, Any], n_layers: int, v: _Values) -> tuple[str, ...]:
    layer_types = raw.get("layer_types")
    if layer_types is None:
        pattern = raw.get("sliding_window_pattern") or fam["sliding_window_pattern"]
        pattern = v.int("sliding_window_pattern", value=pattern)
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layers or not set(layer_types) <= {SLIDING, FULL}:
        raise QuantkitError(f"{v.source}: layer_types must list {n_layers} sliding/full entries")
    return tuple(layer_types)


def config_from_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A validated ModelConfig: every value typed and range-checked, defaults as transformers'."""
    if not isinstance(raw, dict):
        raise QuantkitError(f"{source}: expected a JSON object")
    raw = _text_config(raw, source)
    fam = _FAMILIES[raw["model_type"]]
    v = _Values(raw, source)
    n_layers = v.int("num_hidden_layers", maximum=MAX_LAYERS)
    n_heads = v.int("num_attention_heads")
    n_kv = v.int("num_key_value_heads", n_heads)
    if n_heads % n_kv:
        raise QuantkitError(f"{source}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    vocab = v.int("vocab_size", fam["vocab_size"])
    window = raw.get("sliding_window", raw.get("sliding_window_size", 4096))
    global_base, local_base, factor = _rope(raw, fam, v)
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    if not isinstance(dtype, str):
        raise v.bad("torch_dtype", dtype, "a dtype name")
    return ModelConfig(
        model_type=raw["model_type"],
        vocab_size=vocab,
        hidden_size=v.int("hidden_size"),
        intermediate_size=v.int("intermediate_size"),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=v.int("head_dim", value=raw.get("head_dim") or 256),
        query_pre_attn_scalar=v.number("query_pre_attn_scalar", 256),
        sliding_window=v.int("sliding_window", value=window) if window is not None else 1 << 30,
        layer_types=_layer_types(raw, fam, n_layers, v),
        rope_theta=global_base,
        rope_local_base_freq=local_base,
        rope_scaling_factor=factor,
        attn_logit_softcapping=v.number("attn_logit_softcapping", fam["attn_logit_softcapping"], optional=True),
        final_logit_softcapping=v.number("final_logit_softcapping", fam["final_logit_softcapping"], optional=True),
        rms_norm_eps=v.number("rms_norm_eps", 1e-6, positive=False),
        max_position_embeddings=v.int("max_position_embeddings", fam["max_position_embeddings"]),
        bos_token_id=v.token_id("bos_token_id", 2, vocab),
        eos_token_id=v.token_id("eos_token_id", 1, vocab),
        pad_token_id=v.token_id("pad_token_id", 0, vocab),
        torch_dtype=dtype,
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise QuantkitError(f"{path}: not found (is {model_dir} a Hugging Face model directory?)")
    return config_from_dict(read_json_object(path), str(path))


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold one object; anything else is a one-line error naming the file."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantkitError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise QuantkitError(f"{path}: expected a JSON object")
    return data
