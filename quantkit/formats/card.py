"""Model cards (``README.md``) in the Hugging Face Hub's convention, for the artifacts quantkit writes.

A card is YAML front matter (``front_matter``: base_model, base_model_relation, library_name, license, tags)
and markdown: how the model was quantized (method, recipe, bits per weight, size) and how to load it.
``eval-ppl --card`` puts its results in sections of their own (``set_section``), one per dataset, each
between two HTML comments, so a later run on the same dataset replaces its table instead of adding one.
``Provenance`` is what a card and a GGUF say about the source: its Hub id and commit (when it came from
the hub cache) and its license (from its own card's front matter, or its config).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from quantkit import __version__
from quantkit.io.atomic import atomic_file
from quantkit.io.calibration import calibration_label
from quantkit.io.hub import hub_source

CARD_NAME = "README.md"
HUB = "https://huggingface.co"


def front_matter(
    base_model: str | None,
    tags: Sequence[str],
    license: str | None = None,
    library_name: str = "transformers",
    relation: str = "quantized",
) -> str:
    """The YAML front matter of a Hub model card, ``---`` lines included, ending with a newline.

    ``base_model``: the Hub id (``org/name``) of the model this one was made from; None when unknown (a
    local checkpoint): then a comment asks for it, since the Hub accepts only an id there. ``tags``: e.g.
    ["quantkit", "gptq", "int4", "compressed-tensors", "gemma3"]. ``license``: the source's license id,
    omitted when None. ``library_name``: "transformers" for packed artifacts, "gguf" for GGUF files.
    ``relation``: the Hub's ``base_model_relation`` (quantized, finetune, adapter, merge)."""
    data: dict[str, Any] = {}
    if base_model:
        data |= {"base_model": base_model, "base_model_relation": relation}
    data["library_name"] = library_name
    if license:
        data["license"] = license
    data["tags"] = list(dict.fromkeys(tags))
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    if not base_model:
        text = f"# base_model: set the Hub id of the source model here (base_model_relation: {relation})\n" + text
    return f"---\n{text}---\n"


def read_front_matter(card: Path) -> dict[str, Any]:
    """The front matter of a card as a dict; {} when there is none or it is not valid YAML (a source's card
    never stops a run)."""
    try:
        lines = card.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    if not lines or lines[0].strip() != "---" or "---" not in (s.strip() for s in lines[1:]):
        return {}
    end = next(i for i, s in enumerate(lines[1:], 1) if s.strip() == "---")
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class Provenance:
    """What is known of a source model: its Hub id and commit (None for a local directory), its license."""

    name: str
    base_model: str | None = None
    revision: str | None = None
    license: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base_model": self.base_model, "revision": self.revision, "license": self.license}


