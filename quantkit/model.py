"""Gemma 2 / Gemma 3 text forward pass, exact to transformers' eager Gemma2ForCausalLM / Gemma3ForCausalLM.

The model runs as separate steps — ``embed``, ``layers[i]``, ``head`` — so that calibration and evaluation
can hold one decoder layer's weights at a time. A decoder layer's forward is six stages in order
(attn_input, attention, attn_residual, mlp_input, mlp_hidden, mlp_residual); the GPTQ calibrator calls
the same stages one at a time to read each linear's input, so the package has one forward pass.
Parameters are created on the meta device and assigned by ``load_*``; ``unload_layer`` returns a layer to
meta. Linear projections are ordinary ``nn.Module``s that map [..., I] -> [..., O]; ``set_linear`` swaps
in any replacement (e.g. a dequantizing linear).

Letters in shape comments: B batch, T tokens, H hidden, nH / nKV query / kv heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.io.config import ModelConfig

LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x²) + eps) * (1 + w), computed in fp32 and cast back (Gemma keeps (1+w) in fp32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def _meta_linear(out_features: int, in_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False, device="meta")


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float, factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] for rotate-half RoPE; frequencies in fp32, linear scaling divides them by ``factor``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)) / factor
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_mask(t: int, window: int | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive [T, T] mask: 0 where key k is visible from query q (k <= q, and q - k < window), else min."""
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


AttentionInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # cos [T, D], sin [T, D], mask [T, T]


