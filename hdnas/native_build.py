"""Finding, building and loading the native (C++/CUDA) depthwise kernels of ``csrc/``.

Order, at first use (``load()``), never at import of hdnas:

1. ``HDNAS_BUILD_NATIVE=0``: native kernels disabled, nothing is built or loaded.
2. A library built by ``setup.py`` (``hdnas/_native_cpu*.so``), unless a ``csrc`` source is
   newer than it (an edited checkout) or it fails to load (e.g. built against another torch).
3. A JIT build with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory
   (``$HDNAS_CACHE_DIR`` or ``~/.cache/hdnas``, one subdirectory per torch/Python version); a
   second process reuses the build (~0.1 s).

The CUDA library (``_native_cuda*.so`` / JIT with nvcc) is loaded the same way, only when torch
has CUDA. A failure is recorded (``error()``), warned about once with its cause, and the Python
backends keep working. The ops register with the dispatcher as ``torch.ops.hdnas_native.*``.
"""
from __future__ import annotations

import glob
import os
import sys
import threading
import warnings
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parent
ROOT = PKG_DIR.parent
CSRC = ROOT / "csrc"

CPU_SOURCES = ["bindings.cpp", "cpu/dw_fwd.cpp", "cpu/dw_bwd.cpp"]
CPU_DEPS = ["hdnas_dw.h", "cpu/dw_cpu.h"]
CUDA_SOURCES = ["cuda/dw_fwd.cu", "cuda/dw_bwd.cu", "cuda/binding_cuda.cpp"]
CUDA_DEPS = ["hdnas_dw.h", "cuda/dw_common.cuh"]

#: C++ flags shared by setup.py and the JIT build. -march=native: the library is built on the
#: machine that runs it (editable install or JIT); set HDNAS_NATIVE_PORTABLE=1 to drop it.
def cxx_flags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-DNDEBUG"]
    if os.environ.get("HDNAS_NATIVE_PORTABLE", "0") != "1":
        flags.append("-march=native")
    return flags


NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]  # torch picks -std

_lock = threading.RLock()  # load("cuda") loads "cpu" first, under the lock
_state: dict[str, object] = {}  # kind -> True | error string


def build_mode() -> str:
    """HDNAS_BUILD_NATIVE: '0' (never), '1' (always; failures are errors in setup.py), 'auto'."""
    v = os.environ.get("HDNAS_BUILD_NATIVE", "auto").strip().lower()
    if v in ("0", "false", "no", "off"):
        return "0"
    if v in ("1", "true", "yes", "on", "force"):
        return "1"
    return "auto"


def cache_dir() -> Path:
    import torch

    base = os.environ.get("HDNAS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hdnas")
    tag = f"torch{torch.__version__.replace('+', '_')}_py{sys.version_info[0]}{sys.version_info[1]}"
    return Path(base) / "torch_extensions" / tag


def _sources(names) -> list[str]:
    return [str(CSRC / n) for n in names]


def _prebuilt(kind: str) -> str | None:
    hits = sorted(glob.glob(str(PKG_DIR / f"_native_{kind}*.so")))
    if not hits:
        return None
    lib = hits[0]
    srcs = CPU_SOURCES + CPU_DEPS if kind == "cpu" else CUDA_SOURCES + CUDA_DEPS
    if CSRC.is_dir():  # an edited checkout: a stale prebuilt library must not hide the edit
        newest = max((os.path.getmtime(p) for p in _sources(srcs) if os.path.exists(p)), default=0)
        if newest > os.path.getmtime(lib):
            return None
    return lib


def _jit(kind: str, verbose: bool = False) -> None:
    import torch
    from torch.utils import cpp_extension

    if not CSRC.is_dir():
        raise RuntimeError(f"no prebuilt library and no sources to build ({CSRC} is missing)")
    build_dir = cache_dir() / kind
    build_dir.mkdir(parents=True, exist_ok=True)
    if kind == "cpu":
        cpp_extension.load(name="hdnas_native_cpu", sources=_sources(CPU_SOURCES),
                           extra_cflags=cxx_flags(), extra_ldflags=["-fopenmp"],
                           extra_include_paths=[str(CSRC)], build_directory=str(build_dir),
                           is_python_module=False, verbose=verbose)
    else:
        if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
            raise RuntimeError("the CUDA kernels need a CUDA build of torch and a CUDA toolkit "
                               f"(torch.version.cuda={torch.version.cuda}, "
                               f"CUDA_HOME={cpp_extension.CUDA_HOME})")
        cpp_extension.load(name="hdnas_native_cuda", sources=_sources(CUDA_SOURCES),
                           extra_cflags=["-O3"], extra_cuda_cflags=NVCC_FLAGS,
                           extra_include_paths=[str(CSRC)], build_directory=str(build_dir),
                           is_python_module=False, verbose=verbose)


def _load(kind: str) -> None:
    import torch

    if kind == "cuda":
        load("cpu")  # the op schemas are defined by the CPU library
        if error("cpu"):
            raise RuntimeError(f"the CPU library failed first: {error('cpu')}")
    lib = _prebuilt(kind)
    if lib is not None:
        try:
            torch.ops.load_library(lib)
            return
        except Exception as e:  # e.g. built against another torch: rebuild below
            warnings.warn(f"hdnas: prebuilt native library {lib} does not load ({e}); "
                          "rebuilding it just in time", RuntimeWarning, stacklevel=3)
    _jit(kind, verbose=os.environ.get("HDNAS_NATIVE_VERBOSE", "0") == "1")


def load(kind: str = "cpu") -> bool:
    """Load the native library of ``kind`` ('cpu' or 'cuda'); True if its ops are usable."""
    with _lock:
        if kind in _state:
            return _state[kind] is True
        if build_mode() == "0":
            _state[kind] = "disabled by HDNAS_BUILD_NATIVE=0"
            return False
        try:
            _load(kind)
            _state[kind] = True
        except Exception as e:  # noqa: BLE001 - any build/load failure means "not available"
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
            _state[kind] = msg
            warnings.warn(f"hdnas: native {kind.upper()} kernels unavailable ({msg}); the Python "
                          "backends are used instead (set HDNAS_NATIVE_VERBOSE=1 for the build log, "
                          "HDNAS_BUILD_NATIVE=0 to skip the build)", RuntimeWarning, stacklevel=3)
        return _state[kind] is True


def error(kind: str = "cpu") -> str | None:
    """Why ``kind`` is unavailable, or None (also None if not tried yet)."""
    v = _state.get(kind)
    return None if v is True or v is None else str(v)


def status() -> dict[str, object]:
    return dict(_state)


def main(argv=None) -> int:
    """``python -m hdnas.native_build [--cuda]``: build (or find) the native libraries now, e.g.
    once in CI before the tests; prints where they came from and exits 1 if the CPU one fails."""
    import argparse
    import time

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--cuda", action="store_true", help="also the CUDA library")
    a = p.parse_args(argv)
    rc = 0
    for kind in ("cpu", "cuda") if a.cuda else ("cpu",):
        t = time.time()
        ok = load(kind)
        src = _prebuilt(kind) or f"JIT cache {cache_dir() / kind}"
        print(f"{kind}: {'ok' if ok else 'FAILED: ' + str(error(kind))} ({src}, {time.time() - t:.1f} s)")
        rc |= int(not ok and kind == "cpu")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
