"""Finding, building and loading the native (C++/CUDA) depthwise kernels of ``csrc/``.

Order, at first use (``load()``), never at import of hdnas:

1. ``HDNAS_BUILD_NATIVE=0``: native kernels disabled, nothing is built or loaded.
2. A library built by ``setup.py`` (``hdnas/_native_cpu_<build tag>*.so``, see ``build_tag``),
   unless a ``csrc`` source of the checkout is newer than it (an edited checkout), or it fails
   to load (e.g. built against another torch). Libraries with another tag (the per-CPU
   ``-march=native`` builds of earlier versions) are ignored.
3. A JIT build with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory
   (``$HDNAS_CACHE_DIR`` or ``~/.cache/hdnas``, one subdirectory per torch/Python version and,
   for the CPU library, per build tag); a second process reuses the build (~0.1 s). The sources
   are the checkout's ``csrc/`` or, in a non-editable install (a wheel, ``pip install .``), the
   copy installed with the package as ``hdnas/csrc``.

The CPU library carries its kernels in several vector-ISA variants (portable, AVX2, AVX-512;
``csrc/cpu/dw_isa.h``) and picks one at run time from the CPU's features, so it is built without
``-march=native`` and one build serves every CPU of its machine type: the build tag is the
machine type (``x86_64_dispatch``). ``HDNAS_NATIVE_ISA=portable|avx2|avx512`` forces a variant
(one the CPU cannot run makes the library unavailable, with the reason); ``isa()`` names the one
running. An opt-in ``-march=native`` is deliberately not offered: the variants are compiled
under target pragmas, which add to the command-line ISA, so ``-march=native`` would put AVX-512
code into the AVX2 and portable variants.

The CUDA library (``_native_cuda*.so`` / JIT with nvcc) is loaded the same way, only when torch
has CUDA. A failure is recorded (``error()``), warned about once with its cause, and the Python
backends keep working. The ops register with the dispatcher as ``torch.ops.hdnas_native.*``.
"""
from __future__ import annotations

import functools
import glob
import os
import platform
import re
import sys
import threading
import warnings
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parent
ROOT = PKG_DIR.parent

CPU_SOURCES = ["bindings.cpp", "cpu/dw_fwd.cpp", "cpu/dw_bwd.cpp", "cpu/dw_dispatch.cpp",
               "cpu/dw_isa_portable.cpp", "cpu/dw_isa_avx2.cpp", "cpu/dw_isa_avx512.cpp",
               "cpu/bn_stats.cpp", "cpu/max_pool.cpp",
               "cpu/bn_sum.cpp", "cpu/pw.cpp", "cpu/cpu_cache.cpp"]
CPU_DEPS = ["hdnas_dw.h", "cpu/dw_cpu.h", "cpu/dw_isa.h", "cpu/dw_simd_impl.h"]
#: The kernel variants, worst first (csrc/cpu/dw_dispatch.cpp), and the CPU features each needs.
ISA_VARIANTS = {"portable": (), "avx2": ("avx2", "fma"),
                "avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq")}
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
# The CPU's features (to check the library's own detection) and the build key

