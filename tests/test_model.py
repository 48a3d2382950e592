"""The forward pass against transformers' eager Gemma2ForCausalLM / Gemma3ForCausalLM."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantkit.io.checkpoint import open_checkpoint
from quantkit.model import build_model

T = 64  # > 2x the tiny window of 16, so sliding layers see a truncated context


def _ids(vocab: int, batch: int = 2, t: int = T) -> torch.Tensor:
    ids = torch.randint(4, vocab, (batch, t), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 2
    return ids


def _reference(path, dtype=torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()


@torch.no_grad()
def test_logits_match_transformers_fp32(tiny_ckpt):
    ckpt = open_checkpoint(tiny_ckpt)
    ids = _ids(ckpt.config.vocab_size)
    ours = build_model(ckpt)(ids)
    ref = _reference(tiny_ckpt)(ids).logits
    assert ours.shape == ref.shape == (2, T, ckpt.config.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-4


@torch.no_grad()
def test_logits_match_transformers_bf16(tiny_ckpt):
    """With dtype=bfloat16 every op runs in the weights' dtype, as transformers does."""
    ckpt = open_checkpoint(tiny_ckpt)
    ids = _ids(ckpt.config.vocab_size)
    ours = build_model(ckpt, dtype=torch.bfloat16)(ids).float()
    ref = _reference(tiny_ckpt, torch.bfloat16)(ids).logits.float()
    assert (ours - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize(
    "change",
    ["no_window", "no_attn_softcap", "no_final_softcap", "plain_norm", "head_dim_scale"],
)
def test_each_gemma_detail_matters(tiny_gemma2, change):
    """Dropping any one Gemma detail moves the logits far beyond the 1e-4 tolerance used above, so the
    exactness test cannot pass by accident."""
    ckpt = open_checkpoint(tiny_gemma2)
    ids = _ids(ckpt.config.vocab_size)
    good = build_model(ckpt)(ids)
    cfg = ckpt.config
    if change == "no_window":
        cfg = dataclasses.replace(cfg, sliding_window=10**9)
    elif change == "no_attn_softcap":
        cfg = dataclasses.replace(cfg, attn_logit_softcapping=None)
    elif change == "no_final_softcap":
        cfg = dataclasses.replace(cfg, final_logit_softcapping=None)
    elif change == "head_dim_scale":
        cfg = dataclasses.replace(cfg, query_pre_attn_scalar=cfg.head_dim * 2)
    ckpt.config = cfg
    model = build_model(ckpt)
    if change == "plain_norm":
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.data.add_(1.0)  # (1 + w) applied twice: what a double +1 does
    bad = model(ids)
    assert (bad - good).abs().max().item() > 1e-2


@torch.no_grad()
def test_layer_by_layer_equals_one_call(tiny_ckpt):
    ckpt = open_checkpoint(tiny_ckpt)
    ids = _ids(ckpt.config.vocab_size)
    whole = build_model(ckpt)(ids)
    streamed = build_model(ckpt, layers=False)
    h = streamed.embed(ids)
    for i in range(ckpt.config.num_hidden_layers):
        streamed.load_layer(i, ckpt.layer_tensors(i))
        h = streamed.layers[i](h)
        streamed.unload_layer(i)
        assert all(p.is_meta for p in streamed.layers[i].parameters())
    assert torch.equal(streamed.head(h), whole)
