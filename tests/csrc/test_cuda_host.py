"""The CUDA kernels of csrc/cuda, run on the CPU through the host emulation (csrc/cuda_host).

Two builds of the same kernel source (hdnas.testing.cuda_host, cached by source hash):

* ``cuda_host_check`` with AddressSanitizer + UBSan: every tap table, odd sizes over several
  tiles, the grid-z loop, empty inputs, argument checks, fp32 / fp64 / fp16 / bf16, against a
  plain loop reference; fp32 also under reverse and shuffled thread orders (bitwise equal
  outputs: no race between threads). Any out-of-bounds access stops it.
* ``libhdnas_cuda_host.so`` (ctypes, -O2): the kernels on the tap tables the Python side builds
  (hdnas.mixed.native), composed like the native primitives, against the PyTorch reference
  primitives (grouped_dw_ref / mixed_dw_ref) with autograd: channel slices, transposed inputs,
  every skip variant; and the fp16 / bf16 stand-ins of the emulation against torch's rounding.

If they cannot be built here the tests skip, unless HDNAS_REQUIRE_NATIVE=1 (CI).
"""
from __future__ import annotations

import ctypes
import os
import zlib

import pytest
import torch

from hdnas.testing import cuda_host as cuda_host_build
from hdnas.kernels import stencil
from hdnas.mixed import native
from hdnas.mixed.primitives import grouped_dw_ref, mixed_dw_ref

DLSR_ST1 = ((3, 5, 7, 3, 5), (1, 1, 1, 2, 2))
DLSR_ST2 = ((3, 5, 7), (1, 1, 1))
DARTS = ((3, 5, 7, 3, 5, 1), (1, 1, 1, 2, 2, 1))
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _built(build):
    try:
        return build()
    except cuda_host_build.Unavailable as e:
        if os.environ.get("HDNAS_REQUIRE_NATIVE") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))


# ---- the sanitized program ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f32", "f64", "f16", "bf16"])
def test_kernels_under_sanitizers(dtype):
    _built(cuda_host_build.check_program)
    extra = ["--all-schedules"] if dtype == "f32" else []
    r = cuda_host_build.run_check("kernels", dtype, *extra, timeout=300)
    assert r.returncode == 0 and f"{dtype}: 0 failure(s)" in r.stdout, \
        r.stdout[-6000:] + r.stderr[-6000:]


# ---- the library, against the PyTorch reference ------------------------------------------------

@pytest.fixture(scope="module")
def lib():
    so = ctypes.CDLL(str(_built(cuda_host_build.library)))
    i64p, vp, i = ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, ctypes.c_int
    head = [i, i, i64p, i64p, i, i, i, i, i, i, i]
    so.hdnas_host_dw_fwd.argtypes = head + [vp, vp, vp]
    so.hdnas_host_dw_bwd.argtypes = head + [vp, vp, vp, vp, vp]
    so.hdnas_host_last_error.restype = ctypes.c_char_p
    so.hdnas_host_to_half.argtypes = [vp, vp, ctypes.c_int64, i]
    so.hdnas_host_from_half.argtypes = [vp, vp, ctypes.c_int64, i]
    return so


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _call(lib, fn, table, x, w, relu, shared, *tensors):
    G, C, T = w.shape
    offs = (ctypes.c_int64 * len(table.offs))(*table.offs)
    ntaps = (ctypes.c_int64 * len(table.ntaps))(*table.ntaps)
    e = fn(G, T, offs, ntaps, x.shape[0], C, x.shape[2], x.shape[3], int(relu), int(shared),
           DTYPE_CODE[x.dtype], *[_ptr(t) for t in tensors])
    if e != 0:
        raise RuntimeError(f"host kernels failed ({e}): {lib.hdnas_host_last_error().decode()}")


