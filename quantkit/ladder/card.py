"""The ladder directory's README.md: a model card with the quality table and the plot.

``front_matter`` is a stand-in, kept apart on purpose: the shared Hub-convention YAML front matter is
another branch's ``quantkit.formats.card.front_matter``; at merge this module's copy gives way to it.
"""

from __future__ import annotations

from typing import Any

from quantkit.eval.report import format_table


def front_matter(base_model: str, types: list[str]) -> str:
    """Hub-convention YAML front matter of a GGUF ladder (stand-in for formats.card.front_matter)."""
    tags = ["gguf", "quantized", "quantkit", *(t.upper() for t in types)]
    lines = ["---", f"base_model: {base_model}", "library_name: gguf", "tags:"]
    return "\n".join([*lines, *(f"- {t}" for t in tags), "---", ""])


def ladder_card(report: dict[str, Any], plot_name: str | None) -> str:
    """README.md of a ladder directory, from its report.json."""
    model = report["model_name"]
    ev = report["eval"]
    method = report["settings"]["method"]
    how = "GPTQ into each type's own blocks" if method == "gptq" else "round-to-nearest (llama-quantize's rules)"
    lines = [
        front_matter(model, [r["type"] for r in report["types"]]),
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
