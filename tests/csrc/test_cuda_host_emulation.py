"""The host emulation of the CUDA execution model (csrc/cuda_host/cuda_host.h) on its own.

Its self-tests run in ``cuda_host_check`` (built with AddressSanitizer + UBSan by
hdnas.testing.cuda_host, cached by source hash), with the x86-64 register switch and with
ucontext: thread / block indices, __syncthreads ordering a write before the reads of other
threads, a missing barrier caught by comparing schedules, the warp shuffles, shared memory
poisoned between blocks and static __shared__ arrays per block, deadlocks and bad launch
configurations reported as launch errors, the fp16 / bf16 conversions (exhaustively). And ASan
must stop a kernel that writes past its dynamic shared memory.

If the program cannot be built here (no compiler, no sanitizer runtime) the tests skip, unless
HDNAS_REQUIRE_NATIVE=1 (CI) makes that a failure; a compile error in the sources always fails.
"""
from __future__ import annotations

import os
import shutil

import pytest

from hdnas.testing import cuda_host as cuda_host_build

SELF_TESTS = [
    "indices",
    "barrier_orders_writes_before_reads",
    "race_without_barrier_is_detected",
    "shuffles",
    "shared_memory_poisoned_between_blocks",
    "static_shared_per_block",
    "deadlocks_are_reported",
    "bad_launch_configurations",
    "half_conversions",
]


@pytest.fixture(scope="session")
def check_program():
    try:
        return cuda_host_build.check_program()
    except cuda_host_build.Unavailable as e:
        if os.environ.get("HDNAS_REQUIRE_NATIVE") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))


def test_self_test_list_is_complete(check_program):
    r = cuda_host_build.run_check("emulation", "list")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == SELF_TESTS


@pytest.mark.parametrize("switch", ["native", "ucontext"])
@pytest.mark.parametrize("name", SELF_TESTS)
def test_emulation(check_program, name, switch):
    if switch == "ucontext" and name == "half_conversions":
        pytest.skip("no fibers involved")
    args = ["emulation", name] + (["--ucontext"] if switch == "ucontext" else [])
    r = cuda_host_build.run_check(*args, timeout=120)
    assert r.returncode == 0 and f"{name}: passed" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]


def test_asan_catches_a_shared_memory_overflow(check_program):
    r = cuda_host_build.run_check("crash-smem-overflow", timeout=120)
    assert r.returncode != 0, r.stdout
    assert "heap-buffer-overflow" in r.stderr, r.stderr[-4000:]
    assert "smem_overflow_kernel" in r.stderr, r.stderr[-4000:]


# ---- the build module --------------------------------------------------------------------------

def test_build_key_follows_sources_and_flags(tmp_path, monkeypatch):
    cxx = cuda_host_build.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    shutil.copytree(cuda_host_build.CSRC, tmp_path / "csrc")
    monkeypatch.setattr(cuda_host_build, "CSRC", tmp_path / "csrc")
    srcs = cuda_host_build.RUNTIME + cuda_host_build.KERNELS
    key = cuda_host_build._key(cxx, srcs, ["-O1"])
    assert cuda_host_build._key(cxx, srcs, ["-O1"]) == key
    assert cuda_host_build._key(cxx, srcs, ["-O2"]) != key
    header = tmp_path / "csrc" / "cuda" / "dw_common.cuh"  # a header, not a listed source
    header.write_text(header.read_text() + "\n")
    assert cuda_host_build._key(cxx, srcs, ["-O1"]) != key


def test_compile_error_is_reported(tmp_path, monkeypatch):
    cxx = cuda_host_build.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "bad.cpp").write_text("int f() { return no_such_name; }\n")
    monkeypatch.setattr(cuda_host_build, "CSRC", tmp_path)
    with pytest.raises(cuda_host_build.BuildError, match="no_such_name"):
        cuda_host_build._compile_and_link(cxx, ["bad.cpp"], cuda_host_build.COMMON_FLAGS, [],
                                          tmp_path / "out")
    assert not (tmp_path / "out").exists()
