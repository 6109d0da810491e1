"""Compile-check the torch-free CUDA kernels for the H100 (sm_90) with nvcc, when nvcc is present.

Running them needs a GPU and a CUDA build of torch (hdnas.native_build builds them there); here
we only make sure every kernel of every dtype compiles, without register spills beyond a few
bytes, and that the shared header stays torch-free (plain C++)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
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
