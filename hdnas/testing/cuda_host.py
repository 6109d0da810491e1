"""Builds the CUDA kernels of ``csrc/cuda`` as plain C++ on the host emulation of
``csrc/cuda_host`` (for tests: no GPU, no nvcc, no torch needed).

* :func:`check_program`: ``cuda_host_check`` (``csrc/cuda_host/check_*.cpp``, the kernels, the
  emulation runtime) compiled with AddressSanitizer and UndefinedBehaviorSanitizer, so an
  out-of-bounds access or undefined behaviour in a kernel stops it with a report. Also built with
  ``-DHDNAS_MAX_GRID_Z=5`` so that the kernels' loop over grid-z strides runs on small inputs.
  :func:`run_check` runs it with the sanitizer options set.
* :func:`library`: the kernels, the runtime and ``capi.cpp`` as a shared library (``-O2``, no
  sanitizers) for ``ctypes``.

Both are cached by a hash of the compiler's version, the flags and every source file, under
``$HDNAS_CACHE_DIR/cuda_host`` (default ``~/.cache/hdnas/cuda_host``); the translation units
compile in parallel. A failed build raises :class:`BuildError` with the compiler's output.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from hdnas.native_build import CSRC_CHECKOUT

#: the checkout's csrc/ (csrc/cuda_host is not shipped in the wheel)
CSRC = CSRC_CHECKOUT

KERNELS = ["cuda/dw_fwd.cu", "cuda/dw_bwd.cu"]
RUNTIME = ["cuda_host/cuda_host.cpp"]
HEADERS = ["hdnas_dw.h", "cuda/dw_common.cuh", "cuda_host/cuda_host.h"]
CHECK_SOURCES = ["cuda_host/check_main.cpp", "cuda_host/check_kernels.cpp"]
LIB_SOURCES = ["cuda_host/capi.cpp"]

COMMON_FLAGS = ["-std=c++17", "-DHDNAS_CUDA_HOST", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
if platform.machine() in ("x86_64", "AMD64"):
    # the fiber switch changes stacks with `ret`, which a CET shadow stack would refuse; an
    # object without the CET marking keeps the program off shadow stacks
    COMMON_FLAGS.append("-fcf-protection=none")
SANITIZE_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer",
                  "-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"]
CHECK_FLAGS = SANITIZE_FLAGS + ["-DHDNAS_MAX_GRID_Z=5"]
LIB_FLAGS = ["-O2", "-fPIC"]

#: Sanitizer settings for running the check program: stop at the first report; no leak check
#: (LeakSanitizer cannot run under ptrace, as in some CI containers).
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
                 "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


class BuildError(RuntimeError):
    """The host build failed (the message holds the compiler's output)."""


class Unavailable(BuildError):
    """This machine cannot build it: no C++ compiler, or no sanitizer runtime for it."""


def compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else ``c++``, ``g++`` or ``clang++`` on PATH."""
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def cache_dir() -> Path:
    base = os.environ.get("HDNAS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hdnas")
    return Path(base) / "cuda_host"


@functools.lru_cache(maxsize=None)
def _compiler_id(cxx: str) -> str:
    r = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    return r.stdout


def _key(cxx: str, sources: list[str], flags: list[str]) -> str:
    h = hashlib.sha256()
    h.update(_compiler_id(cxx).encode())
    h.update("\0".join(flags).encode())
    for name in sorted(set(sources + HEADERS)):
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return h.hexdigest()[:20]


def _compile_and_link(cxx: str, sources: list[str], flags: list[str], link: list[str],
                      out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="build_", dir=out.parent) as tmp:
        procs = []
        for i, src in enumerate(sources):
            obj = Path(tmp) / f"{i}.o"
            lang = ["-x", "c++"] if src.endswith(".cu") else []
            cmd = [cxx, *flags, "-c", *lang, str(CSRC / src), "-o", str(obj)]
            procs.append((src, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True)))
        errors = []
        for src, _, p in procs:
            log, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                errors.append(f"--- {src}\n{log}")
        if errors:
            raise BuildError("host build of the CUDA kernels failed:\n" + "\n".join(errors))
        tmp_out = Path(tmp) / out.name
        r = subprocess.run([cxx, *flags, *[str(o) for _, o, _ in procs], *link, "-o",
                            str(tmp_out)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise BuildError(f"linking {out.name} failed:\n{r.stdout}{r.stderr}")
        os.replace(tmp_out, out)  # atomic: a concurrent build of the same key is harmless


def _sanitizer_error(cxx: str) -> str | None:
    """Why a trivial program does not build and run with the sanitizers, or None."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "t.cpp", Path(tmp) / "t"
        src.write_text("int main() { return 0; }\n")
        r = subprocess.run([cxx, *SANITIZE_FLAGS, str(src), "-o", str(exe)], capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            return r.stderr[-2000:]
        r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **SANITIZER_ENV})
        return None if r.returncode == 0 else r.stderr[-2000:]


def _build(name: str, sources: list[str], flags: list[str], link: list[str]) -> Path:
    cxx = compiler()
    if cxx is None:
        raise Unavailable("no C++ compiler found (set CXX)")
    missing = [n for n in sources + HEADERS if not (CSRC / n).is_file()]
    if missing:
        raise Unavailable(f"the C++ sources are not here ({CSRC}: {', '.join(missing)}); "
                          "the host build runs from a checkout")
    flags = COMMON_FLAGS + flags
    out_dir = cache_dir() / _key(cxx, sources, flags + link)
    out = out_dir / name
    if not out.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            _compile_and_link(cxx, sources, flags, link, out)
        except BuildError:
            why = _sanitizer_error(cxx) if "-fsanitize" in " ".join(flags) else None
            if why is not None:
                raise Unavailable(f"{cxx} cannot build with the sanitizers here:\n{why}") from None
            raise
    return out


def check_program() -> Path:
    """The sanitized test program (built on first use, then cached)."""
    return _build("cuda_host_check", RUNTIME + KERNELS + CHECK_SOURCES, CHECK_FLAGS, [])


def library() -> Path:
    """The shared library for ctypes (built on first use, then cached)."""
    return _build("libhdnas_cuda_host.so", RUNTIME + KERNELS + LIB_SOURCES, LIB_FLAGS, ["-shared"])


def run_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the check program with ``args`` and the sanitizer settings; output as text."""
    env = {**os.environ, **SANITIZER_ENV}
    return subprocess.run([str(check_program()), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
