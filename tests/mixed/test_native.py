"""The native (C++) depthwise kernels against their plain PyTorch twins.

The library is built once per session (JIT, cached under $HDNAS_CACHE_DIR or ~/.cache/hdnas, or
the one setup.py built). If it cannot be built the tests skip, unless HDNAS_REQUIRE_NATIVE=1
(set it in CI, which has a compiler) makes that a failure.
"""
from __future__ import annotations

import dataclasses
import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

from hdnas.kernels import stencil
from hdnas.mixed import get_backend
from hdnas.mixed.primitives import grouped_dw_ref, mixed_dw_ref
from hdnas.testing.threads import assert_same_on_threads

DLSR_ST1 = ((3, 5, 7, 3, 5), (1, 1, 1, 2, 2))  # sep3/5/7 then dil3/5: the shared first stage
DLSR_ST2 = ((3, 5, 7), (1, 1, 1))


def _close(a, b, tol):
    scale = max(b.abs().max().item(), 1e-30)
    err = (a - b).abs().max().item() / scale
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"


def _rand(*shape, dtype=torch.float64, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _grouped_case(shared, G, C, N, H, W, kmax, ksizes, dils, dtype, gen, layout="contiguous"):
    cin = C if shared else G * C
    if layout == "channel_slice":  # a channel slice of a bigger tensor (non-contiguous)
        x = _rand(N, cin + 3, H, W, dtype=dtype, gen=gen)[:, 1:1 + cin]
    elif layout == "transposed":
        x = _rand(N, cin, W, H, dtype=dtype, gen=gen).transpose(2, 3)
    else:
        x = _rand(N, cin, H, W, dtype=dtype, gen=gen)
    K = _rand(G, C, kmax, kmax, dtype=dtype, gen=gen)
    return x, K


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channel_slice", "transposed"])
def test_grouped_dw_matches_ref(nat, dtype, tol, shared, relu, layout):
    # a stable seed per case (hash() of a str changes with PYTHONHASHSEED)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shared, relu, layout)).encode()))
    ksizes, dils = DLSR_ST1 if shared else DLSR_ST2
    G = len(ksizes)
    # odd sizes, H != W, and an image smaller than the dilated 5x5 stencil (9x9) in one dim
    x, K = _grouped_case(shared, G, 3, 2, 11, 6, 7, ksizes, dils, dtype, gen, layout)
    x.requires_grad_(True)
    K.requires_grad_(True)
    y = nat.grouped_dw(x, K, ksizes, dils, relu, shared)
    yr = grouped_dw_ref(x, K, ksizes, dils, relu, shared)
    assert y.shape == yr.shape and y.dtype == yr.dtype
    _close(y, yr, tol)
    gy = torch.randn_like(y)
    gx, gk = torch.autograd.grad(y, (x, K), gy)
    gxr, gkr = torch.autograd.grad(yr, (x, K), gy)
    _close(gx, gxr, tol)
    _close(gk, gkr, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("skip", [None, "tensor", "float"])
@pytest.mark.parametrize("relu", [True, False])
def test_mixed_dw_matches_ref(nat, dtype, tol, skip, relu):
    gen = torch.Generator().manual_seed(7)
    ksizes, dils = (3, 5, 7, 3, 5, 1), (1, 1, 1, 2, 2, 1)
    x = _rand(3, 4, 9, 13, dtype=dtype, gen=gen)[:, :, :, 1:12].requires_grad_(True)  # sliced
    K = _rand(6, 4, 7, 7, dtype=dtype, gen=gen).requires_grad_(True)
    w = _rand(6, dtype=dtype, gen=gen).requires_grad_(True)
    s = {None: None, "float": 0.37,
         "tensor": torch.tensor(0.37, dtype=dtype, requires_grad=True)}[skip]
    y = nat.mixed_dw(x, w, K, ksizes, dils, relu, s)
    yr = mixed_dw_ref(x, w, K, ksizes, dils, relu, s)
    _close(y, yr, tol)
    inputs = (x, w, K) + ((s,) if skip == "tensor" else ())
    gy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(yr, inputs, gy)):
        _close(a, b, tol)


def test_gradcheck_fp64(nat):
    gen = torch.Generator().manual_seed(1)
    x = _rand(1, 2, 5, 6, gen=gen).requires_grad_(True)
    K = _rand(2, 2, 5, 5, gen=gen).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, K: nat.grouped_dw(x, K, (3, 5), (2, 1), True, True), (x, K))
    x2 = _rand(1, 4, 5, 6, gen=gen).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, K: nat.grouped_dw(x, K, (5, 3), (1, 1), False, False), (x2, K))
    w = _rand(2, gen=gen).requires_grad_(True)
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, K, s: nat.mixed_dw(x, w, K, (3, 5), (2, 1), True, s), (x, w, K, s))


