"""The CPU kernel variants of the native library (portable, AVX2, AVX-512; csrc/cpu/dw_isa.h).

Every variant this CPU runs is tested against the plain PyTorch twins (forward and backward,
fp64/fp32/bf16/fp16, odd sizes, channel slices, dilations, kernel sizes 1-9), switched in-process
with ``native_build.set_isa``; the run-time choice is tested as a pure function of made-up
feature sets, against this CPU's /proc/cpuinfo, and through ``HDNAS_NATIVE_ISA`` in fresh
processes. Skips when the library cannot be built, unless HDNAS_REQUIRE_NATIVE=1.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from hdnas import native_build
from hdnas.mixed.primitives import grouped_dw_ref, mixed_dw_ref

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = list(native_build.ISA_VARIANTS)  # worst first


@pytest.fixture(params=VARIANTS)
def variant(request, nat):
    """Runs the test with one kernel variant (skipped where this CPU cannot run it)."""
    name = request.param
    if name not in native_build.isa_supported():
        pytest.skip(f"this CPU cannot run the {name} kernels")
    before = native_build.isa()
    assert native_build.set_isa(name) == name
    try:
        yield name
    finally:
        native_build.set_isa(before)


# Relative error bounds (max abs error / max abs value): fp64/fp32 accumulate in their own
# precision; bf16/fp16 store inputs and outputs rounded (fp32 sums), so the error is one
# rounding of the output: 2^-8 (bf16) and 2^-11 (fp16) relative, plus fp32 sums.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 5e-3, torch.float16: 1e-3}

# (shared input, kernel sizes, dilations, relu, N, H, W): W not a multiple of any vector length,
# H not a multiple of the tile rows, images smaller than a (dilated) stencil, every kernel size
CASES = [
    (True, (1, 3, 5, 7, 9), (1, 1, 1, 1, 1), True, 2, 7, 13),
    (True, (3, 5, 7, 3, 5), (1, 1, 1, 2, 2), False, 2, 11, 6),  # the DLSR first stage
    (False, (3, 5, 7), (1, 1, 1), True, 1, 17, 37),              # the DLSR second stage
    (False, (9, 3), (1, 3), False, 2, 5, 1),                    # radius 4 and 3 on a 5x1 image
]


def _rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_grouped_dw_matches_ref(variant, nat, dtype, case):
    shared, ks, ds, relu, N, H, W = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, str(dtype))).encode()))
    G, C = len(ks), 3
    cin = C if shared else G * C
    # a channel slice of a bigger tensor (not contiguous), rounded to the storage dtype first
    x = torch.randn(N, cin + 2, H, W, generator=gen, dtype=torch.float64)[:, 1:1 + cin].to(dtype)
    K = torch.randn(G, C, 9, 9, generator=gen, dtype=torch.float64).to(dtype)
    gy = torch.randn(N, G * C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    xn, Kn = x.clone().requires_grad_(True), K.clone().requires_grad_(True)
    xr, Kr = x.double().requires_grad_(True), K.double().requires_grad_(True)
    y = nat.grouped_dw(xn, Kn, ks, ds, relu, shared)
    yr = grouped_dw_ref(xr, Kr, ks, ds, relu, shared)
    assert y.dtype == dtype and y.shape == yr.shape
    gx, gk = torch.autograd.grad(y, (xn, Kn), gy)
    gxr, gkr = torch.autograd.grad(yr, (xr, Kr), gy.double())
    assert gx.dtype == dtype and gk.dtype == dtype
    for name, a, b in (("y", y, yr), ("grad x", gx, gxr), ("grad kernels", gk, gkr)):
        err = _rel_err(a, b)
        assert err <= TOL[dtype], f"{variant} {dtype} {name}: relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_mixed_dw_matches_ref(variant, nat, dtype):
    """The union stencil (one group of 49 taps: 7x7 and dilated 3x3/5x5) on an odd plane."""
    gen = torch.Generator().manual_seed(21)
    ks, ds = (3, 5, 7, 3, 5, 1), (1, 1, 1, 2, 2, 1)
    x = torch.randn(2, 4, 9, 21, generator=gen, dtype=torch.float64)[:, :, :, 1:20].to(dtype)
    K = torch.randn(6, 4, 7, 7, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(6, generator=gen, dtype=torch.float64).to(dtype)
    args = [t.clone().requires_grad_(True) for t in (x, w, K)]
    refs = [t.double().requires_grad_(True) for t in (x, w, K)]
    y = nat.mixed_dw(*args, ks, ds, True, 0.5)
    yr = mixed_dw_ref(*refs, ks, ds, True, 0.5)
    assert _rel_err(y, yr) <= TOL[dtype]
    gy = torch.randn(yr.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(y, args, gy.to(dtype)), torch.autograd.grad(yr, refs, gy)):
        assert _rel_err(a, b) <= TOL[dtype]


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_and_double_backward(variant, nat, stride):
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(1, 2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    K = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda x, K: nat.grouped_dw(x, K, (3, 1), (2, 1), True, True, stride)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, K))
    assert torch.autograd.gradgradcheck(f, (x, K))


@pytest.mark.parametrize("stride", [1, 2])
def test_weight_grad_independent_of_threads(variant, nat, stride):
    from hdnas.testing.threads import assert_same_on_threads
    gen = torch.Generator().manual_seed(23)
    ks, ds = (3, 5, 7, 3, 5), (1, 1, 1, 2, 2)
    x = torch.randn(5, 4, 12, 11, generator=gen, requires_grad=True)
    K = torch.randn(5, 4, 7, 7, generator=gen, requires_grad=True)
    gy = torch.randn(5, 20, 12 // stride, 11 // stride + 11 % stride, generator=gen)

    def run():
        y = nat.grouped_dw(x, K, ks, ds, True, True, stride)
        return [y, *torch.autograd.grad(y, (x, K), gy)]

    assert_same_on_threads(run)


# ---------------------------------------------------------------------------------------------
# The choice of the variant

AVX2 = ["avx2", "fma"]
AVX512 = AVX2 + ["avx512f", "avx512bw", "avx512vl", "avx512dq"]


def _choose(features, forced=""):
    return torch.ops.hdnas_native.choose_isa(list(features), forced)


def test_default_choice_from_features(nat):
    assert _choose([]) == "portable"  # e.g. aarch64, or an x86 CPU without AVX2
    assert _choose(["avx2"]) == "portable"  # AVX2 without FMA is not enough
    assert _choose(AVX2) == "avx2"
    assert _choose(AVX2 + ["avx512f"]) == "avx2"  # AVX-512 F alone (e.g. Knights Landing)
    assert _choose(AVX512) == "avx512"
    assert _choose(AVX512 + ["sse2", "avx512_bf16"]) == "avx512"  # other flags do not matter
    # the Python table of what each variant needs says the same as the C++ one
    for name, needs in native_build.ISA_VARIANTS.items():
        assert _choose(needs) == name


def test_forced_choice(nat):
    assert _choose(AVX512, "portable") == "portable"
    assert _choose(AVX512, " AVX2 ") == "avx2"
    assert _choose(AVX512, "auto") == "avx512"
    assert _choose(AVX2, "avx2") == "avx2"
    with pytest.raises(RuntimeError, match=r"cannot run the avx512 kernels: it lacks avx512f, "
                                           r"avx512bw, avx512vl, avx512dq \(it runs: portable, avx2\)"):
        _choose(AVX2, "avx512")
    with pytest.raises(RuntimeError, match=r"cannot run the avx2 kernels: it lacks fma"):
        _choose(["avx2"], "avx2")
    with pytest.raises(RuntimeError, match=r"'sse9' is not a kernel variant \(auto, portable, "
                                           r"avx2, avx512\)"):
        _choose(AVX512, "sse9")


def test_detection_matches_proc_cpuinfo(nat):
    flags = native_build.cpu_features()
    if not flags or native_build.build_tag() not in ("x86_64_dispatch", "amd64_dispatch"):
        pytest.skip("no x86 /proc/cpuinfo flags to compare with")
    wanted = {f for needs in native_build.ISA_VARIANTS.values() for f in needs}
    assert set(torch.ops.hdnas_native.cpu_features()) == wanted & flags
    runs = [v for v, needs in native_build.ISA_VARIANTS.items() if set(needs) <= flags]
    assert native_build.isa_supported() == runs
    assert native_build.isa() in runs


def test_set_isa_refusal_changes_nothing(nat):
    before = native_build.isa()
    with pytest.raises(RuntimeError, match="not a kernel variant"):
        native_build.set_isa("sse9")
    assert native_build.isa() == before
    missing = [v for v in VARIANTS if v not in native_build.isa_supported()]
    for v in missing:  # only on CPUs without AVX2 / AVX-512
        with pytest.raises(RuntimeError, match=f"cannot run the {v} kernels: it lacks"):
            native_build.set_isa(v)
        assert native_build.isa() == before


CHILD = textwrap.dedent("""
    import warnings
    from hdnas import native_build
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ok = native_build.load("cpu")
    print("OK", native_build.isa() if ok else native_build.error("cpu"))
