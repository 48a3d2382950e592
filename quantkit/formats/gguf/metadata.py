"""Model hyper-parameters <-> GGUF keys for Gemma 2 / Gemma 3, both directions.

Export writes ``general.*`` and the architecture keys as llama.cpp's converter writes them, after refusing a
config that llama.cpp would run differently. Import builds an HF config from those keys; a key missing from
the GGUF takes llama.cpp's default for the architecture, so the HF model means what llama.cpp would run.
The attention scale and the sliding pattern follow llama.cpp's Gemma rules (``names.RULES``).
"""

from __future__ import annotations

import json
from typing import Any

import gguf
import numpy as np
from gguf import LlamaFileType as FT

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats.card import HUB, Provenance, arch_tag
from quantkit.formats.gguf.names import RULES, RULES_BY_ARCH, GemmaRules, sliding_layers
from quantkit.io.calibration import calibration_label
from quantkit.io.config import FULL, MAX_LAYERS, SLIDING, ModelConfig, config_from_dict

K = gguf.Keys
ROPE_FREQ_BASE = 10000.0  # llama.cpp default for rope.freq_base and Gemma 3's rope.freq_base_swa
# llama-quantize's keys for the importance matrix a file was quantized with (tools/quantize/quantize.cpp)
IMATRIX_FILE, IMATRIX_DATASET = "quantize.imatrix.file", "quantize.imatrix.dataset"
IMATRIX_ENTRIES, IMATRIX_CHUNKS = "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"
RECIPE_KEY, VERSION_KEY = "quantkit.recipe", "quantkit.version"  # quantkit's own: the options, as JSON

# ---------------------------------------------------------------------------------- HF config -> GGUF


def check_llamacpp_compatible(cfg: ModelConfig) -> None:
    """Refuse configs llama.cpp would silently run differently: it derives the attention scale and the
    sliding pattern from the architecture, and always soft-caps Gemma 2."""
    rules = RULES[cfg.model_type]
    p = rules.swa_pattern
    expected = tuple(SLIDING if s else FULL for s in sliding_layers(p, cfg.num_hidden_layers))
    if cfg.layer_types != expected:
        raise QuantkitError(
            f"llama.cpp assumes {cfg.model_type} layer i slides iff i % {p} < {p - 1}; this config's "
            "layer_types differ, so a GGUF would not run as this model"
        )
    n, h, heads = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    scalar = rules.query_pre_attn_scalar(n, h, heads, cfg.head_dim)
    if cfg.query_pre_attn_scalar != scalar:
        raise QuantkitError(
            f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} differs from the {scalar} llama.cpp derives "
            "for this layer count; the attention scale cannot be stored in a GGUF"
        )
    if cfg.model_type == "gemma2" and None in (cfg.attn_logit_softcapping, cfg.final_logit_softcapping):
        raise QuantkitError("llama.cpp always soft-caps gemma2; a config without soft-caps cannot be exported")
    if cfg.model_type == "gemma3_text" and cfg.attn_logit_softcapping is not None:
        raise QuantkitError("llama.cpp's gemma3 has no attention soft-cap; this config sets one")