def test_gradgradcheck_fp64(nat):
    """Double backward (e.g. gradient penalties, Hessian-vector products by autograd)."""
    gen = torch.Generator().manual_seed(10)
    x = _rand(1, 2, 4, 5, gen=gen).requires_grad_(True)
    K = _rand(2, 2, 3, 3, gen=gen).requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda x, K: nat.grouped_dw(x, K, (3, 1), (2, 1), True, True), (x, K))
    x2 = _rand(1, 4, 4, 5, gen=gen).requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda x, K: nat.grouped_dw(x, K, (3, 3), (1, 2), False, False), (x2, K))
    w = _rand(2, gen=gen).requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda x, w, K: nat.mixed_dw(x, w, K, (3, 1), (2, 1), True, 0.5), (x, w, K))


def test_opcheck(nat):
    """Schema, fake (meta) kernel, autograd registration and dispatch of the custom op."""
    gen = torch.Generator().manual_seed(2)
    x = _rand(2, 3, 5, 7, gen=gen).requires_grad_(True)
    table = stencil.grouped_table((3, 1), (2, 1), 3)
    w = _rand(2, 3, 9, gen=gen).requires_grad_(True)
    torch.library.opcheck(torch.ops.hdnas_native.dw_fwd.default,
                          (x, w, list(table.offs), list(table.ntaps), True, True))


def test_fake_tensor_shapes(nat):
    from torch._subclasses.fake_tensor import FakeTensorMode

    stencil.grouped_table.cache_clear()  # so that the first use of this op set is the fake one
    nat._onehot_cache.clear()
    with FakeTensorMode():
        x = torch.empty(2, 6, 9, 10)
        K = torch.empty(5, 6, 7, 7)
        y = nat.grouped_dw(x, K, *DLSR_ST1, True, True)
    assert tuple(y.shape) == (2, 30, 9, 10)
    # nothing fake was cached: the same op set on real tensors still computes
    gen = torch.Generator().manual_seed(12)
    x, K = _rand(1, 6, 9, 10, gen=gen), _rand(5, 6, 7, 7, gen=gen)
    _close(nat.grouped_dw(x, K, *DLSR_ST1, True, True), grouped_dw_ref(x, K, *DLSR_ST1, True, True),
           1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(nat, dtype):
    """fp16/bf16 in and out, fp32 accumulation: matches the fp32 reference to storage precision."""
    gen = torch.Generator().manual_seed(3)
    x, K = _grouped_case(True, 5, 4, 2, 10, 10, 7, *DLSR_ST1, torch.float32, gen)
    y = nat.grouped_dw(x.to(dtype), K.to(dtype), *DLSR_ST1, True, True)
    assert y.dtype == dtype
    yr = grouped_dw_ref(x.to(dtype).float(), K.to(dtype).float(), *DLSR_ST1, True, True)
    _close(y.float(), yr, 1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_weight_grad_deterministic_across_threads(nat):
    gen = torch.Generator().manual_seed(4)
    x, K = _grouped_case(True, 5, 6, 4, 12, 12, 7, *DLSR_ST1, torch.float32, gen)
    K.requires_grad_(True)
    x.requires_grad_(True)
    gy = torch.randn(4, 30, 12, 12, generator=gen)
    assert_same_on_threads(
        lambda: torch.autograd.grad(nat.grouped_dw(x, K, *DLSR_ST1, True, True), (x, K), gy))


def test_bad_inputs_rejected(nat):
    from hdnas.mixed import BackendError

    K = torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match="channels"):
        nat.grouped_dw(torch.randn(1, 4, 5, 5), K, (3, 3), (1, 1), True, True)
    with pytest.raises(ValueError, match="floating point"):
        nat.grouped_dw(torch.ones(1, 3, 5, 5, dtype=torch.int32), K.int(), (3, 3), (1, 1), True, True)
    with pytest.raises(BackendError, match="native"):
        nat.grouped_dw(torch.randn(1, 3, 5, 5, device="meta"), K.to("meta"), (3, 3), (1, 1), True, True)
    with pytest.raises(RuntimeError, match="channels"):  # the C++ checks, below the Python ones
        torch.ops.hdnas_native.dw_fwd(torch.randn(1, 4, 5, 5), torch.randn(2, 3, 9),
                                      [0, 0] * 18, [9, 9], False, True)
    with pytest.raises(RuntimeError, match="offsets"):
        torch.ops.hdnas_native.dw_fwd(torch.randn(1, 3, 5, 5), torch.randn(2, 3, 9),
                                      [0, 0] * 5, [9, 9], False, True)


def test_unsupported_dtype_named_every_time(nat):
    """The availability answer is cached per (device type, dtype, table size), and a cached
    refusal still raises the clear error."""
    from hdnas.mixed import BackendError

    x = torch.randn(1, 3, 5, 5).to(torch.float8_e4m3fn)
    K = torch.randn(2, 3, 3, 3).to(torch.float8_e4m3fn)
    for _ in range(2):
        with pytest.raises(BackendError, match="float8_e4m3fn is not supported"):
            nat.grouped_dw(x, K, (3, 3), (1, 2), False, True)
    x, K = torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3)
    nat.grouped_dw(x, K, (3, 3), (1, 2), False, True)
    misses = nat._reason.cache_info().misses
    for _ in range(3):
        nat.grouped_dw(x, K, (3, 3), (1, 2), False, True)
    assert nat._reason.cache_info().misses == misses