def cpu_features(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags: the ``flags`` (x86) or ``Features`` (ARM) lines of
    ``/proc/cpuinfo`` (or of the text ``cpuinfo``), all processors together; empty where there
    is no such file or line. The library detects features itself (``__builtin_cpu_supports``);
    this independent reading lets tests check that detection."""
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


def build_tag(machine: str | None = None) -> str:
    """What a CPU library is built for: ``<machine>_dispatch`` (default: ``platform.machine()``),
    i.e. any CPU of that machine type, the vector ISA being chosen at run time. The suffix keeps
    these builds apart from the per-CPU ``-march=native`` builds of earlier versions."""
    machine = machine if machine is not None else platform.machine()
    machine = re.sub(r"\W", "_", machine or "unknown").lower()
    return f"{machine}_dispatch"


#: C++ flags shared by setup.py and the JIT build of the CPU library (no -march: see above).
CXX_FLAGS = ["-O3", "-fopenmp", "-DNDEBUG"]
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
    """The JIT build directory of ``kind``: ``cpu_<build tag>`` (default: this machine's, see
    ``build_tag``), or ``cuda``."""
    if kind == "cpu":
        return cache_dir() / f"cpu_{tag if tag is not None else build_tag()}"
    return cache_dir() / kind


#: setup.py names the CPU library ``_native_cpu_<build tag>``; the tag has no dot.
_LIB_TAG = re.compile(r"_native_cpu_(\w+?)\.")


def library_tag(path) -> str | None:
    """The build tag in a setup.py CPU library's file name (None: an untagged, older build)."""
    m = _LIB_TAG.match(os.path.basename(str(path)))
    return m.group(1) if m else None


def _prebuilt(kind: str) -> str | None:
    """The setup.py library of ``kind`` to load, or None (none, only ones with another build
    tag, or older than the checkout's sources)."""
    hits = sorted(glob.glob(str(PKG_DIR / f"_native_{kind}*.so")))
    if kind == "cpu":
        hits = [h for h in hits if library_tag(h) == build_tag()]
    if not hits:
        return None
    lib = hits[0]
    srcs = CPU_SOURCES + CPU_DEPS if kind == "cpu" else CUDA_SOURCES + CUDA_DEPS
    if csrc_dir() == CSRC_CHECKOUT:  # an edited checkout: a stale library must not hide the edit
        paths = [CSRC_CHECKOUT / n for n in srcs]
        newest = max((os.path.getmtime(p) for p in paths if p.exists()), default=0)
        if newest > os.path.getmtime(lib):
            return None
    return lib


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
                           extra_cflags=CXX_FLAGS, extra_ldflags=["-fopenmp"],
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
    lib = _prebuilt(kind)
    loaded = False
    if lib is not None:
        try:
            torch.ops.load_library(lib)
            _source[kind] = lib
            loaded = True
        except Exception as e:  # e.g. built against another torch: rebuild below
            warnings.warn(f"hdnas: prebuilt native library {lib} does not load ({e}); "
                          "rebuilding it just in time", RuntimeWarning, stacklevel=3)
    if not loaded:
        verbose = os.environ.get("HDNAS_NATIVE_VERBOSE", "0") == "1"
        _source[kind] = "JIT build in " + _jit(kind, verbose=verbose)
    if kind == "cpu":  # the kernel variant: a bad HDNAS_NATIVE_ISA makes the library unusable
        torch.ops.hdnas_native.isa()


def load(kind: str = "cpu") -> bool:
    """Load the native library of ``kind`` ('cpu' or 'cuda'); True if its ops are usable."""
    state = _state.get(kind)  # known: no lock (a compiled forward traces this, and Dynamo
    if state is not None:     # cannot enter a lock; entries are only ever added)
        return state is True
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


def isa() -> str:
    """The CPU kernel variant that runs (``portable``, ``avx2`` or ``avx512``): chosen at the
    first call from ``HDNAS_NATIVE_ISA`` or the CPU's features. Loads the library; raises if it
    is unavailable."""
    return _ops().isa()


def isa_supported() -> list[str]:
    """The CPU kernel variants this CPU runs, worst first."""
    return list(_ops().isa_supported())


def set_isa(name: str) -> str:
    """Switch the CPU kernels to variant ``name`` (``''``/``'auto'``: the best this CPU runs)
    for the rest of the process, e.g. to test or time each variant; returns the variant now
    running. A variant this CPU cannot run raises and changes nothing."""
    return _ops().set_isa(name)


def _ops():
    import torch

    if not load("cpu"):
        raise RuntimeError(f"native CPU kernels unavailable: {error('cpu')}")
    return torch.ops.hdnas_native


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
        if ok and kind == "cpu":
            where += f"kernels {isa()} (this CPU runs {', '.join(isa_supported())}), "
        print(f"{kind}: {'ok' if ok else 'FAILED: ' + str(error(kind))} ({where}"
              f"{time.time() - t:.1f} s)")
        rc |= int(not ok and kind == "cpu")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
