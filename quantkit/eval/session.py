"""What ``quantkit eval-ppl`` does, as one library call: open the models and texts, check a saved reference,
score every quantized model (per dataset and over all), optionally save the reference, plot."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import QuantkitError
from quantkit.eval.evaluate import evaluate_many
from quantkit.eval.reference import Reference, check_tokens, read_reference, writing
from quantkit.eval.report import check_cards, dataset_rows, open_quantized, plot, rows, write_cards
from quantkit.io.budget import eval_bytes, refuse_if_over_memory
from quantkit.io.checkpoint import Checkpoint, open_checkpoint
from quantkit.io.dtypes import compute_dtype, torch_dtype
from quantkit.io.texts import default_evaluation_text, resolve_dataset, text_tokens, with_bos
from quantkit.io.tokenizer import Tokenizer

DEFAULT_CTX = 512


@dataclass(frozen=True)
class EvalOptions:
    """eval-ppl's options; ``ctx`` None: 512, or the saved reference's."""

    ctx: int | None = None
    chunks: int | None = None
    batch_size: int = 1
    dtype: str = "auto"  # the forwards' dtype: "auto" = bfloat16 for a bf16 MODEL_DIR on bf16 hardware
    exact: bool = False  # fp32 forwards whatever ``dtype`` says: transformers' fp32 numbers, bit for bit
    device: str = "cpu"
    stream: bool | None = None
    progress: bool = True


def dataset_specs(values: list[str] | tuple[str, ...]) -> list[tuple[str, Path]]:
    """(label, path) of every ``--dataset`` (none: the shipped WikiText-2 test excerpt, labelled "wiki")."""
    specs = [resolve_dataset(v) for v in values] or [("wiki", default_evaluation_text())]
    seen = set()
    for label, _ in specs:
        if label in seen or label == "all":
            why = "is the name of the total" if label == "all" else "is given twice"
            raise QuantkitError(f"--dataset: the label {label!r} {why} (label them NAME=PATH)")
        seen.add(label)
    return specs


def check_single_text(specs: list[tuple[str, Path]], option: str) -> None:
    """A reference file holds one text's tokens (as llama-perplexity's does): one --dataset per file."""
    if len(specs) > 1:
        raise QuantkitError(
            f"{option}: a reference file holds one text's tokens; give one --dataset (one run, one file per text)"
        )


def open_reference(path: str | Path, ref: Checkpoint) -> Reference:
    saved = read_reference(path)
    if saved.n_vocab != ref.config.vocab_size:
        raise QuantkitError(
            f"{path}: written for a vocabulary of {saved.n_vocab}, {ref.path} has {ref.config.vocab_size}"
        )
    return saved


def eval_dtype(ref: Checkpoint, name: str = "auto", device: str = "cpu") -> str:
    """The dtype the models are run in for scoring (eval-ppl's and the ladder's alike): ``name``, or for
    "auto" bfloat16 where the checkpoint is bf16 and ``device`` has bf16 hardware, else float32."""
    return compute_dtype(name, ref.dtype_of("model.embed_tokens.weight"), device)


def _texts(tok: Tokenizer, specs, ctx: int, chunks: int | None) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The text tokens [n, ctx] of every dataset stacked, and (label, chunk count) of each."""
    parts = [text_tokens(tok, path, ctx, chunks) for _, path in specs]
    return torch.cat(parts), [(label, len(p)) for (label, _), p in zip(specs, parts, strict=True)]


def run_eval(
    model_dir: str | Path,
    quantized: list[str],
    specs: list[tuple[str, Path]],
    opts: EvalOptions,
    reference: str | Path | None = None,
    save_reference: str | Path | None = None,
    plot_path: str | Path | None = None,
    card: bool = False,
) -> dict[str, Any]:
    """eval-ppl's result: the reference's and every quantized model's numbers over all datasets, per dataset,
    and one row per model. With ``reference`` the unquantized weights are never read (MODEL supplies the
    tokenizer and the config the quantized models must match). ``card``: each packed artifact's README.md gets
    one table per dataset. Outputs must be checked by the caller."""
    ref = open_checkpoint(model_dir)
    if ref.is_quantized:
        raise QuantkitError(
            f"{model_dir}: a quantized artifact; eval-ppl expects the unquantized model as MODEL_DIR and the "
            f"artifact as --quantized (quantkit eval-ppl MODEL_DIR --quantized {model_dir})"
        )
    saved = open_reference(reference, ref) if reference else None
    quants = [open_quantized(q, ref) for q in quantized]
    if card:
        check_cards(quants)
    tok = Tokenizer(ref.tokenizer_path)
    ctx = opts.ctx or (saved.n_ctx if saved else DEFAULT_CTX)
    raw, datasets = _texts(tok, specs, ctx, opts.chunks or (saved.n_chunk if saved else None))
    if saved:
        check_tokens(saved, raw, f"{specs[0][1]} tokenized by {model_dir}'s tokenizer")
    dtype = "float32" if opts.exact else eval_dtype(ref, opts.dtype, opts.device)
    act = 4 if dtype == "float32" else 2
    n_models = len(quants) + (0 if saved else 1)
    need = eval_bytes(ref.config, raw.shape[0], ctx, opts.batch_size, act) * max(1, n_models)
    refuse_if_over_memory(need, f"--ctx {ctx} x --batch-size {opts.batch_size}", "lower --ctx or --batch-size")
    with ExitStack() as stack:
        save = stack.enter_context(writing(save_reference, raw, ref.config.vocab_size)) if save_reference else None
        results = evaluate_many(
            None if saved else ref, with_bos(raw, tok.bos_id), quants, dtype=torch_dtype(dtype),
            device=opts.device, stream=opts.stream, batch_size=opts.batch_size, progress=opts.progress,
            datasets=datasets, reference=saved, save=save,
        )  # fmt: skip
    res = dict(results[0], dtype=dtype, dataset=str(specs[0][1]) if len(specs) == 1 else [str(p) for _, p in specs])
    res["datasets"] = {
        label: {"path": str(path), "chunks": count, "ctx": ctx, "tokens_scored": count * (ctx - 1 - ctx // 2),
                **results[0]["datasets"][label]}
        for (label, path), (_, count) in zip(specs, datasets, strict=True)
    }  # fmt: skip
    if save_reference:
        res["saved_reference"] = str(save_reference)
    if quants:
        res["models"] = rows(quants, results)
        for label, table in dataset_rows(quants, results).items():
            res["datasets"][label]["models"] = table
    if card:
        res["cards"] = [c for (label, path) in specs for c in write_cards(quants, res["datasets"][label], path, ref)]
    if plot_path:
        series = {label: d["models"] for label, d in res["datasets"].items()} if len(specs) > 1 else None
        title = f"{ref.path.name}: {res['chunks']} x {res['ctx']} tokens"
        res["plot"] = str(plot(res["models"], plot_path, title, series))
    return res
