"""The forward pass against transformers' eager Gemma2ForCausalLM / Gemma3ForCausalLM.

Measured agreement, and so the tests' tolerance: none. On the tiny Gemma 2 and Gemma 3 checkpoints, and with
query_pre_attn_scalar != head_dim (as in the 27B models), the logits equal transformers' bit for bit in fp32
and in bf16 (max abs difference 0.0), so the tests assert torch.equal.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tiny_checkpoint
from transformers import AutoModelForCausalLM

from quantkit.io.checkpoint import open_checkpoint
from quantkit.model import build_model

T = 64  # > 2x the tiny window of 16, so sliding layers see a truncated context


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def scalar_ckpt(request, tmp_path_factory):
    """A tiny checkpoint whose query_pre_attn_scalar is hidden / heads (64) while head_dim is 128: the 27B
    models' case (Gemma 2 27B: 144 vs 128, Gemma 3 27B: 168 vs 128)."""
    path = tmp_path_factory.mktemp("scalar") / request.param
    return make_tiny_checkpoint(path, request.param, query_pre_attn_scalar=64)


def _ids(vocab: int, batch: int = 2, t: int = T) -> torch.Tensor:
    ids = torch.randint(4, vocab, (batch, t), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 2
    return ids


def _reference(path, dtype=torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()


def _assert_bit_exact(path, dtype: torch.dtype) -> None:
    """Our logits equal transformers' bit for bit (tolerance: none; the message gives the max abs difference)."""
    ckpt = open_checkpoint(path)
    ids = _ids(ckpt.config.vocab_size)
    with torch.no_grad():
        ours = build_model(ckpt, dtype=dtype)(ids)
        ref = _reference(path, dtype)(ids).logits
    assert ours.shape == ref.shape == (2, T, ckpt.config.vocab_size) and ours.dtype == ref.dtype == dtype
    assert torch.equal(ours, ref), f"max abs difference {(ours.float() - ref.float()).abs().max().item()}"


def test_logits_match_transformers_fp32(tiny_ckpt):
    _assert_bit_exact(tiny_ckpt, torch.float32)


def test_logits_match_transformers_bf16(tiny_ckpt):
    """With dtype=bfloat16 every op runs in the weights' dtype, as transformers does."""
    _assert_bit_exact(tiny_ckpt, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_query_scalar_other_than_head_dim_matches_transformers(scalar_ckpt, dtype):
    cfg = open_checkpoint(scalar_ckpt).config
    assert (cfg.query_pre_attn_scalar, cfg.head_dim) == (64, 128)
    _assert_bit_exact(scalar_ckpt, dtype)


@torch.no_grad()
@pytest.mark.parametrize(
    "change",
    ["no_window", "no_attn_softcap", "no_final_softcap", "plain_norm", "head_dim_scale"],
)
def test_each_gemma_detail_matters(tiny_gemma2, change):
    """Dropping any one Gemma detail moves the logits by more than 1e-2, while the tests above require
    equality: they cannot pass by accident."""
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
