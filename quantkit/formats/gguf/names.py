"""Hugging Face <-> llama.cpp GGUF names for Gemma 2 / Gemma 3, and llama.cpp's Gemma rules that a GGUF
does not state. One table each, read both ways by the exporter and the importer."""

from __future__ import annotations

from dataclasses import dataclass

# HF module outside the decoder layers -> GGUF tensor (the head is tied to token_embd: no output.weight)
GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}

# HF module inside a decoder layer -> GGUF tensor kind in blk.N (ffn_norm is the *pre*-feedforward norm)
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
}

# last component of an HF module name ('v_proj', 'embed_tokens') -> GGUF kind, from the two tables above
HF_KINDS = {module.rsplit(".", 1)[-1]: kind for module, kind in (GLOBAL_TENSORS | LAYER_TENSORS).items()}


@dataclass(frozen=True)
class GemmaRules:
    """What llama.cpp assumes for one Gemma architecture, beside the keys a GGUF stores."""

    model_type: str  # config.json model_type
    gguf_arch: str  # general.architecture
    hf_class: str  # config.json architectures[0]
    swa_pattern: int  # P: layer i uses the sliding window iff i % P < P - 1
    layers_27b: int  # the 27B's layer count: llama.cpp scales its queries by (hidden / heads)^-0.5
    sliding_window: int | None  # default when the key is missing (None: the key is required)
    attn_softcap: float | None  # defaults when the soft-cap keys are missing
    final_softcap: float | None

    def query_pre_attn_scalar(self, n_layers: int, hidden: int, n_heads: int, head_dim: int) -> int:
        """The attention scale's denominator llama.cpp derives: hidden // heads for the 27B, else head_dim."""
        return hidden // n_heads if n_layers == self.layers_27b else head_dim


RULES = {
    "gemma2": GemmaRules("gemma2", "gemma2", "Gemma2ForCausalLM", 2, 46, 4096, 50.0, 30.0),
    "gemma3_text": GemmaRules("gemma3_text", "gemma3", "Gemma3ForCausalLM", 6, 62, None, None, None),
}
RULES_BY_ARCH = {r.gguf_arch: r for r in RULES.values()}  # general.architecture -> rules


def sliding_layers(pattern: int, n_layers: int) -> list[bool]:
    """llama.cpp's per-layer sliding flags for a pattern P: layer i slides iff i % P < P - 1 (P = 0: all)."""
    return [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers)]
