"""Drive a ladder: refuse what cannot be done, make the missing types (here or on Ray), score every file
against one reference pass, and write report.json, the plot and README.md.

Resumable: each type's GGUF appears in the directory only when complete (a link that never replaces), so a
killed ladder (even SIGKILL) rerun with the same command makes only the types still missing; a GPTQ type
cut short here continues at the layer it had reached (quantize's own resume). Finished GGUFs are never
written again; report.json, README.md and quality.png are derived from them and are rewritten.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.eval.evaluate import evaluate_many
from quantkit.eval.report import open_quantized, plot, rows
from quantkit.eval.session import eval_dtype
from quantkit.formats.card import source_provenance
from quantkit.formats.gguf.export import check_importance, gguf_file_bytes
from quantkit.formats.gguf.policy import plan_tensors
from quantkit.io.atomic import ARTIFACT_MARKER, atomic_file, check_output
from quantkit.io.budget import eval_bytes, refuse_if_over_memory
from quantkit.io.calibration import calibration_digest, calibration_files, calibration_label, check_sources
from quantkit.io.checkpoint import open_checkpoint
from quantkit.io.dtypes import torch_dtype
from quantkit.io.texts import default_evaluation_text, perplexity_chunks
from quantkit.io.tokenizer import Tokenizer
from quantkit.ladder.card import ladder_card
from quantkit.ladder.jobs import import_ray, run_here, run_on_ray
from quantkit.ladder.plan import TypeJob, check_ladder_dir, digest, ladder_settings, plan_jobs, write_marker
from quantkit.quant.quantize import gptq_block_types
from quantkit.quant.recipes import QuantizeOptions

PLOT_NAME = "quality.png"


@dataclass(frozen=True)
class EvalOptions:
    """The one reference pass every type is scored in (eval-ppl's options)."""

    dataset: str | None = None  # default: the shipped WikiText-2 test excerpt
    ctx: int = 512
    chunks: int | None = None
    batch_size: int = 1


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a local cluster
    workers: int | None = None  # tasks in flight (default: local CPUs // threads, or all on a cluster)


def _calibration(method: str, opts: QuantizeOptions, ray: bool) -> tuple[Path | None, bytes | None]:
    """The calibration text as one file and its bytes (what a Ray task is shipped), or for a set of several
    texts (None, the set's digest): each local job reads the texts itself."""
    if method != "gptq":
        return None, None
    sources = check_sources(opts.calib)  # one-line errors for a missing, empty or non-UTF-8 text
    if len(sources) == 1 and sources[0].weight == 1:
        return sources[0].path, sources[0].path.read_bytes()
    if ray:
        raise QuantkitError(
            "--ray ships one calibration text to its workers: give one --calib text, or run without --ray"
        )
    return None, calibration_digest(opts.calib).encode()


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def run_ladder(
    model_dir: str | Path,
    out_dir: str | Path,
    types: tuple[str, ...],
    method: str = "gptq",
    opts: QuantizeOptions | None = None,
    threads: int | None = None,
    evaluation: EvalOptions | None = None,
    ray: RayOptions | None = None,
    progress: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Make (or finish) the ladder of ``types`` of ``model_dir`` in ``out_dir``; returns report.json's contents."""
    import torch

    t0 = time.perf_counter()
    opts = (opts or QuantizeOptions()).replace(method="gptq" if method == "gptq" else "rtn")
    evaluation = evaluation or EvalOptions()
    threads = threads or torch.get_num_threads()
    if ray is not None:
        import_ray()  # before any work: a missing Ray is a one-line error
    out = Path(out_dir)
    ckpt = open_checkpoint(model_dir)
    if ckpt.is_quantized:
        raise QuantkitError(f"{model_dir}: already quantized; a ladder starts from the unquantized model")
    calib_path, calib = _calibration(method, opts, ray is not None)
    data = Path(evaluation.dataset or default_evaluation_text())
    inputs = [model_dir, *(calibration_files(opts.calib) if method == "gptq" else []), data]
    settings = ladder_settings(ckpt, method, opts, calib, threads)
    jobs = plan_jobs(ckpt.path, types, method, opts, threads)
    todo = [j for j in jobs if not (out / j.file_name).is_file()]
    for j in todo:  # a type the job cannot write is refused before anything is written
        _check_writable(ckpt, j)
    need = sum(gguf_file_bytes(ckpt, j.qtype) for j in todo)
    check_output(out, inputs, kind="dir", overwrite=check_ladder_dir(out, settings), need_bytes=need)
    ids = perplexity_chunks(Tokenizer(ckpt.tokenizer_path), data, evaluation.ctx, evaluation.chunks)
    need_eval = eval_bytes(ckpt.config, ids.shape[0], evaluation.ctx, evaluation.batch_size, 4) * (1 + len(types))
    refuse_if_over_memory(need_eval, f"--ctx {evaluation.ctx} x --batch-size {evaluation.batch_size}", "lower them")
    if not (out / ARTIFACT_MARKER).is_file():
        write_marker(out, settings)
    for j in todo:  # each GGUF is published only where nothing is (never replaced)
        check_output(out / j.file_name, inputs, kind="file")
    key = {"settings": settings, "types": list(types), "eval_options": asdict(evaluation),
           "dataset_sha256": digest(data.read_bytes())}  # fmt: skip
    done = None if todo else _finished_report(out, key)
    if done is not None:
        return done
    built = _build(todo, out, calib_path, calib, ray, progress)
    report = _report(ckpt, out, jobs, settings, evaluation, data, ids, progress)
    report.update(key=key, command=command, built=built, mode="ray" if ray is not None else "sequential")
    report["calibration_name"] = calibration_label(opts.calib) if method == "gptq" else None
    report["seconds"] = round(time.perf_counter() - t0, 3)
    _write_outputs(out, report, inputs)
    return report


def _check_writable(ckpt, job: TypeJob) -> None:
    """The one-line refusal the job's own command would give (GPTQ onto a type it has no grid for; an export
    that needs an importance matrix), raised before the ladder writes anything."""
    if job.method == "gptq":
        gptq_block_types(ckpt, job.qtype)
    else:
        check_importance(ckpt, job.qtype, plan_tensors(ckpt.config, job.qtype))


def _finished_report(out: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """report.json of a finished ladder of the same types and evaluation (nothing left to do), else None."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("key") == key else None


def _build(todo: list[TypeJob], out: Path, calib_path, calib, ray: RayOptions | None, progress: bool) -> list:
    """Make the missing types; each finished GGUF is in ``out`` as soon as its job ends."""
    built: list[dict[str, Any]] = []
    if not todo:
        return built
    bar = tqdm(total=len(todo), desc="ladder", unit="type", disable=not progress or ray is None)

    def publish(job: TypeJob, report: dict[str, Any], data: bytes | None) -> None:
        if data is not None:  # from a Ray task: published here, never over an existing file
            with atomic_file(out / job.file_name, overwrite=False) as tmp:
                tmp.write_bytes(data)
        built.append(report)
        bar.update(1)

    with bar:
        if ray is None:
            local = [j if j.method != "gptq" or calib_path is None else _with_calib(j, calib_path) for j in todo]
            run_here(local, out, publish, progress)
        else:
            run_on_ray(todo, calib, publish, ray.address, ray.workers)
    return built


def _with_calib(job: TypeJob, calib_path: Path) -> TypeJob:
    return replace(job, opts=job.opts.replace(calib=str(calib_path)))


def _report(ckpt, out: Path, jobs, settings, evaluation: EvalOptions, data: Path, ids, progress) -> dict[str, Any]:
    """Every type scored against one reference pass (evaluate_many) and its rows."""
    quants = [open_quantized(out / j.file_name, ckpt) for j in jobs]
    dtype = eval_dtype(ckpt)  # eval-ppl's, so the report is the numbers eval-ppl gives on the same files
    results = evaluate_many(
        ckpt, ids, quants, dtype=torch_dtype(dtype), batch_size=evaluation.batch_size, progress=progress
    )
    table = rows(quants, results)
    for row, job in zip(table, jobs, strict=True):
        row.update(name=job.qtype.upper(), type=job.qtype, file=job.file_name, method=job.method)
    first = results[0]
    ev = {k: first[k] for k in ("chunks", "ctx", "tokens_scored", "seconds", "tokens_per_s", "mode")}
    ev.update(dtype=dtype, dataset=str(data), dataset_name=data.name, dataset_sha256=digest(data.read_bytes()))
    prov = source_provenance(ckpt.path, ckpt.raw_config)  # a hub snapshot is named by its repo
    return {
        "quantkit_version": __version__,
        "model": str(ckpt.path.resolve()),
        "model_name": prov.name,
        "provenance": prov.as_dict(),
        "settings": settings,
        "reference": first["reference"],
        "eval": ev,
        "types": table,
    }


def _write_outputs(out: Path, report: dict[str, Any], inputs: list) -> None:
    """report.json, the plot (when matplotlib is there) and README.md: derived, so replaced on a rerun."""
    plot_name = None
    if _have_matplotlib():
        check_output(out / PLOT_NAME, inputs, kind="file", overwrite=True)
        title = f"{report['model_name']}: {report['eval']['chunks']} x {report['eval']['ctx']} tokens"
        plot(report["types"], out / PLOT_NAME, title)
        plot_name = PLOT_NAME
    report["plot"] = plot_name
    with atomic_file(out / "report.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    with atomic_file(out / "README.md", overwrite=True) as tmp:
        tmp.write_text(ladder_card(report, plot_name))
