"""Keep freed CPU memory for reuse (glibc malloc) in long training loops.

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above its mmap threshold
(at most 32 MiB) with a fresh ``mmap`` and gives it back on ``free``, and trims the heap's top
when it shrinks; a search step at batch 64 allocates and frees about 20 GiB of such blocks, so
every step pays a page fault per 4 KiB page, zero-filled by the kernel. Measured on the 2-core
Xeon of bench/results/cpu_step.md (batch 64, one thread): the reference's architecture step took
38.8 s with 14.8 s of system time, 23.7 s with 0.0 s after ``tune()``; the native one 26.9 s
(11.0 s system) and 16.6 s (1.0 s).

``tune()`` turns glibc's mmap use off (``M_MMAP_MAX = 0``: large blocks come from the heap too)
and its trimming off (``M_TRIM_THRESHOLD`` = -1), so the loop soon reuses its own pages
(measured: from the second or third step on). The process keeps its peak heap instead of
returning it between steps (the peak RSS measured the same: 9.4-9.7 GiB native, 21.0-21.4 GiB
reference at batch 64). It changes no number computed.

The search and train commands call it at start (``HDNAS_MALLOC=default`` opts out); a library
user calls it or not. Elsewhere than glibc (musl, macOS, Windows) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_state = {"tuned": False}


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # glibc only: others lack it
        return libc
    except (OSError, AttributeError):
        return None


def tune() -> str:
    """Keep freed memory in the heap for reuse (see the module docstring). Returns what was
    done, for the run log: "tuned", "default (HDNAS_MALLOC=default)" or "default (not glibc)"."""
    if os.environ.get("HDNAS_MALLOC", "").strip().lower() in ("default", "0", "off", "no"):
        return "default (HDNAS_MALLOC=default)"
    if _state["tuned"]:
        return "tuned"
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return "default (not glibc)"
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    _state["tuned"] = ok
    return "tuned" if ok else "default (mallopt refused)"