def test_onehot_cache_keyed_by_value(nat):
    """An equal table made anew (as after an lru eviction) finds the cached tensor; another
    table gets its own, and each tensor is exactly its table."""
    x = torch.zeros(1, dtype=torch.float64)
    t = stencil.grouped_table((3, 5), (1, 2), 5)
    twin = dataclasses.replace(t)
    assert twin is not t
    a = nat._onehot(t, x.device, x.dtype, x)
    assert nat._onehot(twin, x.device, x.dtype, x) is a
    u = stencil.grouped_table((5, 3), (1, 2), 5)
    for table, tensor in ((t, a), (u, nat._onehot(u, x.device, x.dtype, x))):
        want = torch.zeros(table.shape, dtype=x.dtype)
        for g, k, tap in table.nz:
            want[g, k, tap] = 1
        assert torch.equal(tensor, want)


def test_tables_survive_cache_evictions(nat):
    """More distinct kernel-size/dilation sets than the table caches hold, then the first ones
    again after their eviction: every call matches the reference (a cache keyed by id() of an
    evicted table could hand a new table another one's gather)."""
    choices = [(k, d) for k in (1, 3, 5) for d in (1, 2, 3)]
    n = max(stencil.grouped_table.cache_info().maxsize, stencil.union_table.cache_info().maxsize,
            nat.ONEHOT_CACHE_SIZE) + 20
    sets = list(itertools.islice(itertools.product(choices, repeat=3), n))
    assert len(sets) == n
    gen = torch.Generator().manual_seed(11)
    misses = stencil.grouped_table.cache_info().misses
    for s in sets + sets[:20]:
        ks, ds = tuple(k for k, _ in s), tuple(d for _, d in s)
        x = _rand(1, 2, 6, 7, gen=gen)
        K = _rand(3, 2, 5, 5, gen=gen)
        w = _rand(3, gen=gen)
        _close(nat.grouped_dw(x, K, ks, ds, True, True), grouped_dw_ref(x, K, ks, ds, True, True),
               1e-12)
        _close(nat.mixed_dw(x, w, K, ks, ds, False), mixed_dw_ref(x, w, K, ks, ds, False), 1e-12)
    assert stencil.grouped_table.cache_info().misses - misses > stencil.grouped_table.cache_info().maxsize
    assert len(nat._onehot_cache) <= nat.ONEHOT_CACHE_SIZE


def test_empty_batch(nat):
    x = torch.zeros(0, 3, 5, 5, requires_grad=True)
    K = torch.randn(2, 3, 3, 3, requires_grad=True)
    y = nat.grouped_dw(x, K, (3, 3), (1, 2), True, True)
    assert y.shape == (0, 6, 5, 5)
    gx, gk = torch.autograd.grad(y.sum(), (x, K))
    assert gx.shape == x.shape and torch.all(gk == 0)


# ---------------------------------------------------------------------------------------------
# The native backend (the merged composition over these primitives) against the reference

def _copy_params(dst, src):
    with torch.no_grad():
        for a, b in zip(dst.parameters(), src.parameters()):
            a.copy_(b)


def test_native_backend_mixed_op(nat):
    from hdnas.mixed import MixedOp, get_backend
    from hdnas.model.space import DLSR_PRIMITIVES

    torch.manual_seed(5)
    m = MixedOp(8, DLSR_PRIMITIVES).double()
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64, requires_grad=True)
    w = F.softmax(torch.randn(9, dtype=torch.float64), 0).requires_grad_(True)
    outs = []
    for name in ("native", "reference"):
        y = get_backend(name).mixed_op(x, w, m)
        grads = torch.autograd.grad((y * y).sum(), [x, w, *m.parameters()])
        outs.append((y, grads))
    _close(outs[0][0], outs[1][0], 1e-10)
    for a, b in zip(outs[0][1], outs[1][1]):
        _close(a, b, 1e-10)