def _license(card: dict[str, Any], config: dict[str, Any]) -> str | None:
    for value in (card.get("license"), config.get("license")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def source_provenance(model_dir: Path, config: dict[str, Any]) -> Provenance:
    """The provenance of an unquantized source directory (``config``: its config.json)."""
    hub = hub_source(model_dir)
    card = read_front_matter(model_dir / CARD_NAME)
    if hub is None:
        return Provenance(model_dir.name, None, None, _license(card, config))
    return Provenance(hub.repo.split("/")[1], hub.repo, hub.commit, _license(card, config))


def arch_tag(model_type: str) -> str:
    return "gemma3" if model_type.startswith("gemma3") else model_type


def artifact_tags(report: dict[str, Any], model_type: str) -> list[str]:
    """Tags of a quantize output: quantkit, the method, the grid, the storage format, the architecture."""
    opts = report["options"]
    fmt = "gguf" if report["format"].startswith("ggml blocks") else "compressed-tensors"
    return ["quantkit", opts["method"], f"int{opts['bits']}", fmt, arch_tag(model_type)]


def _method_line(opts: dict[str, Any]) -> str:
    if opts["method"] == "rtn":
        return f"RTN (round to nearest; scale search: {opts['scale_search']})"
    calib = calibration_label(opts.get("calib"))  # None: the default set, by name
    extra = ", act-order" if opts["act_order"] else ""
    extra += ", towards the unquantized layer outputs (GPTQ v2)" if opts["fp_targets"] else ""
    return (
        f"GPTQ, calibrated on {calib}: {opts['nsamples']} windows x {opts['seqlen']} tokens (seed {opts['seed']}), "
        f"damping {opts['damp']}{extra}"
    )


def recipe_toml(opts: dict[str, Any]) -> str:
    """quantkit's options as a recipe file (TOML; a JSON string is a TOML basic string). None is left out."""
    lines = []
    for key, value in sorted(opts.items()):
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        elif isinstance(value, str):
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _gguf_type_for(opts: dict[str, Any]) -> str:
    """The GGUF type an artifact's codes go into as they are (see ``quantkit export``)."""
    if opts["bits"] == 8 and opts["sym"]:
        return "q8_0"
    if opts["bits"] == 4:
        return "q4_0" if opts["sym"] else "q4_1"
    return "q4_k_m"


def _intro(name: str, prov: Provenance) -> str:
    if prov.base_model:
        rev = f" (revision `{prov.revision[:12]}`)" if prov.revision else ""
        return f"**{name}** is [{prov.base_model}]({HUB}/{prov.base_model}){rev} quantized with quantkit {__version__}."
    return (
        f"**{name}** is the local checkpoint `{prov.name}` quantized with quantkit {__version__} (its Hub id is not "
        "known: set `base_model` in the front matter before uploading)."
    )


def artifact_card(report: dict[str, Any], prov: Provenance, name: str, model_type: str, size_bytes: int) -> str:
    """The card of a quantize output directory ``name`` from its report (quantkit.json) and its source."""
    opts = report["options"]
    grid = f"int{opts['bits']}, " + ("per channel" if opts["group_size"] == -1 else f"group {opts['group_size']}")
    grid += f", {'symmetric' if opts['sym'] else 'asymmetric'}, scales {opts['scale_dtype']}"
    qtype = _gguf_type_for(opts)
    recipe = recipe_toml(opts)
    body = f"""
# {name}

{_intro(name, prov)}

## Quantization

| | |
|---|---|
| method | {_method_line(opts)} |
| weights | {grid} |
| format | {report["format"]} |
| bits per weight | {report["bits_per_weight"]:.3f} (decoder-layer linears, scales included) |
| size | {size_bytes / 1e6:.1f} MB |
| kept as they are | token embedding (tied with the output), norms |
| mean weight rel. error | {report["mean_weight_rel_err"]:.4e} |

The recipe (`quantkit quantize --recipe recipe.toml` repeats it):

```toml
{recipe}```

## Use

transformers (with compressed-tensors installed: `pip install transformers compressed-tensors`):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("./{name}")
tokenizer = AutoTokenizer.from_pretrained("./{name}")
```

vLLM (reads compressed-tensors checkpoints): `vllm serve ./{name}`

llama.cpp, through a GGUF written from this checkpoint (its codes go into {qtype} blocks without rounding
again when the scales are float16 and the groups a multiple of 32; otherwise they are quantized again):

```sh
quantkit export ./{name} --format gguf --type {qtype} -o {name}-{qtype}.gguf
llama-cli -m {name}-{qtype}.gguf
```
"""
    return front_matter(prov.base_model, artifact_tags(report, model_type), prov.license) + body


def read_report(artifact: Path) -> dict[str, Any] | None:
    """A quantize output's report (quantkit.json), or None for any other directory."""
    try:
        report = json.loads((artifact / "quantkit.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("options"), dict) else None


def checkpoint_provenance(path: Path, config: dict[str, Any]) -> tuple[Provenance, dict[str, Any] | None]:
    """(provenance, report) of a checkpoint directory. A quantize output's provenance comes from its card's
    front matter (as llama.cpp's converter reads a card: an edited base_model counts) over its report's
    record; an unquantized source's from ``source_provenance`` (report None)."""
    report = read_report(path)
    if report is None:
        return source_provenance(path, config), None
    rec = report.get("provenance") if isinstance(report.get("provenance"), dict) else {}
    card = read_front_matter(path / CARD_NAME)
    base = card.get("base_model", rec.get("base_model"))
    base = base[0] if isinstance(base, list) and base else base
    base = base if isinstance(base, str) and base else None
    rev = rec.get("revision") if base == rec.get("base_model") else None
    name = rec.get("name") if isinstance(rec.get("name"), str) else path.name
    return Provenance(name, base, rev, _license(card, {"license": rec.get("license")})), report


# ------------------------------------------------------------------------------------ evaluation sections

_BEGIN, _END = "<!-- quantkit-eval: {key} -->", "<!-- /quantkit-eval: {key} -->"


def section_key(label: str) -> str:
    """A marker-safe key for a dataset label (no ``-->`` or line breaks can end the comment early)."""
    return re.sub(r"[^A-Za-z0-9._ ()+=-]", "_", label).replace("--", "-_").strip()


def set_section(card: str, key: str, markdown: str) -> str:
    """``card`` with the section ``key`` replaced by ``markdown`` (appended at the end when it has none)."""
    begin, end = _BEGIN.format(key=key), _END.format(key=key)
    block = f"{begin}\n{markdown.strip()}\n{end}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(card):
        return pattern.sub(lambda _: block, card, count=1)
    return card.rstrip("\n") + "\n\n" + block


def update_card(artifact: Path, key: str, markdown: str, fallback: str) -> Path:
    """Put section ``key`` into ``artifact``'s card, atomically (``fallback``: the card when it has none)."""
    path = artifact / CARD_NAME
    card = path.read_text(encoding="utf-8") if path.is_file() else fallback
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(set_section(card, key, markdown), encoding="utf-8")
    return path


def eval_section(label: str, reference: str, res: dict[str, Any], row: dict[str, Any]) -> str:
    """Markdown of one ``eval-ppl`` result on dataset ``label``: ``res`` the run (reference, chunks, ctx),
    ``row`` this model's row (``eval.report.rows``)."""
    ref = res["reference"]
    return f"""## Evaluation: {label}

`quantkit eval-ppl` against `{reference}`: {res["chunks"]} chunks x {res["ctx"]} tokens ({res["tokens_scored"]} tokens
scored; perplexity as llama-perplexity computes it, KL divergence and top-1 agreement on the same tokens).

| model | ppl | Δppl | KLD mean | KLD p99 | same top-1 |
|---|---|---|---|---|---|
| `{reference}` (reference) | {ref["ppl"]:.4f} ± {ref["ppl_se"]:.4f} | | | | |
| `{row["name"]}` | {row["ppl"]:.4f} ± {row["ppl_se"]:.4f} | {row["delta_ppl"]:+.4f} ({row["delta_ppl_pct"]:+.2f}%) \
| {row["kld_mean"]:.5f} | {row["kld_p99"]:.5f} | {100 * row["top1_agreement"]:.2f}% |
"""
