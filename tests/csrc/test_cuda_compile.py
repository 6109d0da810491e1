"""Compile-check the torch-free CUDA kernels for the H100 (sm_90) with nvcc, when nvcc is present.

Running them needs a GPU and a CUDA build of torch (hdnas.native_build builds them there); here
we make sure every kernel of every dtype compiles, without register spills beyond a few bytes,
that the shared header stays torch-free (plain C++), and that the torch binding
(csrc/cuda/binding_cuda.cpp) compiles against the real torch CUDA headers. (The kernels also run
on the CPU: tests/csrc/test_cuda_host.py.)"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("src", ["cuda/dw_fwd.cu", "cuda/dw_bwd.cu"])
def test_cuda_kernels_compile_sm90(src, tmp_path):
    r = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-O3", "-c", str(CSRC / src),
                        "-o", str(tmp_path / "k.o"), "-Xptxas", "-v"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    entries = re.findall(r"Compiling entry function '(\w+)'", r.stderr)
    kernels = ["dw_fwd_kernel"] if "fwd" in src else ["dw_bwd_gx_kernel", "dw_bwd_gw_kernel",
                                                       "dw_reduce_kernel"]
    for k in kernels:  # float, double, __half, __nv_bfloat16
        assert sum(k in e for e in entries) == 4, (k, entries)
    spills = [int(b) for b in re.findall(r"(\d+) bytes spill stores", r.stderr)]
    assert max(spills, default=0) <= 16, r.stderr[-4000:]


def test_header_is_torch_free(tmp_path):
    text = (CSRC / "hdnas_dw.h").read_text()
    assert "torch" not in re.sub(r"//.*", "", text)
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "t.cpp"
    src.write_text('#include "hdnas_dw.h"\nint main() { hdnas::TapTable t; (void)t; return 0; }\n')
    r = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", f"-I{CSRC}", str(src)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ATen/cuda/CUDAContext.h and c10/cuda/CUDAGuard.h ship with the CPU wheel of torch, but include
# cuBLAS / cuSPARSE / cuSOLVER headers (not in a minimal CUDA toolkit) and a cmake-generated
# file (not in the CPU wheel). Stand-ins for only those (declaring the few handle / status types
# torch's headers name) let the binding compile against the real torch CUDA headers and the real
# cuda_runtime_api.h; a header that is present is used as is.
CUDA_HEADER_STANDINS = {
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n"
                  "typedef int cusparseStatus_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
    "c10/cuda/impl/cuda_cmake_macros.h": "#define C10_CUDA_BUILD_SHARED_LIBS\n",
}


def _cuda_include() -> Path | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for h in filter(None, homes):
        if (Path(h) / "include" / "cuda_runtime_api.h").is_file():
            return Path(h) / "include"
    return None


def test_binding_compiles_against_torch_cuda_headers(tmp_path):
    """-fsyntax-only of binding_cuda.cpp (templates instantiated): the torch API it calls, the op
    signatures, the kernel launchers' declarations. Not checked here: linking against
    libtorch_cuda / libc10_cuda, the dispatcher registration at load time, running it.
    Cached by a hash of every input (a pass is remembered, a failure is not)."""
    torch = pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths

    from hdnas.testing import cuda_host as cuda_host_build

    cuda_inc = _cuda_include()
    cxx = cuda_host_build.compiler()
    if cuda_inc is None or cxx is None:
        pytest.skip("needs the CUDA runtime headers (CUDA_HOME) and a C++ compiler")
    torch_inc = [Path(p) for p in include_paths()]
    stubs = tmp_path / "standins"
    for name, text in CUDA_HEADER_STANDINS.items():
        if not any((d / name).is_file() for d in [cuda_inc, *torch_inc]):
            (stubs / name).parent.mkdir(parents=True, exist_ok=True)
            (stubs / name).write_text(text)
    src = CSRC / "cuda" / "binding_cuda.cpp"
    cmd = [cxx, "-std=c++17", "-fsyntax-only", f"-I{stubs}", f"-I{cuda_inc}",
           *[f"-I{p}" for p in torch_inc], str(src)]
    key = hashlib.sha256("\0".join(
        [torch.__version__, subprocess.run([cxx, "--version"], capture_output=True,
                                           text=True).stdout, " ".join(cmd[:3]),
         repr(sorted(CUDA_HEADER_STANDINS.items())), src.read_text(),
         (CSRC / "hdnas_dw.h").read_text(), (cuda_inc / "cuda_runtime_api.h").read_text()]
    ).encode()).hexdigest()[:20]
    passed = cuda_host_build.cache_dir() / f"binding_cuda_syntax_ok_{key}"
    if passed.is_file():
        return
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-6000:]
    passed.parent.mkdir(parents=True, exist_ok=True)
    passed.write_text(" ".join(cmd) + "\n")
