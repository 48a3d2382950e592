"""One report for many quantized models: size, bits per weight, perplexity drift and KL divergence.

Rows come from ``evaluate.evaluate_many`` (one shared reference pass); a row's size and bits per weight come
from the model itself: a packed artifact's linears (codes + scales + zero points) or a GGUF's linear tensors
(block scales included). ``plot`` draws KLD and Δppl against bits per weight, the picture a user wants
before choosing a file; matplotlib is an optional extra (``pip install quantkit[plot]``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.formats.card import (
    CARD_NAME,
    artifact_card,
    checkpoint_provenance,
    eval_section,
    read_report,
    section_key,
    update_card,
)
from quantkit.formats.gguf.model import GGUFModel, is_gguf, same_forward
from quantkit.io.atomic import atomic_file
from quantkit.io.checkpoint import Checkpoint, dir_size, open_checkpoint
from quantkit.io.hub import hub_source
from quantkit.io.locks import hold


def open_quantized(path: str | Path, ref: Checkpoint) -> Checkpoint | GGUFModel:
    """A packed artifact directory or a GGUF file of the same model as ``ref`` (its own tokenizer files are not
    needed: the reference's tokenizer makes the tokens every model is scored on)."""
    model = GGUFModel(path) if is_gguf(path) else open_checkpoint(path, require_tokenizer=False)
    if not same_forward(model.config, ref.config):
        raise QuantkitError(f"{path}: describes a different model than {ref.path} (its config differs)")
    return model


def model_size(model: Checkpoint | GGUFModel) -> dict[str, Any]:
    """{'name', 'kind', 'size_bytes', 'bits_per_weight'} of a packed artifact or a GGUF file."""
    if isinstance(model, GGUFModel):
        return {
            "name": model.path.name,
            "kind": "gguf",
            "size_bytes": model.file_bytes(),
            "bits_per_weight": model.linear_bits_per_weight(),
        }
    spec = model.quant_spec
    bits = 8 * sum(_linear_bytes(model).values()) / model.config.linear_parameters() if spec else None
    return {"name": model.path.name, "kind": "packed", "size_bytes": dir_size(model.path), "bits_per_weight": bits}


def _linear_bytes(ckpt: Checkpoint) -> dict[str, int]:
    """Stored bytes of every quantized-linear tensor (packed codes, scales, zero points, shapes)."""
    out = {}
    for name in ckpt.names():
        if name.startswith("model.layers.") and ".weight_" in name:
            shard, key = ckpt.locations[name]
            begin, end = ckpt.headers[shard][key]["data_offsets"]
            out[name] = end - begin
    return out


def rows(models: list[Checkpoint | GGUFModel], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per model: its size and the drift numbers of its ``evaluate_many`` result."""
    keys = ("delta_ppl", "delta_ppl_pct", "kld_mean", "kld_p99", "kld_p999", "top1_agreement")
    out = []
    for model, res in zip(models, results, strict=True):
        q = res["quantized"]
        out.append({**model_size(model), "ppl": q["ppl"], "ppl_se": q["ppl_se"], **{k: res[k] for k in keys}})
    return out


def format_table(reference: dict[str, float], table: list[dict[str, Any]]) -> str:
    """A markdown table, reference first."""
    cols = ("model", "MB", "bits/w", "ppl", "Δppl %", "KLD mean", "KLD p99", "KLD p99.9", "same top-1 %")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines.append(f"| reference | | | {reference['ppl']:.4f} ± {reference['ppl_se']:.4f} | | | | | |")
    for r in table:
        bits = "" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        lines.append(
            f"| {r['name']} | {r['size_bytes'] / 1e6:.1f} | {bits} | {r['ppl']:.4f} ± {r['ppl_se']:.4f} "
            f"| {r['delta_ppl_pct']:+.3f} | {r['kld_mean']:.5f} | {r['kld_p99']:.5f} | {r['kld_p999']:.5f} "
            f"| {100 * r['top1_agreement']:.2f} |"
        )
    return "\n".join(lines)


def dataset_rows(models: list[Checkpoint | GGUFModel], results: list[dict[str, Any]]) -> dict[str, list[dict]]:
    """Dataset name -> ``rows`` of every model on that dataset alone (results of ``evaluate_many(datasets=)``)."""
    names = list(results[0]["datasets"]) if results and "datasets" in results[0] else []
    return {name: rows(models, [res["datasets"][name] for res in results]) for name in names}


def format_domains(references: dict[str, dict], tables: dict[str, list[dict[str, Any]]]) -> str:
    """One markdown table, a block per dataset ("all" last: every dataset's tokens together)."""
    cols = ("dataset", "model", "bits/w", "ppl", "Δppl %", "KLD mean", "KLD p99", "KLD p99.9", "same top-1 %")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, ref in references.items():
        lines.append(f"| {name} | reference | | {ref['ppl']:.4f} ± {ref['ppl_se']:.4f} | | | | | |")
        for r in tables.get(name, []):
            bits = "" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
            lines.append(
                f"| {name} | {r['name']} | {bits} | {r['ppl']:.4f} ± {r['ppl_se']:.4f} | {r['delta_ppl_pct']:+.3f} "
                f"| {r['kld_mean']:.5f} | {r['kld_p99']:.5f} | {r['kld_p999']:.5f} | {100 * r['top1_agreement']:.2f} |"
            )
    return "\n".join(lines)


def _series(ax, pts: list[dict[str, Any]], key: str, label: str | None) -> None:
    """One dataset's models on ``ax``: points (o packed, s GGUF), joined in bits order when labelled."""
    pts = sorted(pts, key=lambda r: r["bits_per_weight"])
    if label is not None:
        (line,) = ax.plot([r["bits_per_weight"] for r in pts], [r[key] for r in pts], alpha=0.5, label=label)
        color = line.get_color()
    for r in pts:
        marker = "s" if r["kind"] == "gguf" else "o"
        ax.scatter(r["bits_per_weight"], r[key], marker=marker, **({"color": color} if label is not None else {}))
        ax.annotate(r["name"], (r["bits_per_weight"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")


def plot(
    table: list[dict[str, Any]], path: str | Path, title: str = "", series: dict[str, list[dict]] | None = None
) -> Path:
    """KLD mean and Δppl % against bits per weight, one labelled point per model, written to ``path``; with
    ``series`` (dataset name -> rows), one line per dataset instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QuantkitError("--plot: matplotlib is not installed (pip install 'quantkit[plot]')") from None
    groups = series if series else {None: table}
    groups = {k: [r for r in v if r["bits_per_weight"] is not None] for k, v in groups.items()}
    every = [r for v in groups.values() for r in v]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "kld_mean", "mean KL divergence"), (axes[1], "delta_ppl_pct", "Δppl %")):
        for name, pts in groups.items():
            _series(ax, pts, key, name)
        ax.set_xlabel("bits per weight (decoder linears)")
        ax.set_ylabel(label)
        ax.set_yscale("log" if all(r[key] > 0 for r in every) else "linear")
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.suptitle(title or "quality against size (o packed artifact, s GGUF)")
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return path


def check_cards(models: list[Checkpoint | GGUFModel]) -> None:
    """``eval-ppl --card`` writes the cards of quantkit's packed artifacts (GGUF files have none): refuse, before
    any work, a directory quantkit did not write (a hub cache snapshot among them) and one that is busy."""
    for m in models:
        if isinstance(m, GGUFModel):
            continue
        if read_report(m.path) is None or hub_source(m.path) is not None:
            raise QuantkitError(f"--card: {m.path} is not a quantkit artifact (no quantkit.json); its card is not ours")
        if not os.access(m.path, os.W_OK):
            raise QuantkitError(f"--card: {m.path} is not writable (check its permissions)")
        hold((m.path / CARD_NAME).resolve(), f"--card: {m.path / CARD_NAME}")


def dataset_label(path: Path) -> str:
    """A dataset's name in a card: its file name and the start of its SHA-256 (another text, another table)."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return f"{Path(path).name} (sha256 {digest})"


def write_cards(models: list[Checkpoint | GGUFModel], res: dict[str, Any], dataset: Path, ref: Checkpoint) -> list[str]:
    """Put this run's table into the card of every packed artifact in ``models`` (``res``: eval-ppl's result
    with its ``models`` rows), replacing an earlier table of the same dataset; returns the cards written."""
    label = dataset_label(dataset)
    written = []
    for m, row in zip(models, res["models"], strict=True):
        if isinstance(m, GGUFModel):
            continue
        fallback = ""
        if not (m.path / CARD_NAME).is_file():  # an artifact written before cards existed gets one
            prov, report = checkpoint_provenance(m.path, m.raw_config)
            fallback = artifact_card(report, prov, m.path.name, m.config.model_type, dir_size(m.path))
        section = eval_section(label, ref.path.name, res, row)
        written.append(str(update_card(m.path, section_key(label), section, fallback)))
    return written
