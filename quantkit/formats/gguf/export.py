"""Export a Gemma 2 / Gemma 3 checkpoint (dense or pack-quantized) as a llama.cpp GGUF.

Metadata and tensor names follow llama.cpp's converter (``metadata``, ``vocab``, ``names``); the weight types
follow llama-quantize (``policy``); each tensor's bytes come from ``encode``.

The file is written in two passes and streamed (``stream``): tensor infos come from the config alone, then the
tensor data is cut into row-range jobs. One thread reads the jobs' raw bytes from the shards in file order, a
pool of one worker per core converts and encodes them, and the main thread writes finished jobs in file
order; a bounded number of jobs is in flight, so peak memory is a few hundred MB whatever the model size.
Reading, encoding and writing overlap. The file appears at ``out_path`` only when complete.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from quantkit.errors import QuantkitError
from quantkit.formats.card import checkpoint_provenance
from quantkit.formats.gguf.blocks import ENCODABLE, NUMPY_QUANTIZERS, TORCH_QUANTIZERS, NonFiniteError
from quantkit.formats.gguf.encode import encode_rows, encode_tensor
from quantkit.formats.gguf.imatrix import Importance, load_imatrix
from quantkit.formats.gguf.iquants_codebook import CodebookOverflowError
from quantkit.formats.gguf.iquants_iq2 import ImportanceRequiredError
from quantkit.formats.gguf.metadata import (
    add_imatrix_keys,
    add_model_metadata,
    add_provenance,
    check_llamacpp_compatible,
)
from quantkit.formats.gguf.names import RULES
from quantkit.formats.gguf.policy import FILE_TYPES, PlannedTensor, plan_tensors, requires_imatrix, retype
from quantkit.formats.gguf.stream import (
    Job,
    ShardReader,
    default_workers,
    in_order,
    is_dense,
    plan_jobs,
    read_job,
    torch_threads,
)
from quantkit.formats.gguf.vocab import VocabWriter, add_tokenizer_metadata
from quantkit.io.atomic import atomic_file
from quantkit.io.budget import tokenizer_bytes
from quantkit.io.checkpoint import Checkpoint, open_checkpoint
from quantkit.io.tensorio import all_finite

JOBS_PER_WORKER = 2  # jobs in flight per worker: one encoding, one read ahead


def encode_job(
    ckpt: Checkpoint, job: Job, src: torch.Tensor | None, qw: np.ndarray | None = None, searched: bool = False
) -> tuple[np.ndarray, dict[str, Any]]:
    """The bytes of one job (``src``: its rows from read_job; ``qw``: its tensor's importance, or None;
    ``searched``: onto quantkit's searched scales, ``encode_rows``) and the facts its tensor's report entry
    needs (method, exact)."""
    t = job.tensor
    bad = QuantkitError(f"{ckpt.path}: tensor {t.hf_name!r} contains NaN or inf values")
    # these quantizers see NaN/inf themselves (the searched scales do not)
    checked = (t.qtype in TORCH_QUANTIZERS or t.qtype in NUMPY_QUANTIZERS) and not t.is_norm and not searched
    if src is not None and not checked and not all_finite(src):
        raise bad
    if t.is_norm and src is not None:  # 1 + w in fp32, stored F32
        return (src.float() + 1.0).numpy().view(np.uint8), {"method": "norm", "exact": True}
    try:
        if src is None:
            data, entry = encode_tensor(ckpt, t, qw)
            return data, {"method": entry["method"], "exact": entry["exact"]}
        data, exact = encode_rows(src, t.qtype, qw, searched)
    except NonFiniteError:
        raise bad from None
    except CodebookOverflowError as e:  # libggml aborts on such weights
        raise QuantkitError(f"{ckpt.path}: tensor {t.hf_name!r}: {e}") from None
    except ImportanceRequiredError as e:  # the token embedding (llama-quantize needs no imatrix there), or GPTQ's
        raise QuantkitError(f"{t.gguf_name}: {e}; give one with --imatrix FILE") from None
    return data, {"method": "lossless" if exact else "requantized", "exact": exact}


def write_tensor_data(
    ckpt: Checkpoint,
    plan: list[PlannedTensor],
    fout: Any,
    align: int,
    workers: int,
    bar: Any,
    importance: dict[str, np.ndarray] | None = None,
    searched: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """Encode every planned tensor and write its bytes (each padded to ``align``) to ``fout``, in order
    (``importance``: GGUF name -> importance vector, for the tensors that have one; ``searched``: the GGUF
    names rounded onto quantkit's searched scales)."""
    importance = importance or {}
    entries: list[dict[str, Any]] = []
    reader = ShardReader(ckpt)
    exact = True
    try:
        # OpenMP's thread count is per thread: each worker sets its own
        one = functools.partial(torch.set_num_threads, 1)
        with (
            torch_threads(1),
            ThreadPoolExecutor(1, thread_name_prefix="gguf-read") as reads,
            ThreadPoolExecutor(workers, thread_name_prefix="gguf", initializer=one) as pool,
        ):

            def submit(job: Job) -> Future:
                """One thread reads the jobs in file order (sequential I/O, ahead of the encoders)."""
                rows = reads.submit(read_job, ckpt, reader, job)
                name = job.tensor.gguf_name
                qw = importance.get(name)
                return pool.submit(lambda: encode_job(ckpt, job, rows.result(), qw, name in searched))

            results = in_order(plan_jobs(ckpt, plan, reader), submit, workers * JOBS_PER_WORKER)
            for job, (data, facts) in results:
                t = job.tensor
                if job.first:
                    fout.write(bytes(-fout.tell() % align))
                    exact = True
                fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                exact = exact and facts["exact"]
                bar.update(data.nbytes)
                if job.last:  # a dense weight is lossless when every one of its jobs was
                    method = facts["method"]
                    if method != "norm" and is_dense(ckpt, t):
                        method = "lossless" if exact else "requantized"
                    entry = {"name": t.gguf_name, "hf_name": t.hf_name, "type": t.qtype.name, "bytes": t.nbytes}
                    entries.append(entry | {"method": method, "exact": exact})
        fout.write(bytes(-fout.tell() % align))
    finally:
        reader.close()
    return entries


def gguf_file_bytes(ckpt: Checkpoint, qtype: str, imatrix: bool = False, types: Mapping[str, QT] | None = None) -> int:
    """The planned tensor bytes of a ``qtype`` GGUF of ``ckpt`` plus its vocabulary (an upper bound)."""
    plan = retype(plan_tensors(ckpt.config, qtype, imatrix), types or {})
    return sum(t.nbytes for t in plan) + 4 * tokenizer_bytes(ckpt) + (1 << 20)


def export_gguf(
    src: Checkpoint | str | Path,
    out_path: str | Path,
    qtype: str,
    *,
    progress: bool = True,
    workers: int = 0,
    name: str | None = None,
    imatrix: str | Path | Importance | None = None,
    types: Mapping[str, QT] | None = None,
    searched: frozenset[str] = frozenset(),
) -> dict:
    """Write ``src`` as a ``qtype`` GGUF at ``out_path`` (atomically) and return a report dict.
    ``workers``: encoding threads (0: one per usable core); ``name``: general.name (default: ``src``'s
    directory name); ``imatrix``: an importance-matrix GGUF (or its loaded ``Importance``), used as
    llama-quantize --imatrix uses it; ``types``: GGUF tensor name -> ggml type, in place of the file type's
    (overrides, a budget mix; ``policy.retype``); ``searched``: tensors rounded onto quantkit's searched
    scales rather than as llama-quantize rounds them (a budget mix's Q2_0 weights)."""
    start = time.perf_counter()
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src)
    cfg, out_path = ckpt.config, Path(out_path)
    check_llamacpp_compatible(cfg)
    imp = load_imatrix(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
    if imp is not None and not imp.vectors:  # llama-quantize: an empty imatrix is no imatrix
        imp = None
    plan = retype(plan_tensors(cfg, qtype, imp is not None), types or {})
    importance = tensor_importance(imp, plan)
    check_importance(ckpt, qtype, plan, importance)
    check_encodable(ckpt, qtype, plan)
    with atomic_file(out_path) as tmp:
        writer = VocabWriter(tmp, RULES[cfg.model_type].gguf_arch)
        try:
            write_header(writer, ckpt, qtype, plan, name, imp)
            fout = writer.fout[0]
            with _progress(sum(t.nbytes for t in plan), progress) as bar:
                n = workers or default_workers()
                entries = write_tensor_data(ckpt, plan, fout, writer.data_alignment, n, bar, importance, searched)
        finally:
            writer.close()
    report = _report(ckpt, out_path, qtype, plan, entries, time.perf_counter() - start)
    if imp is not None:
        report["imatrix"] = {"file": imp.path, "entries": len(imp.vectors), "tensors": len(importance)}
    return report


def tensor_importance(imp: Importance | None, plan: list[PlannedTensor]) -> dict[str, np.ndarray]:
    """GGUF name -> importance vector of every planned weight the imatrix has (by name, as llama-quantize
    matches them; a vector of the wrong length is an error, the token embedding's is ignored)."""
    if imp is None:
        return {}
    vectors = ((t.gguf_name, imp.for_tensor(t.gguf_name, t.shape[1])) for t in plan if len(t.shape) == 2)
    return {name: v for name, v in vectors if v is not None}


def write_header(
    writer: VocabWriter,
    ckpt: Checkpoint,
    qtype: str,
    plan: list[PlannedTensor],
    name: str | None,
    imp: Importance | None = None,
) -> None:
    """The file's header, metadata and tensor infos (everything before the tensor data)."""
    prov, report = checkpoint_provenance(ckpt.path, ckpt.raw_config)
    default_name = ckpt.path.name if report else prov.name  # a hub snapshot: its repo, not its commit
    add_model_metadata(writer, ckpt.config, name or default_name, FILE_TYPES[qtype][1])
    add_provenance(writer, prov, report, qtype, ckpt.config.model_type)
    if imp is not None:
        add_imatrix_keys(writer, imp.path, next(iter(imp.datasets), None), len(imp.vectors), imp.chunk_count)
    add_tokenizer_metadata(writer, ckpt)
    for t in plan:
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def overhead_bytes(ckpt: Checkpoint, qtype: str, name: str | None = None) -> int:
    """The bytes of a ``qtype`` GGUF of ``ckpt`` that are not tensor data, at most: its header (written once to
    a scratch file in the system's temporary directory; it does not depend on the tensors' types) and the
    padding after each tensor, plus 1 KiB for the importance matrix's keys."""
    plan = plan_tensors(ckpt.config, qtype)
    with tempfile.TemporaryDirectory(prefix="quantkit-header-") as d:
        writer = VocabWriter(Path(d) / "header.gguf", RULES[ckpt.config.model_type].gguf_arch)
        try:
            write_header(writer, ckpt, qtype, plan, name)
            size, align = writer.fout[0].tell(), writer.data_alignment
        finally:
            writer.close()
    return size + align * (len(plan) + 1) + 1024


def check_importance(
    ckpt: Checkpoint, qtype: str, plan: list[PlannedTensor], importance: dict[str, np.ndarray] | None = None
) -> None:
    """Refuse, as llama-quantize does, a file type whose weights need an importance matrix (Q2_K_S; IQ3_XXS /
    IQ3_XS / IQ2_* where a weight's rows fit IQ3_XXS or an IQ2 type) when one of those weights has none (``importance``:
    what the given imatrix has), unless GPTQ already wrote its blocks from its calibration."""
    importance = importance or {}
    for t in plan:
        if t.gguf_name in importance or not requires_imatrix(qtype, t):
            continue
        if ckpt.has_blocks(t.hf_name.removesuffix(".weight")):
            continue
        if importance:
            raise QuantkitError(
                f"--type {qtype}: the importance matrix has no entry for {t.gguf_name} ({t.qtype.name}), and "
                "llama-quantize refuses to quantize it without one"
            )
        gptq = f", or use quantize --method gptq --format gguf --type {qtype}, which calibrates it"
        raise QuantkitError(
            f"--type {qtype} requires an importance matrix ({t.gguf_name} would be {t.qtype.name}, as in "
            f"llama-quantize); give one with --imatrix FILE{gptq}"
        )


def check_encodable(ckpt: Checkpoint, qtype: str, plan: list[PlannedTensor]) -> None:
    """Refuse a plan holding a ggml type quantkit has no encoder for (a type the rules name before quantkit
    encodes it), unless GPTQ already wrote those blocks."""
    for t in plan:
        if t.qtype not in ENCODABLE and not ckpt.has_blocks(t.hf_name.removesuffix(".weight")):
            raise QuantkitError(f"--type {qtype}: {t.gguf_name} would be {t.qtype.name}, which quantkit cannot write")


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="Writing GGUF", disable=not enabled)


def _report(
    ckpt: Checkpoint, path: Path, qtype: str, plan: list[PlannedTensor], entries: list[dict], seconds: float
) -> dict[str, Any]:
    counts = {m: sum(e["method"] == m for e in entries) for m in ("lossless", "requantized", "norm")}
    types: dict[str, int] = {}
    for t in plan:
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    n_params = sum(int(np.prod(t.shape)) for t in plan)
    spec = ckpt.quant_spec
    return {
        "path": str(path),
        "qtype": qtype,
        "file_type": int(FILE_TYPES[qtype][1]),
        "arch": RULES[ckpt.config.model_type].gguf_arch,
        "source": "dense" if spec is None else f"int{spec.bits} g{spec.group_size} {'sym' if spec.sym else 'asym'}",
        "file_size": path.stat().st_size,
        "n_params": n_params,
        "bits_per_weight": 8 * sum(t.nbytes for t in plan) / n_params,
        "counts": counts,
        "types": types,
        "seconds": seconds,
        "tensors": entries,
    }