def add_model_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, name: str, file_type: FT) -> None:
    """general.* and the architecture keys, as convert_hf_to_gguf.py writes them."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    if cfg.model_type == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        return
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_freq_base_swa(cfg.rope_local_base_freq)
    if cfg.rope_scaling_factor != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling_factor)
    if cfg.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)


def add_provenance(w: gguf.GGUFWriter, prov: Provenance, report: dict[str, Any] | None, qtype: str, arch: str) -> None:
    """Where the file came from, in the keys llama.cpp's tools write: general.quantized_by, the base model
    as convert_hf_to_gguf.py derives it from a card's ``base_model`` id (name and organization in title
    form, repo_url), general.license, general.tags; for GPTQ into ggml blocks (importance-weighted) the
    quantize.imatrix.* keys as llama-quantize writes them for --imatrix; and quantkit's recipe (``report``:
    the quantize report of a quantkit artifact, None for an unquantized source)."""
    w.add_quantized_by("quantkit")
    if prov.base_model:
        name, org = gguf.Metadata.get_model_id_components(prov.base_model)[:2]
        w.add_base_model_count(1)
        if name:
            w.add_base_model_name(0, gguf.Metadata.id_to_title(name))
        if org:
            w.add_base_model_organization(0, gguf.Metadata.id_to_title(org))
            w.add_base_model_repo_url(0, f"{HUB}/{prov.base_model}")
    if prov.license:
        w.add_license(prov.license)
    opts = report["options"] if report else {}
    tags = ["quantkit", *([opts["method"]] if opts else []), qtype, arch_tag(arch)]
    w.add_tags(list(dict.fromkeys(tags)))
    w.add_string(VERSION_KEY, __version__)
    if not opts:
        return
    calib = opts.get("calib")  # names only: a file's metadata must not depend on where the texts lay
    w.add_string(RECIPE_KEY, json.dumps(dict(opts, calib=calib and calibration_label(calib)), sort_keys=True))
    if opts["method"] == "gptq" and str(report.get("format", "")).startswith("ggml blocks"):
        dataset = calibration_label(opts.get("calib"))
        entries = len(report.get("linears", {}))
        add_imatrix_keys(w, report.get("imatrix"), dataset, entries, int(opts["nsamples"]))


def add_imatrix_keys(w: gguf.GGUFWriter, file: str | None, dataset: str | None, entries: int, chunks: int) -> None:
    """The quantize.imatrix.* keys as llama-quantize --imatrix writes them: the file as named (at most 127
    bytes), its first dataset, its entry count and chunk count (u32; the chunk count only when positive)."""
    if file:
        w.add_string(IMATRIX_FILE, file.encode()[:127].decode(errors="ignore"))
    if dataset is not None:
        w.add_string(IMATRIX_DATASET, dataset.encode()[:127].decode(errors="ignore"))
    w.add_uint32(IMATRIX_ENTRIES, entries)
    if chunks > 0:
        w.add_uint32(IMATRIX_CHUNKS, chunks)


# ---------------------------------------------------------------------------------- GGUF -> HF config


def gemma_rules(meta: dict[str, Any], source: str) -> GemmaRules:
    """The rules of the GGUF's architecture; QuantkitError for anything but gemma2 / gemma3."""
    name = meta.get(K.General.ARCHITECTURE)
    if name not in RULES_BY_ARCH:
        raise QuantkitError(f"{source}: architecture {name!r} is not supported (expected gemma2 or gemma3)")
    return RULES_BY_ARCH[name]