class Attention(nn.Module):
    """Grouped-query attention up to (not including) o_proj; the layer applies o_proj in its residual stage."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.softcap = cfg.attn_logit_softcapping
        for name, (o, i) in cfg.linear_shapes().items():
            if name.startswith("self_attn."):
                setattr(self, name.split(".")[1], _meta_linear(o, i))
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.has_qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.has_qk_norm else None

    def core(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Everything before o_proj: x [B, T, H] -> concatenated head outputs [B, T, nH*D]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)  # [B, T, nH, D]
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)  # [B, T, nKV, D]
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, D]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.n_heads // self.n_kv
        k = k.repeat_interleave(rep, dim=1)  # [B, nH, T, D]; query head h reads kv head h // rep
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale  # [B, nH, T, T]
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        probs = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)


class MLP(nn.Module):
    """Gated GELU MLP: gate_proj, up_proj and down_proj; the layer applies down_proj in its residual stage."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        for name, (o, i) in cfg.linear_shapes().items():
            if name.startswith("mlp."):
                setattr(self, name.split(".")[1], _meta_linear(o, i))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] -> gelu_tanh(gate(x)) * up(x) [B, T, F], the product taken in place (down_proj's input)."""
        return F.gelu(self.gate_proj(x), approximate="tanh").mul_(self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.window = cfg.sliding_window if cfg.is_sliding(index) else None
        self.rope_base, self.rope_factor = cfg.rope(index)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    # forward is these stages in order; each linear reads one stage's output: q/k/v attn_input, o_proj
    # attention, gate/up mlp_input, down_proj mlp_hidden. The calibrator runs the same stages one by one.

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, H] at positions 0..T-1 -> [B, T, H]."""
        h = self.attn_residual(h, self.attention(self.attn_input(h), self.attention_inputs(h)))
        return self.mlp_residual(h, self.mlp_hidden(self.mlp_input(h)))

    def attn_input(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, H] -> x1 [B, T, H], the input of q_proj, k_proj and v_proj."""
        return self.input_layernorm(h)

    def attention(self, x1: torch.Tensor, extras: AttentionInputs) -> torch.Tensor:
        """x1 [B, T, H] -> a [B, T, nH*D], the input of o_proj; ``extras`` from ``attention_inputs``."""
        return self.self_attn.core(x1, *extras)

    def attn_residual(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """h + post_attention_layernorm(o_proj(a)): [B, T, H], the hidden state between the two blocks."""
        return h + self.post_attention_layernorm(self.self_attn.o_proj(a))

    def mlp_input(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, H] -> x2 [B, T, H], the input of gate_proj and up_proj."""
        return self.pre_feedforward_layernorm(h)

    def mlp_hidden(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [B, T, H] -> m [B, T, F], the input of down_proj."""
        return self.mlp.hidden(x2)

    def mlp_residual(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """h + post_feedforward_layernorm(down_proj(m)): [B, T, H], the layer's output."""
        return h + self.post_feedforward_layernorm(self.mlp.down_proj(m))

    def attention_inputs(self, h: torch.Tensor) -> AttentionInputs:
        """(cos, sin, mask) for a [B, T, H] input at positions 0..T-1 on this layer's RoPE base and window."""
        t = h.shape[1]
        positions = torch.arange(t, device=h.device)
        cos, sin = rope_cos_sin(positions, self.self_attn.head_dim, self.rope_base, self.rope_factor, h.dtype)
        return cos, sin, attention_mask(t, self.window, h.device, h.dtype)


class Gemma(nn.Module):
    """Gemma 2 / 3 causal LM. Weights start on the meta device; ``load_*`` assigns real tensors."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device="meta")
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    # ---- loading -------------------------------------------------------------------------------------
    def _assign(self, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        params = {k: v.to(device=self.device, dtype=self.dtype) for k, v in tensors.items()}
        module.load_state_dict(params, strict=False, assign=True)

    def load_globals(self, embed: torch.Tensor, norm: torch.Tensor) -> None:
        """Embedding [V', H] (V' >= V rows; extra padding rows are dropped) and final norm [H]."""
        self._assign(self.embed_tokens, {"weight": embed[: self.cfg.vocab_size]})
        self._assign(self.norm, {"weight": norm})

    def load_layer(
        self, i: int, tensors: Mapping[str, torch.Tensor], linears: Mapping[str, nn.Module] | None = None
    ) -> None:
        """Assign layer i's tensors (names inside the layer, e.g. 'self_attn.q_proj.weight'); modules in
        ``linears`` (keyed like LINEAR_NAMES) replace the dense projections."""
        layer = self.layers[i]
        linears = dict(linears or {})
        for name, module in linears.items():
            self.set_linear(i, name, module.to(self.device))
        self._assign(layer, {k: v for k, v in tensors.items() if k.removesuffix(".weight") not in linears})
        missing = [n for n, p in layer.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"layer {i}: no tensor given for {missing}")

    def load_layer_norms(self, i: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Assign some of layer i's tensors (e.g. only its norms) and leave the rest on the meta device; the
        calibration swaps in each quantized linear as it is made, so dense linears are never loaded."""
        self._assign(self.layers[i], tensors)

    def unload_layer(self, i: int) -> None:
        self.layers[i] = DecoderLayer(self.cfg, i)

    def set_linear(self, i: int, name: str, module: nn.Module) -> None:
        parent, attr = name.split(".")
        setattr(self.layers[i].get_submodule(parent), attr, module)

    def linear(self, i: int, name: str) -> nn.Module:
        return self.layers[i].get_submodule(name)

    # ---- forward -------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> h [B, T, H]; sqrt(H) is rounded to the weight dtype first, as transformers does.
        ``weight``: an embedding [V', H] in any dtype (e.g. as read from disk) to use instead of the loaded
        one; its rows are gathered first and then cast, which equals casting the whole matrix first."""
        if weight is not None:
            rows = F.embedding(ids.to(weight.device), weight).to(self.device, self.dtype)
            return rows * torch.tensor(math.sqrt(self.cfg.hidden_size), dtype=torch.float32).to(self.dtype)
        w = self.embed_tokens.weight
        scale = torch.tensor(math.sqrt(self.cfg.hidden_size), dtype=torch.float32).to(w.dtype)
        return F.embedding(ids.to(w.device), w) * scale

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, H] -> logits [B, T, V] (tied embedding, final soft-cap in the logits' dtype)."""
        logits = F.linear(self.norm(h), self.embed_tokens.weight)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, ids: torch.Tensor, positions: slice = slice(None)) -> torch.Tensor:
        """ids [B, T] -> logits [B, S, V] at ``positions`` (S of the T; all by default)."""
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h[:, positions])


def build_model(
    ckpt,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    layers: bool = True,
    linears_for: Callable[[int], Mapping[str, nn.Module]] | None = None,
) -> Gemma:
    """A Gemma from a ``checkpoint.Checkpoint``: globals always, every layer when ``layers`` is true.
    ``linears_for(i)`` may supply replacement linear modules for layer i (a quantized artifact)."""
    model = Gemma(ckpt.config, dtype, device)
    model.load_globals(*(ckpt.get(n, check_finite=True) for n in ("model.embed_tokens.weight", "model.norm.weight")))
    if layers:
        for i in range(ckpt.config.num_hidden_layers):
            load_layer_from(model, ckpt, i, linears_for)
    return model


def load_layer_from(model: Gemma, ckpt, i: int, linears_for=None) -> None:
    linears = linears_for(i) if linears_for is not None else None
    tensors = ckpt.layer_tensors(i, exclude={f"{n}.weight" for n in (linears or {})})
    model.load_layer(i, tensors, linears)
