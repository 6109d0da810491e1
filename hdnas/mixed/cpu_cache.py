"""A caching allocator for PyTorch's CPU tensors (the native library's ``csrc/cpu/cpu_cache.cpp``).

A search step allocates and frees thousands of tensor buffers of a few dozen sizes. glibc's
malloc serves them from one heap, interleaved with the tensors' small bookkeeping chunks; the
small chunks its per-thread cache keeps sit between freed buffers, freed space does not
coalesce and the heap grows from step to step. Measured (DARTS' second-order step, batch 32,
``hdnas.darts.patch``, the 2-core AMD EPYC with AVX-512 of bench/results/cpu_darts.md): peak RSS
above the loaded model 1.7 GB after one step, 2.5 GB after four, against 0.28 GB of live tensors
at their peak (measured with every block of 64 KiB or more its own mapping); with this allocator
0.42-0.45 GB, steady (recomputing everywhere; docs/darts.md, "Memory: the heap").

``enable()`` installs it process-wide (``c10::SetCPUAllocator``): every CPU tensor buffer of
128 KiB or more is then its own anonymous mapping rounded up to a size class (eight per power of
two: at most 12.5 % padding), and a freed buffer is kept for the next request of its class. A
request that finds none, and would take the mapped total (live + cached) above twice the peak
of the live buffers, first unmaps cached buffers of other classes: the mapped total stays
within 2x the live peak (plus one request). Smaller buffers come from malloc as before.
Numbers computed do not change: only where the bytes live. ``disable()`` puts the previous allocator back (buffers allocated by either are freed by
their own). ``release()`` unmaps the cached buffers; ``stats()`` reports.

``hdnas.darts.patch`` enables it for CPU models (``cpu_cache=False`` or ``HDNAS_CPU_CACHE=0``
opts out). It needs the native library (built at install); without it ``enable()`` returns
False and nothing changes. Limits: it installs with c10's highest allocator priority, which c10
keeps after ``disable()`` (a later ``c10::SetCPUAllocator`` of lower priority is ignored), and
``torch.profiler``'s memory profiling does not see its buffers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hdnas import native_build

#: ``HDNAS_CPU_CACHE=0`` (or off/no/false): ``enable()`` does nothing.
ENV = "HDNAS_CPU_CACHE"


@dataclass(frozen=True)
class CacheStats:
    """Bytes of the cached-size buffers in use (``live``) and kept free (``cached``), the peak of
    their sum (``peak_mapped``), requests served from the cache (``hits``) or by a new mapping
    (``misses``), and bytes given back to the system (``unmapped``), since the process began."""
    live: int
    cached: int
    peak_mapped: int
    hits: int
    misses: int
    unmapped: int


def opted_out() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "no", "false")


def _ops():
    return torch.ops.hdnas_native if native_build.load("cpu") else None


def enable() -> bool:
    """Install the caching allocator (idempotent). Returns whether it is installed: False when
    ``HDNAS_CPU_CACHE=0`` or the native library is not available."""
    if opted_out():
        return enabled()  # (installed before the variable was set: still installed)
    ops = _ops()
    if ops is None:
        return False
    ops.cpu_cache_enable(True)
    return True


def disable() -> bool:
    """Put back the allocator that was there before ``enable()``; returns whether it was on."""
    ops = _ops()
    return bool(ops is not None and ops.cpu_cache_enable(False))


def enabled() -> bool:
    ops = _ops()
    return bool(ops is not None and ops.cpu_cache_enabled())


def release() -> int:
    """Unmap every cached (free) buffer; returns the bytes given back."""
    ops = _ops()
    return int(ops.cpu_cache_release()) if ops is not None else 0


def stats() -> CacheStats:
    ops = _ops()
    return CacheStats(*(ops.cpu_cache_stats() if ops is not None else [0] * 6))