def test_fused_resolves_to_native_on_cpu(nat):
    from hdnas.mixed import resolve_backend
    from hdnas.model.space import DLSR_PRIMITIVES

    b = resolve_backend("fused", "cpu", torch.float32, DLSR_PRIMITIVES)
    assert b.name == "native"


def test_supernet_search_step_matches_reference(nat):
    """One whole search step (weight step + joint architecture step) in fp64: the native
    backend's losses, gradients and updated parameters equal the reference's."""
    from hdnas.nas.architect import Architect
    from hdnas.model.network import SuperNet

    torch.manual_seed(6)
    gen = torch.Generator().manual_seed(6)
    lr_img = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    hr_img = torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    nets = {name: SuperNet(C=8, backend=get_backend(name)).double() for name in ("reference", "native")}
    _copy_params(nets["native"], nets["reference"])
    results = {}
    for name, net in nets.items():
        wopt = torch.optim.Adam(net.weight_parameters(), lr=1e-3)
        arch = Architect(net, F.l1_loss, rule="joint")
        wopt.zero_grad()
        loss = F.l1_loss(net(lr_img), hr_img)
        loss.backward()
        grads = [p.grad.clone() for p in net.weight_parameters()]
        wopt.step()
        out = arch.step((lr_img, hr_img), (lr_img, hr_img), eta=1e-3)
        arch_grads = [p.grad.clone() for p in net.arch_parameters()]
        after = float(F.l1_loss(net(lr_img), hr_img).detach())
        results[name] = (loss.detach(), grads, out, arch_grads, after)
    (l0, g0, o0, a0, n0), (l1, g1, o1, a1, n1) = results["reference"], results["native"]
    _close(l1, l0, 1e-10)
    for a, b in zip(g1, g0):
        _close(a, b, 1e-9)
    assert abs(o1["loss_arch"] - o0["loss_arch"]) <= 1e-10 * abs(o0["loss_arch"])
    for a, b in zip(a1, a0):
        _close(a, b, 1e-9)
    # after both updates (Adam's first step is ~lr*sign(grad): parameters whose gradient is ~0
    # may move differently, so the updated network is compared through its loss)
    assert abs(n1 - n0) <= 1e-6 * abs(n0)


# ---------------------------------------------------------------------------------------------
# The build key: one library per machine type (no build needed)

X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\nbugs\t\t: spectre_v1\n"


def test_cpu_features_parsed():
    from hdnas.native_build import cpu_features

    assert cpu_features(X86 + X86.replace(": 0", ": 1")) == {"fpu", "sse2", "avx", "avx2", "fma"}
    arm = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n"
    assert cpu_features(arm) == {"fp", "asimd", "sve"}
    assert cpu_features("processor\t: 0\n") == frozenset()


def test_build_tag_and_dir(monkeypatch, tmp_path):
    """The CPU library no longer depends on the CPU model (no -march=native): one build per
    machine type, apart from the per-CPU builds of earlier versions."""
    from hdnas import native_build as nb

    monkeypatch.setenv("HDNAS_CACHE_DIR", str(tmp_path))
    assert nb.build_tag("x86_64") == "x86_64_dispatch" != nb.build_tag("aarch64")
    assert nb.build_tag("AMD64") == "amd64_dispatch"
    assert not any(f.startswith("-march") or f.startswith("-m") for f in nb.CXX_FLAGS)
    d = nb.build_dir("cpu")
    assert d.name == f"cpu_{nb.build_tag()}" and d.parent.parent.parent == tmp_path
    assert nb.build_dir("cpu", "aarch64_dispatch") != d


def test_prebuilt_library_only_with_this_tag(monkeypatch, tmp_path):
    from hdnas import native_build as nb

    monkeypatch.setattr(nb, "PKG_DIR", tmp_path)
    here = nb.build_tag()
    old = "x86_64_6a93d771884c"  # a per-CPU build of an earlier version
    abi = ".cpython-311-x86_64-linux-gnu.so"

    def libs(*tags):
        for f in tmp_path.iterdir():
            f.unlink()
        for t in tags:
            (tmp_path / (f"_native_cpu_{t}{abi}" if t else f"_native_cpu{abi}")).touch()

    libs(old, None, "x86_64_portable")
    assert nb._prebuilt("cpu") is None
    libs(old, here)
    assert nb._prebuilt("cpu") == str(tmp_path / f"_native_cpu_{here}{abi}")
    assert nb.library_tag(tmp_path / f"_native_cpu_{here}{abi}") == here
    assert nb.library_tag(tmp_path / f"_native_cpu{abi}") is None
    libs()
    assert nb._prebuilt("cpu") is None


