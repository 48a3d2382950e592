"""The ladder directory's README.md: a model card (the Hub's front matter, the quality table, the plot)."""

from __future__ import annotations

from typing import Any

from quantkit.eval.report import format_table
from quantkit.formats.card import front_matter


def ladder_front_matter(report: dict[str, Any]) -> str:
    """Front matter of a GGUF ladder: the source's Hub id and license when known, one tag per type."""
    prov = report.get("provenance") or {}
    tags = ["gguf", "quantized", "quantkit", *(r["type"].upper() for r in report["types"])]
    return front_matter(prov.get("base_model"), tags, prov.get("license"), library_name="gguf")


def ladder_card(report: dict[str, Any], plot_name: str | None) -> str:
    """README.md of a ladder directory, from its report.json."""
    model = report["model_name"]
    ev = report["eval"]
    method = report["settings"]["method"]
    how = "GPTQ into each type's own blocks" if method == "gptq" else "round-to-nearest (llama-quantize's rules)"
    lines = [
        ladder_front_matter(report),
        f"# {model}: GGUF ladder",
        "",
        f"{len(report['types'])} GGUF files of `{model}` made by quantkit {report['quantkit_version']} ({how}), "
        f"scored against one reference pass of the unquantized model on {ev['chunks']} chunks x {ev['ctx']} "
        f"tokens of `{ev['dataset_name']}` ({ev['tokens_scored']} tokens): perplexity, its change, the KL "
        "divergence from the reference's next-token distribution and how often the top-1 token agrees.",
        "",
        format_table(report["reference"], report["types"]),
        "",
    ]
    if method == "gptq":
        c = report["settings"]["calibration"]
        lines += [f"Calibration: {c['nsamples']} x {c['seqlen']} tokens (seed {c['seed']}) of "
                  f"`{report['calibration_name']}`.", ""]  # fmt: skip
    if plot_name:
        lines += [f"![quality against size]({plot_name})", ""]
    lines += ["Made with:", "", "```", report["command"], "```", ""]
    return "\n".join(lines)