class _HostDw(torch.autograd.Function):
    """The tap-table engine (csrc/hdnas_dw.h) on the host-emulated CUDA kernels."""

    @staticmethod
    def forward(ctx, x, w, table, relu, shared, lib):
        x, w = x.contiguous(), w.contiguous()  # as the CUDA binding does
        y = x.new_empty((x.shape[0], w.shape[0] * w.shape[1], x.shape[2], x.shape[3]))
        _call(lib, lib.hdnas_host_dw_fwd, table, x, w, relu, shared, x, w, y)
        ctx.save_for_backward(x, w)
        ctx.args = (table, relu, shared, lib)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        table, relu, shared, lib = ctx.args
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        _call(lib, lib.hdnas_host_dw_bwd, table, x, w, relu, shared, gy.contiguous(), x, w, gx, gw)
        return gx, gw, None, None, None, None


def host_grouped_dw(lib, x, K, ksizes, dils, relu, shared):
    """grouped_dw as the native backend computes it: each group's taps gathered into [G, C, T]."""
    G, C, kmax = K.shape[0], K.shape[1], K.shape[-1]
    table = stencil.grouped_table(tuple(ksizes), tuple(dils), kmax)
    onehot = native._onehot(table, x.device, x.dtype, x)  # [G, kmax^2, T]
    w = torch.matmul(K.reshape(G, C, kmax * kmax), onehot)
    return _HostDw.apply(x, w, table, relu, shared, lib)


def host_mixed_dw(lib, x, weights, K, ksizes, dils, relu, skip):
    """mixed_dw on the union stencil: W_eff[c, u] = sum_g weights[g] K[g, c, tap -> u]."""
    G, C, kmax = K.shape[0], K.shape[1], K.shape[-1]
    table = stencil.union_table(tuple(ksizes), tuple(dils), kmax)
    onehot = native._onehot(table, x.device, x.dtype, x)
    w_eff = torch.einsum("g,gck,gku->cu", weights, K.reshape(G, C, kmax * kmax), onehot)
    y = _HostDw.apply(x, w_eff.unsqueeze(0), table, relu, True, lib)
    return y if skip is None else y + skip * x


def _close(a, b, tol):
    scale = max(b.abs().max().item(), 1e-30)
    err = (a.double() - b.double()).abs().max().item() / scale
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"


def _rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _input(layout, N, cin, H, W, dtype, gen):
    if layout == "channel_slice":  # a channel slice of a bigger tensor (not contiguous)
        return _rand(N, cin + 3, H, W, dtype=dtype, gen=gen)[:, 1:1 + cin]
    if layout == "transposed":
        return _rand(N, cin, W, H, dtype=dtype, gen=gen).transpose(2, 3)
    return _rand(N, cin, H, W, dtype=dtype, gen=gen)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channel_slice", "transposed"])
