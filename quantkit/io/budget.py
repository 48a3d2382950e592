"""Up-front estimates of the disk and memory a command needs, so an impossible request is refused before
any work instead of failing half-way (disk full) or being killed (out of memory). Rough upper bounds."""

from __future__ import annotations

import math
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.io.checkpoint import Checkpoint
from quantkit.io.config import ModelConfig
from quantkit.io.dtypes import ELEMENT_BYTES

_SLACK = 1 << 20  # config, index, quantkit.json


def tokenizer_bytes(ckpt: Checkpoint) -> int:
    return sum(p.stat().st_size for p in Path(ckpt.path).glob("tokenizer*") if p.is_file())


def quantized_artifact_bytes(ckpt: Checkpoint, bits: int, group_size: int, sym: bool) -> int:
    """Size of a pack-quantized artifact of ``ckpt``: codes, scales (and zero points), dense tensors."""
    n_linear = ckpt.config.linear_parameters()
    groups = n_linear // (group_size if group_size > 0 else min(i for _, i in ckpt.config.linear_shapes().values()))
    per_group = 4 + (0 if sym else 4)  # fp32 scale at most, int32 zero point
    linears = tuple(f".{m}.weight" for m in ckpt.config.linear_shapes())
    dense = sum(
        math.prod(ckpt.shape_of(n)) * ELEMENT_BYTES.get(ckpt.dtype_of(n), 4)
        for n in ckpt.names()
        if not n.endswith(linears)  # the linears are replaced by their codes and scales
    )
    return n_linear * bits // 8 + groups * per_group + dense + tokenizer_bytes(ckpt) + _SLACK


def available_memory(unknown: int = 1 << 40) -> int:
    """MemAvailable from /proc/meminfo (bytes); ``unknown`` when it cannot be read (generous by default, so
    that nothing is refused for lack of the file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return unknown


def calibration_bytes(
    cfg: ModelConfig, nsamples: int, seqlen: int, batch: int, act_bytes: int, fp_targets: bool = False
) -> int:
    """Peak memory of GPTQ calibration beyond one layer's weights, as the layer calibrator holds it.

    Across a layer it keeps every window's hidden state [N, T, H] and, between the attention and o_proj, every
    window's attention output [N, T, nH*Dh]; ``fp_targets`` carries the unquantized model's twin of each. All
    else is recomputed one batch at a time: a few [b, T, H] and [b, T, I] temporaries and one batch's attention
    scores. The Hessian of the widest input (I x I fp32) lives beside its two factor buffers (and, with
    ``fp_targets``, the drift). The float copies of the linears a pass holds (``holding_weights``: at most
    gate, up and down, twice with ``fp_targets``) exist only while no factor buffer does, and fit in that term."""
    tokens, b = nsamples * seqlen, min(batch, nsamples)
    twins = 2 if fp_targets else 1
    q_dim = cfg.num_attention_heads * cfg.head_dim
    held = tokens * (cfg.hidden_size + q_dim) * act_bytes * twins
    per_batch = b * seqlen * 3 * (cfg.hidden_size + cfg.intermediate_size) * act_bytes * twins
    attn = b * cfg.num_attention_heads * seqlen * seqlen * 4 * 2
    widest = max(i for _, i in cfg.linear_shapes().values())
    hessians = (3 + (1 if fp_targets else 0)) * widest * widest * 4
    return held + per_batch + attn + hessians + tokens * 16


def eval_bytes(cfg: ModelConfig, n_chunks: int, ctx: int, batch: int, act_bytes: int) -> int:
    """Peak memory of a perplexity pass beyond the weights: one batch's activations, attention scores and
    scored logits (log-softmax copies included), plus every chunk's hidden state when layer-streamed."""
    b = min(batch, n_chunks)
    acts = b * ctx * (6 * cfg.hidden_size + 2 * cfg.intermediate_size) * act_bytes
    attn = b * cfg.num_attention_heads * ctx * ctx * 4 * 2
    logits = b * (ctx // 2) * cfg.vocab_size * 4 * 3
    streamed = n_chunks * ctx * cfg.hidden_size * act_bytes
    return acts + attn + logits + streamed


def refuse_if_over_memory(need: int, what: str, todo: str) -> None:
    free = available_memory()
    if need > free:
        raise QuantkitError(
            f"{what}: needs about {need / 2**30:.1f} GiB of memory, {free / 2**30:.1f} GiB is available ({todo})"
        )