class _Keys:
    """Typed reads of one architecture's keys from GGUF metadata, with one-line errors naming the file."""

    def __init__(self, meta: dict[str, Any], arch: str, source: str):
        self.meta, self.arch, self.source = meta, arch, source

    def get(self, key: str, default: Any = ...) -> Any:
        key = key.format(arch=self.arch)
        if key not in self.meta and default is ...:
            raise QuantkitError(f"{self.source}: GGUF key {key!r} is missing")
        value = self.meta.get(key, default)
        if isinstance(value, list) and key != K.Attention.SLIDING_WINDOW_PATTERN.format(arch=self.arch):
            raise QuantkitError(f"{self.source}: GGUF key {key!r} is a per-layer array; only scalars are supported")
        return value

    def count(self, key: str, default: Any = ...) -> int:
        """A positive integer value (llama.cpp reads these as uint32)."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            name = key.format(arch=self.arch)
            raise QuantkitError(f"{self.source}: GGUF key {name!r} is {value!r}, not a positive integer")
        return int(value)

    def number(self, key: str, default: Any = ...) -> Any:
        value = self.get(key, default)
        if value is not None and (isinstance(value, (bool, str)) or not np.isfinite(float(value))):
            name = key.format(arch=self.arch)
            raise QuantkitError(f"{self.source}: GGUF key {name!r} is {value!r}, not a finite number")
        return value


def build_config(meta: dict[str, Any], vocab_size: int, source: str) -> dict[str, Any]:
    """HF config for the GGUF metadata ``meta`` (the architecture keys llama.cpp's converter writes)."""
    rules = gemma_rules(meta, source)
    keys = _Keys(meta, rules.gguf_arch, source)
    count, number = keys.count, keys.number
    n_layer, hidden = count(K.LLM.BLOCK_COUNT), count(K.LLM.EMBEDDING_LENGTH)
    if n_layer > MAX_LAYERS:  # before any per-layer list is built from it (found by the fuzzer: a hang)
        raise QuantkitError(f"{source}: {rules.gguf_arch}.block_count is {n_layer}; at most {MAX_LAYERS} layers")
    n_head = count(K.Attention.HEAD_COUNT)
    head_dim = count(K.Attention.KEY_LENGTH, max(hidden // n_head, 1))
    if count(K.Attention.VALUE_LENGTH, head_dim) != head_dim:
        raise QuantkitError(f"{source}: attention.value_length differs from key_length; HF Gemma needs them equal")
    pattern = keys.get(K.Attention.SLIDING_WINDOW_PATTERN, rules.swa_pattern)
    is_swa = _sliding(pattern, n_layer, source)
    config: dict[str, Any] = {
        "architectures": [rules.hf_class],
        "model_type": rules.model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": count(K.LLM.FEED_FORWARD_LENGTH),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": count(K.Attention.HEAD_COUNT_KV, n_head),
        "head_dim": head_dim,
        "query_pre_attn_scalar": rules.query_pre_attn_scalar(n_layer, hidden, n_head, head_dim),
        "max_position_embeddings": count(K.LLM.CONTEXT_LENGTH),
        "rms_norm_eps": _f32(number(K.Attention.LAYERNORM_RMS_EPS)),
        "rope_theta": _f32(number(K.Rope.FREQ_BASE, ROPE_FREQ_BASE)),
        "sliding_window": count(K.Attention.SLIDING_WINDOW, rules.sliding_window),
        "layer_types": [SLIDING if swa else FULL for swa in is_swa],
        "attn_logit_softcapping": _f32_or_none(number(K.LLM.ATTN_LOGIT_SOFTCAPPING, rules.attn_softcap)),
        "final_logit_softcapping": _f32_or_none(number(K.LLM.FINAL_LOGIT_SOFTCAPPING, rules.final_softcap)),
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": _opt_int(meta.get(K.Tokenizer.BOS_ID)),
        "eos_token_id": _opt_int(meta.get(K.Tokenizer.EOS_ID)),
        "pad_token_id": _opt_int(meta.get(K.Tokenizer.PAD_ID)),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if rules.gguf_arch == "gemma3":
        config["rope_local_base_freq"] = _f32(number(K.Rope.FREQ_BASE_SWA, ROPE_FREQ_BASE))
        scaling = keys.get(K.Rope.SCALING_TYPE, None), keys.get(K.Rope.SCALING_FACTOR, None)
        config["rope_scaling"] = _rope_scaling(*scaling, source)
        if isinstance(pattern, int):
            config["sliding_window_pattern"] = pattern
    elif meta.get(K.Rope.SCALING_TYPE.format(arch=rules.gguf_arch)) not in (None, "none"):
        raise QuantkitError(f"{source}: RoPE scaling is not supported for gemma2")
    config_from_dict(config, source)  # the values quantkit's reader will check
    return config


def _sliding(pattern: int | list[bool], n_layer: int, source: str) -> list[bool]:
    """Per-layer sliding flags from the GGUF's pattern: an int P (llama.cpp's rule) or a bool per layer."""
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise QuantkitError(f"{source}: sliding_window_pattern has {len(pattern)} entries for {n_layer} layers")
        return [bool(x) for x in pattern]
    if isinstance(pattern, bool) or not isinstance(pattern, (int, np.integer)) or pattern < 0:
        raise QuantkitError(f"{source}: sliding_window_pattern is {pattern!r}, not a non-negative integer")
    return sliding_layers(int(pattern), n_layer)


def _rope_scaling(kind: str | None, factor: float | None, source: str) -> dict[str, Any] | None:
    if kind in (None, "none"):
        return None
    if kind != "linear" or factor is None:
        raise QuantkitError(f"{source}: RoPE scaling {kind!r} (factor {factor}) is not supported, only linear")
    return {"rope_type": "linear", "factor": _f32(factor)}


def _f32(x: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-06, not 9.999999974752427e-07)."""
    return float(str(np.float32(x)))


def _f32_or_none(x: float | None) -> float | None:
    return None if x is None else _f32(x)


def _opt_int(x: int | None) -> int | None:
    return None if x is None else int(x)
