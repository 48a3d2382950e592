"""What ``quantkit inspect`` reports: architecture, the config values that matter, sizes and estimates."""

from __future__ import annotations

import math
from typing import Any

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from quantkit.io.checkpoint import Checkpoint
from quantkit.io.dtypes import ELEMENT_BYTES
from quantkit.quant.primitives import QuantSpec


def _block_bits(qtype: QT) -> float:
    """Bits per weight of a ggml block type (its scales included)."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    return 8 * block_bytes / block


# Bits per weight of each estimated format's storage, scales included (one 16-bit scale per packed group).
_BPW = {
    "int8_g128": QuantSpec(8, 128).bits_per_weight(),
    "int4_g128": QuantSpec(4, 128).bits_per_weight(),
    "gguf_q8_0": _block_bits(QT.Q8_0),
    "gguf_q4_0": _block_bits(QT.Q4_0),
}


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    cfg = ckpt.config
    n_params = ckpt.num_parameters()
    linear = cfg.linear_parameters()
    emb = math.prod(ckpt.shape_of("model.embed_tokens.weight"))
    other = n_params - linear - emb
    src_bits = 8 * ELEMENT_BYTES[ckpt.dtype_of("model.embed_tokens.weight")]
    dense = (emb + other) * src_bits / 8  # embedding and norms stay at source precision
    est = {
        "int8_g128": dense + linear * _BPW["int8_g128"] / 8,
        "int4_g128": dense + linear * _BPW["int4_g128"] / 8,
        # llama-quantize: Q8_0 file quantizes token_embd to Q8_0; Q4_0 file puts the tied token_embd in Q6_K
        "gguf_q8_0": (linear + emb) * _BPW["gguf_q8_0"] / 8 + other * 4,
        "gguf_q4_0": linear * _BPW["gguf_q4_0"] / 8 + emb * _block_bits(QT.Q6_K) / 8 + other * 4,
    }
    sliding = [i for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i)]
    return {
        "path": str(ckpt.path),
        "architecture": cfg.architecture,
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "vocab_size": cfg.vocab_size,
        "sliding_window": cfg.sliding_window,
        "sliding_layers": sliding,
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "rope_theta": cfg.rope_theta,
        "rope_local_base_freq": cfg.rope_local_base_freq,
        "rope_scaling_factor": cfg.rope_scaling_factor,
        "rms_norm_eps": cfg.rms_norm_eps,
        "parameters": n_params,
        "linear_parameters": linear,
        "dtype_on_disk": ckpt.dtype_of("model.embed_tokens.weight"),
        "size_on_disk_bytes": ckpt.on_disk_bytes(),
        "estimated_bytes": {k: int(v) for k, v in est.items()},
    }


def format_summary(d: dict[str, Any]) -> str:
    gib = 1 << 30
    lines = [f"{d['path']}: {d['architecture']} ({d['model_type']})"]
    keys = [
        "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "query_pre_attn_scalar", "vocab_size", "sliding_window", "attn_logit_softcapping",
        "final_logit_softcapping", "rope_theta", "rope_local_base_freq", "rope_scaling_factor", "rms_norm_eps",
    ]  # fmt: skip
    lines += [f"  {k:<24} {d[k]}" for k in keys]
    sl = d["sliding_layers"]
    lines.append(f"  {'sliding layers':<24} {len(sl)} of {d['num_hidden_layers']}: {sl}")
    lines.append(f"  {'parameters':<24} {d['parameters']:,} ({d['linear_parameters']:,} in linear layers)")
    lines.append(f"  {'on disk':<24} {d['dtype_on_disk']}, {d['size_on_disk_bytes'] / gib:.3f} GiB")
    for k, v in d["estimated_bytes"].items():
        lines.append(f"  {'est. ' + k:<24} {v / gib:.3f} GiB")
    return "\n".join(lines)