# ---------------------------------------------------------------------------------------------
# CUDA kernels (run only on a machine with a GPU, a CUDA torch and the CUDA library built)

@pytest.fixture(scope="session")
def nat_cuda(nat):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not nat.available("cuda"):
        from hdnas import native_build
        pytest.skip(f"native CUDA kernels unavailable: {native_build.error('cuda')}")
    return nat


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5),
                                       (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shared", [True, False])
def test_cuda_grouped_dw_matches_ref(nat_cuda, dtype, tol, shared):
    gen = torch.Generator().manual_seed(8)
    ksizes, dils = DLSR_ST1 if shared else DLSR_ST2
    # 37 x 45: several tiles, partial tiles at both edges
    x, K = _grouped_case(shared, len(ksizes), 5, 3, 37, 45, 7, ksizes, dils, torch.float64, gen,
                         "channel_slice")
    xc = x.to("cuda", dtype).requires_grad_(True)
    Kc = K.to("cuda", dtype).requires_grad_(True)
    # the reference in fp64 on the CPU from the same (rounded) values
    xr = xc.detach().cpu().double().requires_grad_(True)
    Kr = Kc.detach().cpu().double().requires_grad_(True)
    y = nat_cuda.grouped_dw(xc, Kc, ksizes, dils, True, shared)
    yr = grouped_dw_ref(xr, Kr, ksizes, dils, True, shared)
    _close(y.double().cpu(), yr, tol)
    gy = torch.randn(yr.shape, generator=gen, dtype=torch.float64)
    g = torch.autograd.grad(y, (xc, Kc), gy.to("cuda", dtype))
    gr = torch.autograd.grad(yr, (xr, Kr), gy.to(dtype).double())
    for a, b in zip(g, gr):
        _close(a.double().cpu(), b, tol * 4)
    # deterministic weight gradient
    g2 = torch.autograd.grad(nat_cuda.grouped_dw(xc, Kc, ksizes, dils, True, shared), (xc, Kc),
                             gy.to("cuda", dtype))
    assert torch.equal(g[1], g2[1]) and torch.equal(g[0], g2[0])


def test_cuda_mixed_dw_matches_ref(nat_cuda):
    gen = torch.Generator().manual_seed(9)
    ksizes, dils = (3, 5, 7, 3, 5), (1, 1, 1, 2, 2)
    x = _rand(2, 6, 19, 40, gen=gen)
    K = _rand(5, 6, 7, 7, gen=gen)
    w = _rand(5, gen=gen)
    args = [t.requires_grad_(True) for t in (x, w, K)]
    argsc = [t.detach().cuda().requires_grad_(True) for t in (x, w, K)]
    y = nat_cuda.mixed_dw(argsc[0], argsc[1], argsc[2], ksizes, dils, True, 0.25)
    yr = mixed_dw_ref(args[0], args[1], args[2], ksizes, dils, True, 0.25)
    _close(y.cpu(), yr, 1e-12)
    gy = torch.randn(yr.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(y, argsc, gy.cuda()), torch.autograd.grad(yr, args, gy)):
        _close(a.cpu(), b, 1e-12)


# ---------------------------------------------------------------------------------------------
# Derived networks: the ops' depthwise convs on the native kernels (hdnas.model.ops, runtime dispatch)

def _derived_pair(dtype, C=8):
    from hdnas.model.genotype import Genotype
    from hdnas.model.network import DerivedNet
    a, b = ("sep_conv_5x5", "dil_conv_3x3", "conv_3x3"), ("sep_conv_3x3", "sep_conv_7x7", "dil_conv_5x5")
    g = Genotype(cell_ops=(a, b, a, b), inputs=((0, 1), (1, 2)), channels=C, scale=2, num_cells=4)
    torch.manual_seed(0)
    net = DerivedNet(g).to(dtype)
    with torch.no_grad():  # non-trivial biases and depthwise kernels
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_derived_net_native_depthwise_matches_torch(nat, dtype, tol, monkeypatch):
    """DerivedNet with its depthwise convs on the native kernels gives the plain network's
    output and gradients (fp64 to 1e-10, fp32 within summation-order rounding)."""
    from hdnas.model import ops

    net = _derived_pair(dtype)
    x = torch.rand(2, 3, 17, 19, dtype=dtype)
    seen = []

    def counted(*args):
        seen.append(1)
        return native_dw(*args)
    native_dw = ops.native_dw
    monkeypatch.setattr(ops, "native_dw", counted)
    out = {}
    for mode in ("torch", "native"):
        net.set_depthwise(mode)
        net.zero_grad(set_to_none=True)
        seen.clear()
        y = net(x)
        y.square().mean().backward()
        calls = len(seen)
        # forward: 2 per sep op, 1 per dil op, 2 cells of each op tuple
        assert calls == (0 if mode == "torch" else 2 * (2 + 1 + 2 + 2 + 1)), mode
        out[mode] = (y.detach(), [p.grad.clone() for p in net.parameters()])
    (ya, ga), (yb, gb) = out["torch"], out["native"]
    scale = ya.abs().max()
    assert (ya - yb).abs().max() <= tol * scale
    for a, b in zip(ga, gb):
        assert (a - b).abs().max() <= tol * max(a.abs().max(), 1e-3)


def test_derived_net_depthwise_modes(nat):
    """'auto' takes the native kernels on CPU but the plain modules while exporting, under
    autocast or for a dtype they do not take; 'torch' never; 'native' fails loudly where it cannot
    serve; the state dict is the same in every mode."""
    from hdnas.model import ops

    net = _derived_pair(torch.float32)
    names = list(net.state_dict())
    sep = net.B1.c1_r
    x = torch.rand(1, 8, 16, 16)
    assert net.B1.c1_r.depthwise == "auto" and sep._native_serves(x)
    net.set_depthwise("torch")
    assert list(net.state_dict()) == names and not any(
        getattr(m, "depthwise", "torch") != "torch" for m in net.modules())
    with pytest.raises(ValueError, match="unknown depthwise mode"):
        net.set_depthwise("fast")
    net.set_depthwise("auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not sep._native_serves(x)
    assert not sep._native_serves(x.to(torch.int32))
    net.set_depthwise("native")
    with pytest.raises(ValueError, match="cannot serve"):
        sep(x.double())  # weights fp32, input fp64
    # torch.export traces the plain modules in 'auto' mode: no native op in the graph
    net.set_depthwise("auto")
    ep = torch.export.export(sep, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("hdnas_native" in t for t in targets), targets
    assert any("conv2d" in t for t in targets)
    assert ops.check_depthwise_mode("torch") == "torch"


# ---------------------------------------------------------------------------------------------
# The 3x3 max pool (csrc/cpu/max_pool.cpp) against its twin, F.max_pool2d(x, 3, stride, 1)

def _pool_input(shape, kind, dtype, gen):
    if kind == "ties":  # few distinct values: the first maximum in scan order must win
        x = torch.randint(0, 3, shape, generator=gen).to(dtype)
    else:
        x = _rand(*shape, dtype=dtype, gen=gen)
    if kind == "inf":  # windows of -inf only: the first real pixel gets the gradient
        x[x < 0.3] = -float("inf")
    if kind == "nan":  # NaN propagates, and the last NaN of a window gets the gradient
        x.view(-1)[::7] = float("nan")
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kind", ["randn", "ties", "inf", "nan"])
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 3, 5, 7), (1, 2, 2, 2), (3, 2, 6, 1),
                                   (2, 2, 1, 9), (2, 4, 8, 8), (2, 16, 32, 32)])
