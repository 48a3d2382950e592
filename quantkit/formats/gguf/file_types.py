"""The GGUF file types quantkit writes (``--type``), by name: the one list the CLI, the exporter and the GPTQ
path share. Plain strings, so that the CLI's --help imports neither gguf-py nor torch; ``policy`` turns them
into gguf-py's enums and says which ggml type each tensor gets.

A name is either a pure type (every 2-D weight but the tied embedding in that ggml type) or one of
llama-quantize's mixes (``*_k_s`` / ``*_k_m`` / ``*_k_l``, ``q2_k``, ``iq4_*``, ``iq3_*``, ``iq2_*``), whose
per-tensor rules are llama.cpp's ``llama_tensor_get_type``.
"""

from __future__ import annotations

# --type -> (gguf-py GGMLQuantizationType name of the main weight type, gguf-py LlamaFileType name)
FILE_TYPE_NAMES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q4_k": ("Q4_K", "MOSTLY_Q4_K_S"),  # pure Q4_K: llama-quantize --pure Q4_K_S
    "q5_k": ("Q5_K", "MOSTLY_Q5_K_S"),  # pure Q5_K
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
    "q3_k_m": ("Q3_K", "MOSTLY_Q3_K_M"),
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"),
    "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
    "q2_k": ("Q2_K", "MOSTLY_Q2_K"),
    "q2_k_s": ("Q2_K", "MOSTLY_Q2_K_S"),  # needs an importance matrix, as in llama-quantize
    "q3_k_s": ("Q3_K", "MOSTLY_Q3_K_S"),
    "q3_k_l": ("Q3_K", "MOSTLY_Q3_K_L"),
    "q4_k_s": ("Q4_K", "MOSTLY_Q4_K_S"),
    "q5_k_s": ("Q5_K", "MOSTLY_Q5_K_S"),
    "iq4_nl": ("IQ4_NL", "MOSTLY_IQ4_NL"),
    "iq4_xs": ("IQ4_XS", "MOSTLY_IQ4_XS"),
    # the codebook i-quants: llama-quantize's default type of each (IQ3_XS and IQ3_M are IQ3_S mixes);
    # their IQ3_XXS / IQ2_S weights need an importance matrix, as in llama-quantize
    "iq3_xxs": ("IQ3_XXS", "MOSTLY_IQ3_XXS"),
    "iq3_xs": ("IQ3_S", "MOSTLY_IQ3_XS"),
    "iq3_s": ("IQ3_S", "MOSTLY_IQ3_S"),
    "iq3_m": ("IQ3_S", "MOSTLY_IQ3_M"),
    # IQ2_S files are IQ2_XS mixes, IQ2_M files IQ2_S ones; every IQ2 weight needs an importance matrix
    "iq2_xxs": ("IQ2_XXS", "MOSTLY_IQ2_XXS"),
    "iq2_xs": ("IQ2_XS", "MOSTLY_IQ2_XS"),
    "iq2_s": ("IQ2_XS", "MOSTLY_IQ2_S"),
    "iq2_m": ("IQ2_S", "MOSTLY_IQ2_M"),
    # the pinned llama.cpp's 1- and 2-bit types: every weight but the tied embedding (Q6_K); Q2_0 is
    # quantkit's name until gguf-py has it (formats.gguf.ggml_types)
    "q1_0": ("Q1_0", "MOSTLY_Q1_0"),
    "q2_0": ("Q2_0", "MOSTLY_Q2_0"),
    # need an importance matrix; their attn_output weights are IQ2_XXS, as in llama-quantize
    "iq1_s": ("IQ1_S", "MOSTLY_IQ1_S"),
    "iq1_m": ("IQ1_M", "MOSTLY_IQ1_M"),
}
PURE = ("q4_k", "q5_k")  # llama-quantize --pure: no per-tensor rules but the tied embedding's
