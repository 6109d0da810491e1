"""What machine a measurement ran on: CPU model, vector ISA, load, versions.

Every benchmark result and latency table names the CPU and its vector instruction set (speed on
one x86 CPU says little about another: AVX2-only and AVX-512 machines differ several-fold for
the native kernels), so all of them describe the machine through this one module.
"""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from hdnas.native_build import cpu_features

#: Widest first: (name, the /proc/cpuinfo flags that must all be present).
_ISAS = (("AVX-512 (F/BW/VL/DQ)", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
         ("AVX2+FMA", {"avx2", "fma"}), ("AVX", {"avx"}), ("SSE2", {"sse2"}),
         ("SVE", {"sve"}), ("NEON/ASIMD", {"asimd"}))


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    for line in _cpuinfo().splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``flags`` on x86, ``Features`` on ARM); empty if unknown."""
    return cpu_features()


def vector_isa(flags=None) -> str:
    """The widest vector ISA the CPU has, e.g. 'AVX-512 (F/BW/VL/DQ)' or 'AVX2+FMA'."""
    flags = cpu_flags() if flags is None else set(flags)
    for name, need in _ISAS:
        if need <= flags:
            return name
    return f"unknown ({platform.machine()})"


def load_average() -> str:
    """The 1/5/15-minute load averages ('?' where the OS has none)."""
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except (OSError, AttributeError):
        return "?"


def describe() -> dict:
    """The facts a recorded result carries."""
    import torch
    return {"cpu": cpu_model(), "vector_isa": vector_isa(), "cores": os.cpu_count(),
            "machine": platform.machine(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "load_average": load_average()}


def summary_line() -> str:
    """One line for the head of a results table."""
    d = describe()
    return (f"{d['cpu']} ({d['cores']} cores, vector ISA {d['vector_isa']}), torch {d['torch']}, "
            f"{d['threads']} threads, {d['date']}, load average {d['load_average']}")