def test_max_pool_equals_torch_bit_for_bit(nat, dtype, stride, kind, shape):
    """Outputs and input gradients equal PyTorch's NCHW pool exactly (same windows, tie rule,
    NaN rule and order of the gradient sums), on odd, 1-pixel and DARTS sizes."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, stride, kind, shape)).encode()))
    x = _pool_input(shape, kind, dtype, gen)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, want = nat.max_pool_3x3(a, stride), F.max_pool2d(b, 3, stride, 1)
    assert y.shape == want.shape
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.nan_to_num(), want.nan_to_num())
    g = _rand(*want.shape, dtype=dtype, gen=gen)
    y.backward(g)
    want.backward(g)
    assert torch.equal(a.grad, b.grad)


def test_max_pool_layouts_threads_and_double_backward(nat):
    gen = torch.Generator().manual_seed(5)
    x = _rand(3, 6, 9, 10, gen=gen)
    want = F.max_pool2d(x, 3, 1, 1)
    for v in (x[:, 1:4], x.transpose(2, 3), x.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(nat.max_pool_3x3(v, 1), F.max_pool2d(v, 3, 1, 1))
    g = _rand(*want.shape, gen=gen)
    old = torch.get_num_threads()
    grads = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            xg = x.clone().requires_grad_()
            grads.append(torch.autograd.grad(nat.max_pool_3x3(xg, 1), xg, g)[0])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(grads[0], grads[1])
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: nat.max_pool_3x3(t, 2), (xg,))
    assert torch.autograd.gradgradcheck(lambda t: nat.max_pool_3x3(t, 1), (xg,))
    torch.library.opcheck(torch.ops.hdnas_native.max_pool3x3.default, (xg, 2))


def test_max_pool_serves_only_what_it_can(nat):
    assert nat.max_pool_3x3(torch.randn(1, 2, 4, 4, dtype=torch.float16), 1) is None
    assert nat.max_pool_3x3(torch.randn(1, 2, 4, 4), 3) is None
    assert nat.max_pool_3x3(torch.randn(2, 4, 4), 1) is None
    assert nat.max_pool_3x3(torch.randn(1, 2, 4, 4, device="meta"), 1) is None
    with pytest.raises(RuntimeError, match="stride 1 or 2"):
        torch.ops.hdnas_native.max_pool3x3(torch.randn(1, 2, 4, 4), 3)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.hdnas_native.max_pool3x3_backward(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 4, 4), 1)


# ---------------------------------------------------------------------------------------------
# bn_sum (csrc/cpu/bn_sum.cpp): training-mode BNs of channel groups, scaled, summed over groups

def _bn_sum_case(N, G, C, H, W, dtype, gen, offset=2.0):
    u = (_rand(N, G * C, H, W, gen=gen) * 3 + offset).to(dtype)
    scale = (torch.rand(G * C, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    var, mean = torch.var_mean(u.double(), (0, 2, 3), correction=0)
    return u, scale, mean, var


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 7), (1, 2, 3, 1, 2), (4, 1, 2, 3, 3),
                                   (8, 3, 16, 16, 16), (3, 2, 5, 1, 1)])
def test_bn_sum_matches_twin_fp64(nat, shape):
    from hdnas.mixed.primitives import bn_sum_ref
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    u, scale, mean, var = _bn_sum_case(*shape, torch.float64, gen)
    a = [u.clone().requires_grad_(), scale.clone().requires_grad_()]
    b = [u.clone().requires_grad_(), scale.clone().requires_grad_()]
    y, z = nat.bn_sum(a[0], mean, var, a[1], 1e-5, shape[1]), bn_sum_ref(b[0], mean, var, b[1], 1e-5, shape[1])
    assert y.shape == z.shape == (shape[0], shape[2], shape[3], shape[4])
    g = _rand(*z.shape, gen=gen)
    for p, q in zip([y, *torch.autograd.grad(y, a, g)], [z, *torch.autograd.grad(z, b, g)]):
        _close(p, q, 1e-10)


def test_bn_sum_fp32_no_less_accurate_than_twin(nat):
    """Against fp64, the kernel's fp32 outputs and gradients are no less accurate than the fp32
    twin's (worst over seeds and a large channel mean, where cancellation bites)."""
    from hdnas.mixed.primitives import bn_sum_ref
    worst = {"native": 0.0, "twin": 0.0}
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        u, scale, _, _ = _bn_sum_case(4, 3, 5, 6, 6, torch.float64, gen, offset=40.0 * (seed % 2))
        g = _rand(4, 5, 6, 6, gen=gen)
        var, mean = torch.var_mean(u, (0, 2, 3), correction=0)
        t = [u.clone().requires_grad_(), scale.clone().requires_grad_()]
        truth = [bn_sum_ref(t[0], mean, var, t[1], 1e-5, 3)]
        truth += torch.autograd.grad(truth[0], t, g)
        u32 = u.float()
        v32, m32 = torch.var_mean(u32.double(), (0, 2, 3), correction=0)
        for name, fn in (("native", nat.bn_sum), ("twin", bn_sum_ref)):
            a = [u32.clone().requires_grad_(), scale.float().clone().requires_grad_()]
            y = fn(a[0], m32, v32, a[1], 1e-5, 3)
            got = [y, *torch.autograd.grad(y, a, g.float())]
            worst[name] = max(worst[name], *[((p.double() - q).abs().max() / q.abs().max()).item()
                                              for p, q in zip(got, truth)])
    assert worst["native"] <= 1.5 * worst["twin"] + 1e-7, worst


