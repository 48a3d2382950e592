"""One ladder type's GGUF, made here or as a Ray task, with the same bytes either way.

A job is exactly the ``quantize --format gguf`` (GPTQ) or ``export`` command of its type, run with the
job's torch threads set explicitly (the GPTQ arithmetic must not depend on where it runs). On Ray a task
gets the calibration text as bytes (shipped once through the object store; workers need neither the
user's working directory nor ../shared, only the model directory at the same absolute path), writes the
GGUF into a temporary directory of its own and returns the file's bytes, which the driver publishes.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError, Terminated, user_message
from quantkit.formats.gguf.export import export_gguf
from quantkit.formats.gguf.stream import torch_threads
from quantkit.ladder.plan import TypeJob
from quantkit.quant.quantize import quantize_to_gguf

CANCEL_WAIT_S = 10  # how long cancelled tasks get to remove their temporary directories
Publish = Callable[[TypeJob, dict[str, Any], bytes | None], None]


def build_type(job: TypeJob, out: Path, progress: bool = False) -> dict[str, Any]:
    """Write ``job``'s GGUF at ``out`` (atomically; resumable per layer like quantize); a short report."""
    t0 = time.perf_counter()
    with torch_threads(job.threads):
        if job.method == "gptq":
            report = quantize_to_gguf(job.model, out, job.opts, job.qtype, "cpu", progress)["gguf"]
        else:
            report = export_gguf(job.model, out, job.qtype, progress=progress)
    return {
        "type": job.qtype,
        "file": job.file_name,
        "method": job.method,
        "threads": job.threads,
        "file_size": report["file_size"],
        "seconds": round(time.perf_counter() - t0, 3),
        "host": os.uname().nodename,
    }


def build_shipped(job: TypeJob, calib: bytes | None) -> tuple[dict[str, Any], bytes]:
    """A Ray task: ``job`` with its calibration text ``calib`` (bytes), in a temporary directory of the
    worker; returns the report and the GGUF's bytes."""
    with tempfile.TemporaryDirectory(prefix="quantkit-ladder-") as d:
        if job.method == "gptq":
            text = Path(d) / Path(job.opts.calib or "calibration.txt").name  # the name goes into the GGUF
            text.write_bytes(calib or b"")
            job = dataclasses.replace(job, opts=job.opts.replace(calib=str(text)))
        out = Path(d) / job.file_name
        report = build_type(job, out)
        return report, out.read_bytes()


def run_here(jobs: list[TypeJob], out_dir: Path, publish: Publish, progress: bool) -> None:
    """The jobs one after another in this process, each GGUF written straight into ``out_dir``."""
    for job in jobs:
        publish(job, build_type(job, out_dir / job.file_name, progress), None)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise QuantkitError("--ray: Ray is not installed (pip install 'quantkit[ray]')") from None
    return ray


def _init_ray(ray: Any, address: str | None, cpus: int) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), else start a local cluster of ``cpus`` CPUs; whether we
    started it (and so shut it down). A session the caller already opened is used as it is."""
    if ray.is_initialized():
        return False
    local = address is None and not os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    in_main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if in_main else None
    try:
        ray.init(address=address, **({"num_cpus": cpus} if local else {}), **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or os.environ.get("RAY_ADDRESS") or "a local cluster"
        raise QuantkitError(f"--ray: cannot start or reach {where}: {' '.join(str(e).split())[:200]}") from None
    if in_main and on_term is not None:  # Ray's core worker aborts on SIGTERM; ours unwinds (and cleans up)
        signal.signal(signal.SIGTERM, on_term)
    return True


def _check_cpus(ray: Any, threads: int) -> None:
    biggest = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if biggest < threads:
        raise QuantkitError(f"--threads {threads}: no Ray node has that many CPUs (largest: {biggest:g})")


def _task_error(ray: Any, job: TypeJob, e: Exception) -> Exception:
    """A worker's user error as a one-line QuantkitError naming the type; anything else as it is."""
    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
    msg = user_message(cause) if cause is not None else None
    return QuantkitError(f"{job.qtype}: {msg}") if msg is not None else e


def _wait_one(ray: Any, refs: list) -> list:
    """ray.wait for one task; a SIGTERM / Ctrl-C that arrives inside it (Ray wraps what our handler raises
    in a SystemError) comes out as itself."""
    try:
        return ray.wait(refs, num_returns=1)[0]
    except SystemError as e:
        if isinstance(e.__cause__, (Terminated, KeyboardInterrupt)):
            raise e.__cause__ from None
        raise


def _results(ray: Any, remote: Any, jobs: list[TypeJob], calib_ref: Any, workers: int) -> Iterator[tuple]:
    """(job, report, bytes) as tasks finish, with at most ``workers`` tasks in flight."""
    queue, pending = list(jobs), {}
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                job = queue.pop(0)
                pending[remote.remote(job, calib_ref)] = job
            done = _wait_one(ray, list(pending))
            job = pending.pop(done[0])
            try:
                report, data = ray.get(done[0])
            except Exception as e:
                raise _task_error(ray, job, e) from None
            yield job, report, data
    finally:  # stopped early (an error, Ctrl-C, SIGTERM): the tasks still running unwind and clean up
        for ref in pending:
            ray.cancel(ref)
        if pending:
            ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)


def run_on_ray(
    jobs: list[TypeJob], calib: bytes | None, publish: Publish, address: str | None, workers: int | None
) -> None:
    """The jobs as Ray tasks (one per type, ``threads`` CPUs each); each GGUF is published as it arrives."""
    ray = import_ray()
    threads = jobs[0].threads
    if workers is None:
        workers = max(1, (os.cpu_count() or 1) // threads) if address is None else len(jobs)
    started = _init_ray(ray, address, workers * threads)
    try:
        _check_cpus(ray, threads)
        remote = ray.remote(num_cpus=threads, max_retries=0)(build_shipped)
        calib_ref = ray.put(calib)
        for job, report, data in _results(ray, remote, jobs, calib_ref, workers):
            publish(job, report, data)
    finally:
        if started:
            ray.shutdown()
