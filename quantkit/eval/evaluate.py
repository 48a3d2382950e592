"""Perplexity (llama-perplexity's method), KL divergence and top-1 agreement of a quantized model against
its reference, on the same tokens.

Each chunk of ``ctx`` tokens starts with BOS; positions ctx/2 .. ctx-2 are scored. Log-
softmax and KL are computed in fp32 from the final (soft-capped) logits; statistics accumulate in fp64.
Two execution modes give the same numbers: whole-model (both models resident) and layer-streamed (groups
of chunks through every layer of one model after the other, holding one layer's weights plus one group's
hidden states, so memory does not grow with the number of chunks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm import tqdm

from quantkit.eval.reference import FLOOR, Reference, ReferenceWriter
from quantkit.eval.stats import Tally, log_probs
from quantkit.formats.packed.linear import holding_weights, linears_from_checkpoint
from quantkit.io.budget import available_memory
from quantkit.io.checkpoint import Checkpoint
from quantkit.model import Gemma, build_model, load_layer_from

ModelFactory = Callable[[bool], Gemma]


def scored(ctx: int) -> slice:
    """Positions whose next-token prediction counts: first = ctx // 2 .. ctx - 2."""
    return slice(ctx // 2, ctx - 1)


def _batches(chunks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(chunks.split(batch_size))


def _whole_model_logits(model: Gemma, batches: list[torch.Tensor], sl: slice) -> Iterator[torch.Tensor]:
    with holding_weights([model]):  # each packed weight dequantized once (the budget counts it dense)
        for ids in batches:
            yield model(ids.to(model.device), sl).cpu()


GLOBALS = ("model.embed_tokens.weight", "model.norm.weight")


def _same_globals(a: Checkpoint, b: Checkpoint) -> bool:
    """Whether two checkpoints hold identical embedding and final norm (quantize copies them verbatim)."""
    return all(a.shape_of(n) == b.shape_of(n) and torch.equal(a.get(n), b.get(n)) for n in GLOBALS)


def _scored_hidden(model: Gemma, ckpt: Checkpoint, quantized: bool, batches: list[torch.Tensor], sl: slice, bar):
    """One group of batches through every layer of ``ckpt``: ``Gemma.forward`` with the loop turned inside
    out (the model's own ``embed`` and ``layers[i]``, one layer's weights resident at a time, each batch's
    hidden states replaced in place, never duplicated); returns the scored positions' final hidden states,
    one [B, S, H] per batch, for ``head``."""
    hs = [model.embed(ids.to(model.device)) for ids in batches]
    linears = (lambda j: linears_from_checkpoint(ckpt, j)) if quantized else None
    for i in range(ckpt.config.num_hidden_layers):
        load_layer_from(model, ckpt, i, linears)
        with holding_weights([model.layers[i]]):  # dequantized once for the group's batches
            for j in range(len(hs)):
                hs[j] = model.layers[i](hs[j])
        model.unload_layer(i)
        bar.update(1)
    for j in range(len(hs)):
        hs[j] = hs[j][:, sl].clone()
    return hs


def _streamed_logits(models, batches, sl, dtype, device, group: int, progress) -> Iterator[list[torch.Tensor]]:
    """Layer-streamed evaluation, group-major: each group of ``group`` batches goes through all layers of
    the reference, then of each quantized model, then the heads; so memory holds one layer's weights, one
    group's hidden states and the (shared) embedding, whatever the number of chunks. Yields, batch by
    batch, the scored-position logits of every model."""
    same = [_same_globals(models[0][0], ck) for ck, _ in models[1:]]  # before any embedding is resident
    ref = build_model(models[0][0], dtype, device, layers=False)
    built = [ref]
    for (ck, _), shared in zip(models[1:], same, strict=True):
        if shared:  # quantize copies them verbatim: share the embedding and norm
            m = Gemma(ck.config, dtype, device)
            m.embed_tokens, m.norm = ref.embed_tokens, ref.norm
        else:
            m = build_model(ck, dtype, device, layers=False)
        built.append(m)
    n_groups = -(-len(batches) // group)
    total = n_groups * sum(ck.config.num_hidden_layers for ck, _ in models)
    with tqdm(total=total, desc="eval (layer-streamed)", unit="layer", disable=not progress) as bar:
        for g0 in range(0, len(batches), group):
            part = batches[g0 : g0 + group]
            hidden = [_scored_hidden(m, ck, q, part, sl, bar) for m, (ck, q) in zip(built, models, strict=True)]
            for j in range(len(part)):
                yield [m.head(hs[j]).cpu() for m, hs in zip(built, hidden, strict=True)]
                for hs in hidden:
                    hs[j] = None


def group_batches(cfg, dtype: torch.dtype, ctx: int, batch_size: int, budget: int = 1 << 30) -> int:
    """Batches per group so that one model's hidden states for a group take about ``budget`` bytes."""
    per_batch = batch_size * ctx * cfg.hidden_size * torch.finfo(dtype).bits // 8
    return max(1, budget // per_batch)


def model_bytes(ckpt: Checkpoint, dtype: torch.dtype) -> int:
    return ckpt.num_parameters() * torch.finfo(dtype).bits // 8


def whole_model_bytes(models: list[tuple[Checkpoint, bool]], dtype: torch.dtype, batch_size: int, scored: int) -> int:
    """Peak bytes of whole-model evaluation: every model's weights in ``dtype``, and per model a batch's
    scored logits [batch, scored, vocab] three times over (logits, log-probabilities, the softmax's
    temporary). With Gemma's 262,144-entry vocabulary the logits weigh as much as a small model's weights:
    eight 270M models held 17 GiB, where their weights alone are 8.6 GB."""
    if not models:
        return 0
    cfg = models[0][0].config
    logits = 3 * batch_size * scored * cfg.vocab_size * 4  # fp32
    return sum(model_bytes(ck, dtype) + logits for ck, _ in models)


def _whole_model_streams(models, batches, sl, dtype, device) -> Iterator[list[torch.Tensor]]:
    built = [
        build_model(ck, dtype, device, linears_for=(lambda i, ck=ck: linears_from_checkpoint(ck, i)) if q else None)
        for ck, q in models
    ]
    return zip(*[_whole_model_logits(m, batches, sl) for m in built], strict=True)


def _forwards(models, batches, sl, dtype, device, stream, group_bytes, progress) -> Iterator[list[torch.Tensor]]:
    """Per batch, the scored-position logits of every model in ``models`` (none: an empty list per batch)."""
    if not models:
        return ([] for _ in batches)
    if stream:
        ctx = batches[0].shape[1]
        group = group_batches(models[0][0].config, dtype, ctx, batches[0].shape[0], group_bytes)
        return _streamed_logits(models, batches, sl, dtype, device, group, progress)
    return (list(outs) for outs in _whole_model_streams(models, batches, sl, dtype, device))


def _dataset_rows(datasets: list[tuple[str, int]], n: int) -> list[tuple[str, int, int]]:
    """(name, first chunk, end chunk) of each dataset, in the order its chunks are stacked."""
    spans, start = [], 0
    for name, count in datasets:
        spans.append((name, start, start + count))
        start += count
    if start != n:
        raise ValueError(f"datasets cover {start} chunks, not {n}")
    return spans


@torch.no_grad()
def evaluate_many(
    ref: Checkpoint | None,
    chunks: torch.Tensor,
    quants: list[Checkpoint],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    stream: bool | None = None,
    batch_size: int = 1,
    progress: bool = True,
    group_bytes: int = 1 << 30,
    datasets: list[tuple[str, int]] | None = None,
    reference: Reference | None = None,
    save: ReferenceWriter | None = None,
) -> list[dict[str, Any]]:
    """Score ``ref`` and every model in ``quants`` on ``chunks`` [n, ctx] in one pass over the text (the
    reference runs once). Returns one result per quantized model (or the reference alone). Layer-streamed,
    chunks go through the layers in groups whose hidden states take about ``group_bytes`` per model.

    ``datasets``: (name, chunk count) of the texts stacked in ``chunks``; each result then also holds every
    metric per dataset under "datasets" (the top level is over all of them). ``reference``: a saved reference
    (its tokens already checked against ``chunks``) stands in for ``ref``, which is then not run (pass None).
    ``save``: the reference's log-probabilities are also written there, batch by batch."""
    n, ctx = chunks.shape
    sl = scored(ctx)
    targets = chunks[:, sl.start + 1 : sl.stop + 1]  # [n, S]
    models = ([(ref, False)] if reference is None else []) + [(q, True) for q in quants]
    if stream is None:
        need = whole_model_bytes(models, dtype, batch_size, sl.stop - sl.start)
        stream = bool(models) and need > 0.5 * available_memory(unknown=8 << 30)
    spans = _dataset_rows(datasets or [("all", n)], n)
    tallies = [Tally.empty(len(quants)) for _ in spans]
    floor = -math.inf if reference is None else FLOOR
    batches = _batches(chunks, batch_size)
    t0 = time.perf_counter()
    logits = _forwards(models, batches, sl, dtype, device, stream, group_bytes, progress)
    start = 0
    bar = tqdm(total=len(batches), desc="eval", unit="batch", disable=not progress or (stream and bool(models)))
    for i, outs in enumerate(logits):
        b = len(batches[i])
        if reference is None:
            ref_logits, q_logits = outs[0], outs[1:]
            if save is not None:
                save.add(ref_logits)
            ref_lp = log_probs(ref_logits)
        else:
            ref_lp, q_logits = reference.log_probs(start, start + b), outs
        for tally, (_, lo, hi) in zip(tallies, spans, strict=True):
            a, z = max(lo, start) - start, min(hi, start + b) - start
            if a < z:
                tally.add(ref_lp[a:z], [q[a:z] for q in q_logits], targets[start + a : start + z], floor)
        start += b
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    total = tallies[0]
    for t in tallies[1:]:
        total = total.merged(t)
    info = {
        "tokens_scored": total.ref.count,
        "chunks": n,
        "ctx": ctx,
        "seconds": round(seconds, 3),
        "tokens_per_s": n * ctx * max(1, len(models)) / seconds,  # forward-pass tokens, all models together
        "mode": "layer-streamed" if stream else "whole-model",
        "reference_source": "model" if reference is None else str(reference.path),
    }
    results = [{**res, **info} for res in total.summaries()]
    if datasets is not None:
        per = [t.summaries() for t in tallies]
        for k, res in enumerate(results):
            res["datasets"] = {name: per[d][k] for d, (name, _, _) in enumerate(spans)}
    return results


def evaluate(ref: Checkpoint, chunks: torch.Tensor, quant: Checkpoint | None = None, **kwargs) -> dict[str, Any]:
    """PPL of ``ref`` (and of ``quant`` with Δppl, KL, top-1 agreement) on ``chunks`` [n, ctx]."""
    return evaluate_many(ref, chunks, [quant] if quant is not None else [], **kwargs)[0]