""")


def _child(value):
    env = {**os.environ, "HDNAS_NATIVE_ISA": value, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1].removeprefix("OK ")


def test_env_var_forces_a_variant(nat):
    runs = native_build.isa_supported()
    for v in (runs[0], runs[-1]):  # the worst and the best this CPU runs
        assert _child(v) == v
    assert _child("") == runs[-1]


def test_env_var_refused_with_a_clear_error(nat):
    """A variant this CPU cannot run (or no variant at all) makes the library unavailable, and
    the reason names the variable, the variant and what the CPU lacks."""
    why = _child("avx1024")
    assert "HDNAS_NATIVE_ISA=avx1024" in why and "not a kernel variant" in why, why
    for v in [v for v in VARIANTS if v not in native_build.isa_supported()][:1]:
        why = _child(v)
        assert f"HDNAS_NATIVE_ISA={v}: this CPU cannot run the {v} kernels: it lacks" in why, why


# The pointwise (1x1) convs of channel groups, pw / pw_wgrad (csrc/cpu/pw.cpp): (N, G, Co, Ci,
# H, W, input layout). Channel counts off the register tiles (8/4/3 rows, 4/3 columns), planes
# off the vector length and the pixel tiles, a 1x1 image, DARTS' shapes.
PW_CASES = [
    (2, 2, 16, 16, 32, 32, "contiguous"),
    (3, 1, 9, 11, 5, 7, "channel_slice"),
    (2, 3, 7, 5, 1, 1, "contiguous"),
    (1, 2, 64, 64, 8, 8, "transposed"),
    (4, 1, 3, 2, 17, 3, "contiguous"),
    (2, 2, 8, 16, 4, 4, "contiguous"),  # FactorizedReduce: Co = Ci / 2
]


def _pw_case(case, dtype, gen):
    N, G, Co, Ci, H, W, layout = PW_CASES[case]
    if layout == "channel_slice":
        x = torch.randn(N, G * Ci + 3, H, W, generator=gen, dtype=torch.float64)[:, 2:2 + G * Ci]
    elif layout == "transposed":
        x = torch.randn(N, G * Ci, W, H, generator=gen, dtype=torch.float64).transpose(2, 3)
    else:
        x = torch.randn(N, G * Ci, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(G, Co, Ci, generator=gen, dtype=torch.float64)
    gy = torch.randn(N, G * Co, H, W, generator=gen, dtype=torch.float64)
    return x.to(dtype), w.to(dtype), gy.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", range(len(PW_CASES)))
def test_pointwise_matches_twin(variant, nat, dtype, case):
    """Forward, input and weight gradients against the fp64 twin (a batched GEMM)."""
    from hdnas.mixed.primitives import pointwise_ref
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("pw", case, str(dtype))).encode()))
    x, w, gy = _pw_case(case, dtype, gen)
    args = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    refs = [x.double().requires_grad_(True), w.double().requires_grad_(True)]
    y, yr = nat.pointwise(*args), pointwise_ref(*refs)
    assert y.dtype == dtype and y.shape == yr.shape
    got = [y, *torch.autograd.grad(y, args, gy)]
    want = [yr, *torch.autograd.grad(yr, refs, gy.double())]
    for name, a, b in zip(("y", "grad x", "grad w"), got, want):
        err = _rel_err(a, b)
        assert err <= TOL[dtype], f"{variant} {dtype} case {case} {name}: relative error {err:.3g}"


def test_pointwise_fp32_no_less_accurate_than_twin(variant, nat):
    """Against fp64, the kernels' fp32 output and gradients are no less accurate than the fp32
    twin's (DARTS' shape: 16 channels, 32x32, a batch of 8; worst over seeds)."""
    from hdnas.mixed.primitives import pointwise_ref
    worst = {"native": 0.0, "twin": 0.0}
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 32, 32, 32, generator=gen, dtype=torch.float64) + 0.5 * seed
        w = torch.randn(2, 16, 16, generator=gen, dtype=torch.float64)
        gy = torch.randn(8, 32, 32, 32, generator=gen, dtype=torch.float64)
        refs = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        yr = pointwise_ref(*refs)
        truth = [yr, *torch.autograd.grad(yr, refs, gy)]
        for name, fn in (("native", nat.pointwise), ("twin", pointwise_ref)):
            a = [x.float().requires_grad_(True), w.float().requires_grad_(True)]
            y = fn(*a)
            got = [y, *torch.autograd.grad(y, a, gy.float())]
            worst[name] = max(worst[name], *[_rel_err(p, q) for p, q in zip(got, truth)])
    assert worst["native"] <= 1.5 * worst["twin"] + 1e-7, worst


def test_pointwise_threads_and_derivatives(variant, nat):
    """Bit-identical on 1 and 2 threads; gradcheck and gradgradcheck (every derivative is again
    a pw / pw_wgrad call) in fp64."""
    from hdnas.testing.threads import assert_same_on_threads
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(5, 2 * 11, 9, 7, generator=gen, requires_grad=True)
    w = torch.randn(2, 13, 11, generator=gen, requires_grad=True)
    gy = torch.randn(5, 2 * 13, 9, 7, generator=gen)

    def run():
        y = nat.pointwise(x, w)
        return [y, *torch.autograd.grad(y, (x, w), gy)]

    assert_same_on_threads(run)
    xs = torch.randn(2, 3 * 3, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(3, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(nat.pointwise, (xs, ws))
    assert torch.autograd.gradgradcheck(nat.pointwise, (xs, ws))


# Stride 2 (dw_fwd / dw_bwd with stride=2, CPU): (shared, kernel sizes, dilations, relu, N, H, W)
# with odd and even sizes (the output is ceil(H / 2) x ceil(W / 2)), a 1x1 image, widths off the
# vector length, DARTS' sep first stage (3x3, 5x5) and its average pool's box sum.
S2_CASES = [
    (True, (3, 5), (1, 1), True, 2, 9, 7),
    (True, (3, 5), (1, 1), True, 2, 16, 16),
    (False, (3, 5, 7), (1, 1, 1), False, 1, 1, 1),
    (True, (3, 5, 3, 5), (1, 1, 2, 2), True, 2, 5, 37),
    (True, (3,), (1,), False, 3, 6, 3),
]


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("case", range(len(S2_CASES)))
def test_grouped_dw_stride2_matches_twin(variant, nat, dtype, case):
    from hdnas.mixed.primitives import grouped_dw_s2_ref
    shared, ks, ds, relu, N, H, W = S2_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("s2", case, str(dtype))).encode()))
    G, C = len(ks), 3
    cin = C if shared else G * C
    x = torch.randn(N, cin, H, W, generator=gen, dtype=torch.float64).to(dtype)
    K = torch.randn(G, C, 7, 7, generator=gen, dtype=torch.float64).to(dtype)
    gy = torch.randn(N, G * C, (H + 1) // 2, (W + 1) // 2, generator=gen, dtype=torch.float64)
    xn, Kn = x.clone().requires_grad_(True), K.clone().requires_grad_(True)
    xr, Kr = x.double().requires_grad_(True), K.double().requires_grad_(True)
    y = nat.grouped_dw_s2(xn, Kn, ks, ds, relu, shared)
    yr = grouped_dw_s2_ref(xr, Kr, ks, ds, relu, shared)
    assert y.dtype == dtype and y.shape == yr.shape
    got = [y, *torch.autograd.grad(y, (xn, Kn), gy.to(dtype))]
    want = [yr, *torch.autograd.grad(yr, (xr, Kr), gy)]
    for name, a, b in zip(("y", "grad x", "grad kernels"), got, want):
        err = _rel_err(a, b)
        assert err <= TOL[dtype], f"{variant} {dtype} case {case} {name}: relative error {err:.3g}"
