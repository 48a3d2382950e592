"""Streaming a checkpoint's tensors into GGUF order: row-range jobs, a positional shard reader, and an
ordered, bounded pipeline.

A planned tensor is cut into jobs of a few million weights (row ranges; one job for norms and quantized
artifacts). Dense rows are read straight from the safetensors shards with positional reads (no memory map, so
the page cache is not charged to the process; thread-safe, no shared file position). Results come back in
job order with a bounded number of jobs in flight, so peak memory stays a few hundred MB whatever the model
size.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.policy import PlannedTensor
from quantkit.io import tensorio
from quantkit.io.checkpoint import Checkpoint
from quantkit.io.dtypes import ELEMENT_BYTES, FLOAT_NAMES

JOB_ELEMENTS = 1 << 22  # weights per streamed job: 8 MB of bf16 in, 16 MB of fp32 while encoding


@dataclass(frozen=True)
class RawTensor:
    """Where one tensor's bytes lie: shard file, absolute offset of element 0, dtype, shape."""

    path: Path
    offset: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Job:
    """Rows [start, stop) of one planned tensor (all rows for norms and quantized artifacts)."""

    tensor: PlannedTensor
    start: int
    stop: int

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.tensor.shape[0]


class ShardReader:
    """Reads row ranges of dense tensors from their safetensors shards with ``tensorio.read_tensor``'s
    positional reads (thread-safe), without safetensors' memory maps."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._files: dict[str, tuple[BinaryIO, int]] = {}  # shard -> (open file, offset of its data)

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._files.clear()

    def _open(self, shard: str) -> tuple[BinaryIO, int]:
        if shard not in self._files:  # opened from the main thread (plan_jobs) before any worker runs
            f = open(self.ckpt.path / shard, "rb", buffering=0)  # noqa: SIM115 (closed by close())
            if hasattr(os, "posix_fadvise"):  # jobs read each shard front to back: ask for deep read-ahead
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._files[shard] = f, tensorio.header_and_start(f)[1]
        return self._files[shard]

    def locate(self, name: str) -> RawTensor:
        shard, key = self.ckpt.locations[name]
        _, data_start = self._open(shard)
        info = self.ckpt.headers[shard][key]
        if info["dtype"] not in FLOAT_NAMES:
            raise QuantkitError(
                f"{self.ckpt.path / shard}: tensor {name!r} has dtype {info['dtype']}, not F32/F16/BF16"
            )
        start = data_start + info["data_offsets"][0]
        return RawTensor(self.ckpt.path / shard, start, info["dtype"], tuple(info["shape"]))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a dense tensor in its stored dtype, [stop - start, row_len] (1-D: elements)."""
        raw = self.locate(name)
        f, _ = self._files[self.ckpt.locations[name][0]]
        row = math.prod(raw.shape[1:])
        shape = [stop - start, row] if len(raw.shape) > 1 else [stop - start]
        try:
            return tensorio.read_tensor(f, raw.offset + start * row * ELEMENT_BYTES[raw.dtype], raw.dtype, shape)
        except EOFError:
            raise QuantkitError(f"{raw.path}: truncated while reading {name!r}") from None


def is_dense(ckpt: Checkpoint, t: PlannedTensor) -> bool:
    """Whether ``t`` is read raw from the shards (everything but the linears of a quantized artifact)."""
    module = t.hf_name.removesuffix(".weight")
    if ckpt.has_blocks(module):
        return False
    return t.is_norm or ckpt.quant_spec is None or not ckpt.is_linear_quantized(module)


def plan_jobs(ckpt: Checkpoint, plan: list[PlannedTensor], reader: ShardReader) -> Iterator[Job]:
    """Row-range jobs in file order: ~JOB_ELEMENTS weights each for dense 2-D weights, else one per tensor."""
    for t in plan:
        if t.is_norm or not is_dense(ckpt, t):
            yield Job(t, 0, t.shape[0])
            continue
        reader.locate(t.hf_name)  # opens the shard from this (the main) thread
        step = max(1, JOB_ELEMENTS // t.shape[1])
        for start in range(0, t.shape[0], step):
            yield Job(t, start, min(start + step, t.shape[0]))


def read_job(ckpt: Checkpoint, reader: ShardReader, job: Job) -> torch.Tensor | None:
    """A dense job's rows as stored (None for a quantized artifact's linear, which is encoded whole)."""
    return reader.rows(job.tensor.hf_name, job.start, job.stop) if is_dense(ckpt, job.tensor) else None


def default_workers() -> int:
    """One encoding worker per usable core (reads run on their own thread)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Each worker runs single-threaded torch ops: the pool is the parallelism (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_order(jobs: Iterator[Job], submit: Callable[[Job], Future], depth: int) -> Iterator[tuple[Job, Any]]:
    """Results of submit(job) (a Future) in job order, with at most ``depth`` jobs submitted ahead."""
    pending: deque[tuple[Job, Future]] = deque()
    try:
        for job in jobs:
            pending.append((job, submit(job)))
            if len(pending) >= depth:
                head, fut = pending.popleft()
                yield head, fut.result()
        while pending:
            head, fut = pending.popleft()
            yield head, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
