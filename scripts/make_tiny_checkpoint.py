"""Write a tiny random Gemma 2 or Gemma 3 checkpoint in exact Hugging Face layout.

bf16 weights sharded into two safetensors files with a ``model.safetensors.index.json``, a config.json in
the transformers 4.x key style, and a real SentencePiece BPE ``tokenizer.model`` trained on the WikiText-2
validation excerpt shipped in ``data/`` (Gemma's ids: pad 0, eos 1, bos 2, unk 3). For exactness tests
only: the weights are random, nothing here says anything about quality.

    python scripts/make_tiny_checkpoint.py OUT_DIR [--arch gemma2|gemma3] [--hidden 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TEXT = ROOT / "data" / "wiki.valid.excerpt.txt"


def tiny_config(arch: str = "gemma2", hidden: int = 256, vocab: int = 512, **overrides) -> dict:
    """config.json contents; heads x head_dim != hidden on purpose (as in the 9B)."""
    common = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 2,
        "query_pre_attn_scalar": hidden // 2,
        "sliding_window": 16,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "torch_dtype": "bfloat16",
    }
    if arch == "gemma2":
        cfg = {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "num_hidden_layers": 4,
            "rope_theta": 10000.0,
            "attn_logit_softcapping": 4.0,
            "final_logit_softcapping": 6.0,
            "cache_implementation": "hybrid",
            **common,
        }
    elif arch == "gemma3":
        cfg = {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "num_hidden_layers": 6,  # llama.cpp assumes every 6th layer global: keep the real 5:1 layout
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window_pattern": 6,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            **common,
        }
    else:
        raise ValueError(f"unknown arch {arch!r}")
    cfg.update(overrides)
    return cfg


def random_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 tensors with HF names. Scales are chosen so that attention scores and logits reach the
    soft-caps and the norm weights (1 + w) differ clearly from 1."""
    g = torch.Generator().manual_seed(seed)
    h, f, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def lin(o: int, i: int, gain: float = 1.0) -> torch.Tensor:
        return (torch.randn(o, i, generator=g) * gain / math.sqrt(i)).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return (torch.randn(n, generator=g) * 0.5).to(torch.bfloat16)

    w = {"model.embed_tokens.weight": (torch.randn(cfg["vocab_size"], h, generator=g) * 0.5).to(torch.bfloat16)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update(
            {
                f"{p}input_layernorm.weight": norm(h),
                f"{p}self_attn.q_proj.weight": lin(nq * d, h, 3.0),
                f"{p}self_attn.k_proj.weight": lin(nkv * d, h, 3.0),
                f"{p}self_attn.v_proj.weight": lin(nkv * d, h),
                f"{p}self_attn.o_proj.weight": lin(h, nq * d),
                f"{p}post_attention_layernorm.weight": norm(h),
                f"{p}pre_feedforward_layernorm.weight": norm(h),
                f"{p}mlp.gate_proj.weight": lin(f, h, 2.0),
                f"{p}mlp.up_proj.weight": lin(f, h),
                f"{p}mlp.down_proj.weight": lin(h, f),
                f"{p}post_feedforward_layernorm.weight": norm(h),
            }
        )
        if cfg["model_type"] == "gemma3_text":
            w[f"{p}self_attn.q_norm.weight"] = norm(d)
            w[f"{p}self_attn.k_norm.weight"] = norm(d)
    w["model.norm.weight"] = norm(h)
    return w


def train_tokenizer(out_path: Path, vocab: int, text: Path = TRAIN_TEXT) -> None:
    """A SentencePiece BPE model with byte fallback and Gemma's special ids."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "sp"
        spm.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=vocab,
            byte_fallback=True,
            character_coverage=1.0,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            num_threads=1,
            input_sentence_size=20000,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
        out_path.write_bytes(prefix.with_suffix(".model").read_bytes())


def write_sharded(weights: dict[str, torch.Tensor], out_dir: Path, n_shards: int = 2) -> None:
    names = list(weights)
    per = math.ceil(len(names) / n_shards)
    weight_map, total = {}, 0
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: weights[n].contiguous() for n in names[s * per : (s + 1) * per]}
        save_file(part, str(out_dir / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_checkpoint(out_dir: str | Path, arch: str = "gemma2", seed: int = 0, **overrides) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(arch, **overrides)
    train_tokenizer(out_dir / "tokenizer.model", min(cfg["vocab_size"], 512))  # larger vocabs: padding rows
    write_sharded(random_weights(cfg, seed), out_dir)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    tok_cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--arch", choices=["gemma2", "gemma3"], default="gemma2")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = make_tiny_checkpoint(args.out_dir, args.arch, args.seed, hidden=args.hidden)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