def test_bn_sum_threads_checks_and_double_backward(nat):
    gen = torch.Generator().manual_seed(9)
    u, scale, mean, var = _bn_sum_case(4, 2, 3, 5, 5, torch.float32, gen)
    g = torch.randn(4, 3, 5, 5, generator=gen)

    def run():
        a = [u.clone().requires_grad_(), scale.clone().requires_grad_()]
        return torch.autograd.grad(nat.bn_sum(a[0], mean, var, a[1], 1e-5, 2), a, g)

    assert_same_on_threads(run, (1, 2))
    u64, s64, m64, v64 = _bn_sum_case(2, 2, 2, 3, 3, torch.float64, gen)

    def f(uu, ss):  # the statistics are u's own (training mode), also when gradcheck moves u
        v, m = torch.var_mean(uu.detach(), (0, 2, 3), correction=0)
        return nat.bn_sum(uu, m, v, ss, 1e-5, 2)

    ins = (u64.clone().requires_grad_(), s64.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, ins) and torch.autograd.gradgradcheck(f, ins)
    torch.library.opcheck(torch.ops.hdnas_native.bn_sum.default, (u64, m64, v64, s64, 1e-5, 2))
    assert nat.bn_sum(torch.randn(1, 4, 1, 1), m64[:4], v64[:4], torch.ones(4), 1e-5, 2) is None
    assert nat.bn_sum(u.half(), mean, var, scale.half(), 1e-5, 2) is None
    with pytest.raises(RuntimeError, match="equal groups"):
        torch.ops.hdnas_native.bn_sum(u, mean, var, scale, 1e-5, 4)
    with pytest.raises(RuntimeError, match="float64 vectors"):
        torch.ops.hdnas_native.bn_sum(u, mean.float(), var, scale, 1e-5, 2)


