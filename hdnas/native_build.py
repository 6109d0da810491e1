"""Finding, building and loading the native (C++/CUDA) depthwise kernels of ``csrc/``.

Order, at first use (``load()``), never at import of hdnas:

1. ``HDNAS_BUILD_NATIVE=0``: native kernels disabled, nothing is built or loaded.
2. A library built by ``setup.py`` (``hdnas/_native_cpu_<ISA tag>*.so``), unless it was built
   for another CPU (its tag differs from this CPU's, see ``isa_tag``: skipped with a one-line
   warning), a ``csrc`` source of the checkout is newer than it (an edited checkout), or it fails
   to load (e.g. built against another torch).
3. A JIT build with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory
   (``$HDNAS_CACHE_DIR`` or ``~/.cache/hdnas``, one subdirectory per torch/Python version and,
   for the CPU library, per ISA tag); a second process reuses the build (~0.1 s). The sources
   are the checkout's ``csrc/`` or, in a non-editable install (a wheel, ``pip install .``), the
   copy installed with the package as ``hdnas/csrc``.

The CPU library is compiled with ``-march=native``, so it runs only on CPUs with the same
instruction-set extensions: its ISA tag (machine + a hash of the CPU's feature flags) keys the
JIT cache and names the setup.py library, so a home folder shared by different CPUs never loads
a library built for another one. ``HDNAS_NATIVE_PORTABLE=1`` (or a system without
``/proc/cpuinfo`` feature flags) builds without ``-march=native`` under the tag
``<machine>_portable``, which runs on any CPU of that machine type.

The CUDA library (``_native_cuda*.so`` / JIT with nvcc) is loaded the same way, only when torch
has CUDA. A failure is recorded (``error()``), warned about once with its cause, and the Python
backends keep working. The ops register with the dispatcher as ``torch.ops.hdnas_native.*``.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import platform
import re
import sys
import threading
import warnings
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parent
ROOT = PKG_DIR.parent

CPU_SOURCES = ["bindings.cpp", "cpu/dw_fwd.cpp", "cpu/dw_bwd.cpp"]
CPU_DEPS = ["hdnas_dw.h", "cpu/dw_cpu.h"]
CUDA_SOURCES = ["cuda/dw_fwd.cu", "cuda/dw_bwd.cu", "cuda/binding_cuda.cpp"]
CUDA_DEPS = ["hdnas_dw.h", "cuda/dw_common.cuh"]

#: Where the sources are: the copy a non-editable install ships (package data, see setup.py),
#: else the checkout's csrc/ (an editable install).
CSRC_PACKAGED = PKG_DIR / "csrc"
CSRC_CHECKOUT = ROOT / "csrc"


def csrc_dir() -> Path | None:
    """The directory holding every CPU source, or None (neither copy is there)."""
    for d in (CSRC_PACKAGED, CSRC_CHECKOUT):
        if all((d / n).is_file() for n in CPU_SOURCES + CPU_DEPS):
            return d
    return None


# ---------------------------------------------------------------------------------------------
# The CPU's instruction-set identity

def cpu_features(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags: the ``flags`` (x86) or ``Features`` (ARM) lines of
    ``/proc/cpuinfo`` (or of the text ``cpuinfo``), all processors together; empty where there
    is no such file or line. All flags count, not a chosen few: a flag that does not change the
    code costs at most one extra build, a missed one could mean an illegal instruction."""
    if cpuinfo is None:
        return _cpu_features_here()
    feats = set()
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() in ("flags", "features"):
            feats.update(value.split())
    return frozenset(feats)


@functools.lru_cache(maxsize=1)
def _cpu_features_here() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    return cpu_features(text)


def portable_requested() -> bool:
    return os.environ.get("HDNAS_NATIVE_PORTABLE", "0") == "1"


def isa_tag(features: frozenset[str] | None = None, machine: str | None = None,
            portable: bool | None = None) -> str:
    """The instruction-set identity the CPU library is built for: ``<machine>_<12 hex digits>``
    (a hash of the feature flags: a ``-march=native`` build) or ``<machine>_portable`` (no
    ``-march=native``: ``HDNAS_NATIVE_PORTABLE=1``, or no feature flags to go by). Defaults: this
    CPU, ``platform.machine()``, the environment."""
    machine = machine if machine is not None else platform.machine()
    machine = re.sub(r"\W", "_", machine or "unknown").lower()
    if portable is None:
        portable = portable_requested()
    if features is None and not portable:
        features = cpu_features()
    if portable or not features:
        return f"{machine}_portable"
    digest = hashlib.sha256(" ".join(sorted(features)).encode()).hexdigest()[:12]
    return f"{machine}_{digest}"


def is_portable(tag: str) -> bool:
    return tag.endswith("_portable")


def cxx_flags(tag: str | None = None) -> list[str]:
    """C++ flags shared by setup.py and the JIT build for a library of ISA ``tag`` (default:
    this CPU's): ``-march=native`` unless the tag is portable."""
    flags = ["-O3", "-fopenmp", "-DNDEBUG"]
    if not is_portable(tag if tag is not None else isa_tag()):
        flags.append("-march=native")
    return flags


NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]  # torch picks -std

_lock = threading.RLock()  # load("cuda") loads "cpu" first, under the lock
_state: dict[str, object] = {}  # kind -> True | error string
_source: dict[str, str] = {}  # kind -> the library file or JIT build directory loaded


def build_mode() -> str:
    """HDNAS_BUILD_NATIVE: '0' (never), '1' (always; failures are errors in setup.py), 'auto'."""
    v = os.environ.get("HDNAS_BUILD_NATIVE", "auto").strip().lower()
    if v in ("0", "false", "no", "off"):
        return "0"
    if v in ("1", "true", "yes", "on", "force"):
        return "1"
    return "auto"


