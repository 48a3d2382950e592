"""Memory statistics of a quantize run (peak host RSS, peak GPU allocation) and handing freed heap back."""

from __future__ import annotations

import ctypes
import resource

import torch


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


_LIBC = _load_libc()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim), between the steps of a layer.

    glibc serves allocations below its adaptive mmap threshold (up to 32 MB) from its heaps, and freed
    blocks there stay resident until trimmed, so RSS can sit above what is alive. (Fixing the threshold
    instead returned them at once but cost the 270M's calibration a third of its time in page faults.)
    A no-op where libc has no malloc_trim."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:
        pass


def peak_rss_bytes() -> int:
    """The process's peak RSS (host memory, whatever the device)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_gib() -> float:
    """``peak_rss_bytes`` in GiB, rounded to 3 decimals as the reports record it."""
    return round(peak_rss_bytes() / 2**30, 3)


def peak_gpu_bytes(device: str) -> int | None:
    """Peak memory torch allocated on ``device`` (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None