def test_grouped_dw_matches_ref(lib, dtype, tol, shared, relu, layout):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shared, relu, layout)).encode()))
    ksizes, dils = DLSR_ST1 if shared else DLSR_ST2
    G, C = len(ksizes), 3
    # two tiles along H (16 rows each), odd sizes, W smaller than the dilated 5x5 stencil
    x = _input(layout, 2, C if shared else G * C, 19, 7, dtype, gen).requires_grad_(True)
    K = _rand(G, C, 7, 7, dtype=dtype, gen=gen).requires_grad_(True)
    y = host_grouped_dw(lib, x, K, ksizes, dils, relu, shared)
    yr = grouped_dw_ref(x, K, ksizes, dils, relu, shared)
    assert y.shape == yr.shape and y.dtype == yr.dtype
    _close(y, yr, tol)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    for a, b in zip(torch.autograd.grad(y, (x, K), gy), torch.autograd.grad(yr, (x, K), gy)):
        _close(a, b, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("skip", [None, "tensor", "float"])
@pytest.mark.parametrize("relu", [True, False])
def test_mixed_dw_matches_ref(lib, dtype, tol, skip, relu):
    gen = torch.Generator().manual_seed(7)
    x = _rand(3, 4, 9, 36, dtype=dtype, gen=gen)[:, :, :, 1:35].requires_grad_(True)  # 2 tiles in W
    K = _rand(6, 4, 7, 7, dtype=dtype, gen=gen).requires_grad_(True)
    w = _rand(6, dtype=dtype, gen=gen).requires_grad_(True)
    s = {None: None, "float": 0.37,
         "tensor": torch.tensor(0.37, dtype=dtype, requires_grad=True)}[skip]
    y = host_mixed_dw(lib, x, w, K, *DARTS, relu, s)
    yr = mixed_dw_ref(x, w, K, *DARTS, relu, s)
    _close(y, yr, tol)
    inputs = (x, w, K) + ((s,) if skip == "tensor" else ())
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    for a, b in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(yr, inputs, gy)):
        _close(a, b, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shared", [True, False])
def test_half_storage_matches_fp32_ref(lib, dtype, tol, shared):
    """fp16 / bf16 in and out, fp32 accumulation: the fp32 reference of the same rounded inputs,
    to the storage precision (forward and both gradients)."""
    gen = torch.Generator().manual_seed(3 + shared)
    ksizes, dils = DLSR_ST1 if shared else DLSR_ST2
    G, C = len(ksizes), 4
    x = _rand(2, C if shared else G * C, 10, 12, dtype=dtype, gen=gen).requires_grad_(True)
    K = _rand(G, C, 7, 7, dtype=dtype, gen=gen).requires_grad_(True)
    y = host_grouped_dw(lib, x, K, ksizes, dils, True, shared)
    assert y.dtype == dtype
    xr, Kr = x.detach().float().requires_grad_(True), K.detach().float().requires_grad_(True)
    yr = grouped_dw_ref(xr, Kr, ksizes, dils, True, shared)
    _close(y, yr, tol)
    gy = torch.randn(y.shape, generator=gen).to(dtype)
    got = torch.autograd.grad(y, (x, K), gy)
    want = torch.autograd.grad(yr, (xr, Kr), gy.float())
    for a, b in zip(got, want):
        assert a.dtype == dtype
        _close(a, b, tol)


def test_refused_table_is_reported(lib):
    table = stencil.grouped_table((3,), (9,), 3)  # radius 9: beyond the CUDA kernels' limit
    x, w = torch.zeros(1, 1, 12, 12), torch.zeros(1, 1, 9)
    with pytest.raises(RuntimeError, match=r"host kernels failed \(-1\)"):
        _call(lib, lib.hdnas_host_dw_fwd, table, x, w, False, True, x, w, torch.empty(1, 1, 12, 12))


# ---- the half-precision stand-ins against torch ------------------------------------------------

def _as_float(bits_i32):
    return bits_i32.view(torch.float32)


@pytest.mark.parametrize("dtype,bf16", [(torch.float16, 0), (torch.bfloat16, 1)])
def test_half_conversions_match_torch(lib, dtype, bf16):
    gen = torch.Generator().manual_seed(5)
    every16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    as_f = every16.view(dtype).float()
    nxt = torch.nextafter
    f = torch.cat([
        _as_float(torch.randint(-2**31, 2**31 - 1, (1 << 18,), generator=gen, dtype=torch.int64)
                  .to(torch.int32)),                     # any bit pattern
        (torch.rand(1 << 18, generator=gen) - 0.5) * 1.4e5,   # the fp16 range
        (torch.rand(1 << 16, generator=gen) - 0.5) * 2e-4,    # fp16 subnormals
        as_f, nxt(as_f, torch.full_like(as_f, float("inf"))),  # each value and its neighbours,
        nxt(as_f, torch.full_like(as_f, -float("inf"))),       # hence every rounding boundary
        (as_f[:-1] + as_f[1:]) / 2,
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65520.0,
                      3.4e38, 1e-45]),
    ])
    f = f.contiguous()
    got = torch.empty(f.shape, dtype=torch.int16)
    lib.hdnas_host_to_half(_ptr(f), _ptr(got), f.numel(), bf16)
    want = f.to(dtype).view(torch.int16)
    nan = torch.isnan(f)
    mismatch = (got != want) & ~nan
    assert not mismatch.any(), f"first mismatch: {f[mismatch][:5].tolist()}"
    assert torch.isnan(got[nan].view(dtype)).all()
    back = torch.empty(every16.shape, dtype=torch.float32)
    lib.hdnas_host_from_half(_ptr(every16), _ptr(back), every16.numel(), bf16)
    same = back.view(torch.int32) == as_f.view(torch.int32)
    ok = same | (torch.isnan(back) & torch.isnan(as_f))
    assert ok.all()