def cache_dir() -> Path:
    """The JIT cache of this torch/Python version (``build_dir`` adds the library)."""
    import torch

    base = os.environ.get("HDNAS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hdnas")
    tag = f"torch{torch.__version__.replace('+', '_')}_py{sys.version_info[0]}{sys.version_info[1]}"
    return Path(base) / "torch_extensions" / tag


def build_dir(kind: str, tag: str | None = None) -> Path:
    """The JIT build directory of ``kind``: ``cpu_<ISA tag>`` (default tag: this CPU's, see
    ``isa_tag``), or ``cuda`` (its host code is built without ``-march=native``)."""
    if kind == "cpu":
        return cache_dir() / f"cpu_{tag if tag is not None else isa_tag()}"
    return cache_dir() / kind


#: setup.py names the CPU library ``_native_cpu_<ISA tag>``; the tag has no dot.
_LIB_TAG = re.compile(r"_native_cpu_(\w+?)\.")


def library_isa_tag(path) -> str | None:
    """The ISA tag in a setup.py CPU library's file name (None: an untagged, older build)."""
    m = _LIB_TAG.match(os.path.basename(str(path)))
    return m.group(1) if m else None


def _prebuilt(kind: str) -> tuple[str | None, str | None]:
    """(the setup.py library to load, None), or (None, a one-line reason to tell the user that
    one exists but is not for this CPU), or (None, None)."""
    hits = sorted(glob.glob(str(PKG_DIR / f"_native_{kind}*.so")))
    if not hits:
        return None, None
    if kind == "cpu":
        want, anywhere = isa_tag(), isa_tag(portable=True)
        # this CPU's build first, then a portable one; nothing built for another CPU
        hits = ([h for h in hits if library_isa_tag(h) == want]
                + [h for h in hits if library_isa_tag(h) == anywhere])
        if not hits:
            found = ", ".join(f"{os.path.basename(h)} ({library_isa_tag(h) or 'untagged'})"
                              for h in sorted(glob.glob(str(PKG_DIR / "_native_cpu*.so"))))
            return None, f"prebuilt native library not built for this CPU ({want}): {found}"
    lib = hits[0]
    srcs = CPU_SOURCES + CPU_DEPS if kind == "cpu" else CUDA_SOURCES + CUDA_DEPS
    if csrc_dir() == CSRC_CHECKOUT:  # an edited checkout: a stale library must not hide the edit
        paths = [CSRC_CHECKOUT / n for n in srcs]
        newest = max((os.path.getmtime(p) for p in paths if p.exists()), default=0)
        if newest > os.path.getmtime(lib):
            return None, None
    return lib, None


def _jit(kind: str, verbose: bool = False) -> str:
    """Build (or reuse) and load the library of ``kind``; returns the build directory."""
    import torch
    from torch.utils import cpp_extension

    src = csrc_dir()
    if src is None:
        raise RuntimeError("no prebuilt library and no sources to build (neither "
                           f"{CSRC_PACKAGED} nor {CSRC_CHECKOUT} holds them)")
    out = build_dir(kind)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "cpu":
        cpp_extension.load(name="hdnas_native_cpu", sources=[str(src / n) for n in CPU_SOURCES],
                           extra_cflags=cxx_flags(), extra_ldflags=["-fopenmp"],
                           extra_include_paths=[str(src)], build_directory=str(out),
                           is_python_module=False, verbose=verbose)
    else:
        if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
            raise RuntimeError("the CUDA kernels need a CUDA build of torch and a CUDA toolkit "
                               f"(torch.version.cuda={torch.version.cuda}, "
                               f"CUDA_HOME={cpp_extension.CUDA_HOME})")
        missing = [n for n in CUDA_SOURCES + CUDA_DEPS if not (src / n).is_file()]
        if missing:
            raise RuntimeError(f"CUDA sources missing from {src}: {', '.join(missing)}")
        cpp_extension.load(name="hdnas_native_cuda", sources=[str(src / n) for n in CUDA_SOURCES],
                           extra_cflags=["-O3"], extra_cuda_cflags=NVCC_FLAGS,
                           extra_include_paths=[str(src)], build_directory=str(out),
                           is_python_module=False, verbose=verbose)
    return str(out)


def _load(kind: str) -> None:
    import torch

    if kind == "cuda":
        load("cpu")  # the op schemas are defined by the CPU library
        if error("cpu"):
            raise RuntimeError(f"the CPU library failed first: {error('cpu')}")
    lib, why = _prebuilt(kind)
    if why is not None:
        warnings.warn(f"hdnas: {why}; building it for this CPU just in time", RuntimeWarning,
                      stacklevel=3)
    if lib is not None:
        try:
            torch.ops.load_library(lib)
            _source[kind] = lib
            return
        except Exception as e:  # e.g. built against another torch: rebuild below
            warnings.warn(f"hdnas: prebuilt native library {lib} does not load ({e}); "
                          "rebuilding it just in time", RuntimeWarning, stacklevel=3)
    verbose = os.environ.get("HDNAS_NATIVE_VERBOSE", "0") == "1"
    _source[kind] = "JIT build in " + _jit(kind, verbose=verbose)


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


def source(kind: str = "cpu") -> str | None:
    """Where the loaded library of ``kind`` came from (a file, or a JIT build directory)."""
    return _source.get(kind)


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
        where = f"{source(kind)}, " if ok else ""
        print(f"{kind}: {'ok' if ok else 'FAILED: ' + str(error(kind))} ({where}"
              f"{time.time() - t:.1f} s)")
        rc |= int(not ok and kind == "cpu")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
