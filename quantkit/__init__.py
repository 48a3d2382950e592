"""quantkit: per-group int8/int4 quantization (RTN, GPTQ) and GGUF / packed-safetensors export for
Gemma 2 and Gemma 3 text models."""

__version__ = "0.2.0"
