"""Hugging Face <-> llama.cpp GGUF names for Gemma 2 / Gemma 3. One table, read both ways."""

from __future__ import annotations

# config.json model_type -> general.architecture
GGUF_ARCH = {"gemma2": "gemma2", "gemma3_text": "gemma3"}

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

# llama.cpp's Gemma rules that a GGUF does not state, keyed by config.json model_type:
# the 27B models' layer counts (llama.cpp scales their queries by (hidden / heads)^-0.5, not head_dim^-0.5)
LAYERS_27B = {"gemma2": 46, "gemma3_text": 62}
# the sliding-window pattern P: layer i uses the sliding window iff i % P < P - 1
SWA_PATTERN = {"gemma2": 2, "gemma3_text": 6}