def test_pointwise_ops_checks_and_refusals(nat):
    """opcheck of pw / pw_wgrad (fake kernels, autograd registration, schema); the primitive
    declines what the kernel does not take (None: the caller runs the twin); the ops name the
    problem."""
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(3, 2 * 5, 4, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    gy = torch.randn(3, 2 * 7, 4, 6, generator=gen, dtype=torch.float64)
    ops = torch.ops.hdnas_native
    torch.library.opcheck(ops.pw.default, (x, w))
    torch.library.opcheck(ops.pw.default, (x.requires_grad_(), w.requires_grad_()))
    torch.library.opcheck(ops.pw_wgrad.default, (gy, x.detach(), 2))
    assert nat.pointwise(x.detach().half(), w.detach().half()) is None
    assert nat.pointwise(x.detach(), w.detach().float()) is None
    assert nat.pointwise(x.detach()[:, :9], w.detach()) is None
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.pw(x.detach().half(), w.detach().half())
    with pytest.raises(RuntimeError, match="input has 9 channels"):
        ops.pw(x.detach()[:, :9], w.detach())
    with pytest.raises(RuntimeError, match="groups do not divide"):
        ops.pw_wgrad(gy, x.detach(), 3)
    with pytest.raises(RuntimeError, match="differ in batch or pixels"):
        ops.pw_wgrad(gy[:2], x.detach(), 2)


def test_stride2_op_checks_and_refusals(nat):
    """dw_fwd / dw_bwd with stride=2: opcheck (fake kernels give ceil(H / 2) x ceil(W / 2));
    strides other than 1 and 2 and a gradient of the wrong size are refused, naming them; the
    stride-2 primitive declines other devices (the CUDA kernels have stride 1 only)."""
    from hdnas.kernels.stencil import grouped_table
    gen = torch.Generator().manual_seed(43)
    x = torch.randn(2, 3, 7, 6, generator=gen, dtype=torch.float64)
    table = grouped_table((3, 5), (1, 1), 5)
    w = torch.randn(2, 3, table.shape[-1], generator=gen, dtype=torch.float64)
    gy = torch.randn(2, 6, 4, 3, generator=gen, dtype=torch.float64)
    ops = torch.ops.hdnas_native
    torch.library.opcheck(ops.dw_fwd.default, (x, w, table.offs, table.ntaps, True, True, 2))
    torch.library.opcheck(ops.dw_fwd.default, (x.clone().requires_grad_(), w.clone().requires_grad_(),
                                               table.offs, table.ntaps, True, True, 2))
    torch.library.opcheck(ops.dw_bwd.default, (gy, x, w, table.offs, table.ntaps, True, True, True,
                                               True, 2))
    assert ops.dw_fwd(x, w, table.offs, table.ntaps, True, True, 2).shape == (2, 6, 4, 3)
    with pytest.raises(RuntimeError, match="stride 1 or 2, got 3"):
        ops.dw_fwd(x, w, table.offs, table.ntaps, True, True, 3)
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        ops.dw_bwd(gy[:, :, :3], x, w, table.offs, table.ntaps, True, True, True, True, 2)
    K = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert nat.grouped_dw_s2(x.to("meta"), K.to("meta"), (3, 5), (1, 1), True, True) is None
