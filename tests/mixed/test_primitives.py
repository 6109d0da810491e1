"""Depthwise primitives (grouped_dw, mixed_dw) of every fused backend vs their plain twins.

Implementations are discovered from the registry (every ``DecomposedBackend`` whose primitives
are not the stock-PyTorch ones), so a primitives set registered later is tested too. Triton runs
in the interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hdnas.mixed import get_backend
from hdnas.mixed.base import BACKENDS
from hdnas.mixed.merged import DecomposedBackend
from hdnas.mixed.primitives import TORCH_PRIMITIVES, grouped_dw_ref, mixed_dw_ref

get_backend("reference")  # load optional backends
IMPLS = {b.name: b for b in BACKENDS.values()
         if isinstance(b, DecomposedBackend) and b.primitives is not TORCH_PRIMITIVES}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _impl(name, dtype, device="cpu"):
    b = IMPLS[name]
    why = b.primitives_unsupported_reason(torch.device(device), dtype)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    return b.primitives


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)


GROUPED_CASES = [
    # (N, C, H, W, ksizes, dilations, kmax, relu, shared)
    (2, 3, 9, 7, (3, 5, 7, 3, 5), (1, 1, 1, 2, 2), 7, True, True),   # DLSR stage 1
    (2, 3, 9, 7, (3, 5, 7), (1, 1, 1), 7, True, False),              # DLSR stage 2
    (1, 5, 1, 1, (3, 5), (1, 2), 5, True, True),                     # 1x1 image, halo > image
    (2, 6, 4, 13, (1, 3), (1, 3), 3, False, False),                  # 1x1 kernel, dilation 3
    (3, 1, 6, 5, (5,), (2,), 7, False, True),                        # 5 in a 7 slot
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(IMPLS))
@pytest.mark.parametrize("case", range(len(GROUPED_CASES) + 1))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_dw(name, case, dtype, device):
    prim = _impl(name, dtype, device)
    if case == len(GROUPED_CASES):  # a big case, GPU only: many programs, split reductions
        if device != "cuda":
            pytest.skip("GPU-sized case")
        N, C, H, W, ks, ds, kmax, relu, shared = 16, 48, 37, 33, (3, 5, 7, 3, 5), (1, 1, 1, 2, 2), 7, True, True
    else:
        N, C, H, W, ks, ds, kmax, relu, shared = GROUPED_CASES[case]
    G = len(ks)
    gen = torch.Generator().manual_seed(case)
    x0 = torch.randn(N, C if shared else G * C, H, W, generator=gen, dtype=torch.float64).to(device, dtype)
    k0 = torch.randn(G, C, kmax, kmax, generator=gen, dtype=torch.float64).to(device, dtype)
    gy = torch.randn(N, G * C, H, W, generator=gen, dtype=torch.float64).to(device, dtype)
    outs = []
    for fn in (lambda *a: prim.grouped_dw(*a), grouped_dw_ref):
        x = x0.clone().requires_grad_(True)
        k = k0.clone().requires_grad_(True)
        y = fn(x, k, ks, ds, relu, shared)
        dx, dk = torch.autograd.grad(y, (x, k), gy)
        outs.append((y, dx, dk))
    for a, b, what in zip(outs[0], outs[1], ("y", "dx", "dkernels")):
        torch.testing.assert_close(a, b, **_tol(dtype), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", sorted(IMPLS))
@pytest.mark.parametrize("layout", ["channel_slice", "transposed"])
def test_grouped_dw_strided_input(name, layout):
    prim = _impl(name, torch.float64)
    gen = torch.Generator().manual_seed(7)
    if layout == "channel_slice":
        x0 = torch.randn(2, 9, 6, 5, generator=gen, dtype=torch.float64)[:, 3:7]
    else:
        x0 = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64).transpose(2, 3)
    assert not x0.is_contiguous()
    k = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64)
    y = prim.grouped_dw(x0, k, (3, 5), (2, 1), True, True)
    torch.testing.assert_close(y, grouped_dw_ref(x0, k, (3, 5), (2, 1), True, True), rtol=1e-12, atol=1e-12)


MIXED_CASES = [
    # (ksizes, dilations, kmax, relu, skip)
    ((3, 5, 3, 5), (1, 1, 2, 2), 5, False, True),   # the idealised DARTS set with skip (41 taps)
    ((3, 5, 3, 5), (1, 1, 2, 2), 5, True, True),    # skip not foldable behind a ReLU
    ((3, 7), (1, 1), 7, True, False),
    ((1,), (1,), 1, False, False),
]


@pytest.mark.parametrize("name", sorted(IMPLS))
@pytest.mark.parametrize("case", range(len(MIXED_CASES)))
@pytest.mark.parametrize("wkind", ["softmax", "sigmoid", "onehot"])
def test_mixed_dw(name, case, wkind):
    dtype = torch.float64
    prim = _impl(name, dtype)
    ks, ds, kmax, relu, skip = MIXED_CASES[case]
    G, C = len(ks), 3
    gen = torch.Generator().manual_seed(10 + case)
    x0 = torch.randn(2, C, 7, 6, generator=gen, dtype=dtype)
    k0 = torch.randn(G, C, kmax, kmax, generator=gen, dtype=dtype)
    a = torch.randn(G + 1, generator=gen, dtype=dtype)
    w0 = {"softmax": F.softmax(a, 0), "sigmoid": torch.sigmoid(a),
          "onehot": F.one_hot(torch.tensor(G // 2), G + 1).to(dtype)}[wkind]
    gy = torch.randn(2, C, 7, 6, generator=gen, dtype=dtype)
    res = []
    for fn in (lambda *a, **k: prim.mixed_dw(*a, **k), mixed_dw_ref):
        x = x0.clone().requires_grad_(True)
        k = k0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        sw = w[G] if skip else None
        y = fn(x, w[:G], k, ks, ds, relu, skip_weight=sw)
        res.append((y,) + torch.autograd.grad(y, (x, k, w), gy))
    for a_, b_, what in zip(res[0], res[1], ("y", "dx", "dkernels", "dweights")):
        torch.testing.assert_close(a_, b_, rtol=1e-10, atol=1e-11, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", sorted(IMPLS))
def test_gradcheck_fp64(name):
    prim = _impl(name, torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, k: prim.grouped_dw(x, k, (3, 1), (2, 1), True, True),
                             (x, k), fast_mode=True)
    torch.autograd.gradcheck(lambda x, k, w: prim.mixed_dw(x, w, k, (3, 3), (1, 2), False, 0.5),
                             (x, k, w), fast_mode=True)


@pytest.mark.parametrize("name", sorted(IMPLS))
def test_deterministic_backward(name):
    prim = _impl(name, torch.float32)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    k = torch.randn(3, 4, 5, 5, generator=gen, requires_grad=True)
    gy = torch.randn(2, 12, 8, 8, generator=gen)
    r = [torch.autograd.grad(prim.grouped_dw(x, k, (3, 5, 3), (1, 1, 2), True, True), (x, k), gy)
         for _ in range(2)]
    assert torch.equal(r[0][0], r[1][0]) and torch.equal(r[0][1], r[1][1])


@pytest.mark.parametrize("name", sorted(IMPLS))
def test_bad_arguments(name):
    prim = _impl(name, torch.float32)
    x = torch.randn(1, 4, 5, 5)
    k = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="input must be"):
        prim.grouped_dw(x[0], k, (3, 3), (1, 1), True, True)
    with pytest.raises(ValueError, match="channels"):
        prim.grouped_dw(x, k, (3, 3), (1, 1), True, False)
    with pytest.raises(ValueError, match="kernel size"):
        prim.grouped_dw(x, k, (3, 4), (1, 1), True, True)
    with pytest.raises(ValueError, match="floating point"):
        prim.grouped_dw(x.long(), k, (3, 3), (1, 1), True, True)
    with pytest.raises(ValueError, match="differ"):
        prim.grouped_dw(x, k.double(), (3, 3), (1, 1), True, True)
    with pytest.raises(ValueError, match="vector of 2"):
        prim.mixed_dw(x, torch.ones(3), k, (3, 3), (1, 1), True)


# --- Triton custom-op registration ------------------------------------------------------------
def _triton_ops():
    if "triton" not in IMPLS:
        pytest.skip("triton backend not registered (triton missing?)")
    _impl("triton", torch.float64)
    from hdnas.kernels import ops
    return ops


def test_triton_opcheck():
    ops = _triton_ops()
    gen = torch.Generator().manual_seed(5)
    samples = [
        ((torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True),
          ops.square_taps((3, 5), 5), [2, 1], True, True), {}),
        ((torch.randn(1, 4, 3, 7, generator=gen, requires_grad=True),
          torch.randn(2, 2, 3, 3, generator=gen, requires_grad=True),
          ops.square_taps((3, 1), 3), [1, 1], False, False), {}),
    ]
    for args, kw in samples:
        torch.library.opcheck(torch.ops.hdnas_triton.dw_taps.default, args, kw)


def test_triton_torch_compile():
    """torch.compile (aot_eager: fake tensors + the registered autograd) around the custom op."""
    ops = _triton_ops()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, k):
        return (ops.grouped_dw(x, k, (3, 5), (2, 1), True, True) ** 2).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    ga = torch.autograd.grad(cf(x, k), (x, k))
    gb = torch.autograd.grad(f(x, k), (x, k))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _epi_ref(z1, w1, z2, w2, add, res, lrelu):
    y = torch.einsum("ck,nkhw->nchw", w1, z1)
    if z2 is not None:
        y = y + torch.einsum("ck,nkhw->nchw", w2, z2)
    for t in (add, res):
        if t is not None:
            y = y + t
    return F.leaky_relu(y, 0.05) if lrelu else y


@pytest.mark.parametrize("flags", [(True, True, True, True), (False, False, False, False),
                                   (True, False, True, False), (False, True, False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_pw_epilogue(flags, dtype):
    """The fused alpha-block GEMM epilogue vs einsum, with strided z2 (channel slice), add
    (channel slice) and res (transposed), forward and all gradients."""
    ops = _triton_ops()
    has2, has_add, has_res, lrelu = flags
    gen = torch.Generator().manual_seed(8)
    N, C, H, W = 2, 6, 5, 7

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    z1, w1, zb, w2, ab, rb = r(N, 18, H, W), r(C, 18), r(N, 25, H, W), r(C, 10), r(N, C + 3, H, W), r(N, C, W, H)
    z2 = zb[:, 15:25] if has2 else None
    w2 = w2 if has2 else None
    add = ab[:, :C] if has_add else None
    res = rb.transpose(2, 3) if has_res else None
    leaves = [t for t, on in ((z1, 1), (w1, 1), (zb, has2), (w2, has2), (ab, has_add), (rb, has_res)) if on]
    g = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    o1 = ops.pw_epilogue(z1, w1, z2, w2, add, res, lrelu)
    o2 = _epi_ref(z1, w1, z2, w2, add, res, lrelu)
    tol = _tol(dtype)
    torch.testing.assert_close(o1, o2, **tol)
    for a, b in zip(torch.autograd.grad(o1, leaves, g), torch.autograd.grad(o2, leaves, g)):
        torch.testing.assert_close(a, b, **tol)


def test_triton_pw_epilogue_opcheck():
    _triton_ops()  # skips without Triton; importing it registers the custom ops
    gen = torch.Generator().manual_seed(9)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
    for args in [(r(2, 12, 4, 5), r(4, 12), r(2, 8, 4, 5), r(4, 8), r(2, 4, 4, 5), r(2, 4, 4, 5), True),
                 (r(1, 6, 3, 3), r(5, 6), None, None, None, None, False)]:
        torch.library.opcheck(torch.ops.hdnas_triton.pw_epilogue.default, args)


def test_triton_backend_torch_compile():
    """A whole distillation step of the triton backend under torch.compile (aot_eager: fake
    tensors of all three custom ops, their autograd formulas) matches eager."""
    _triton_ops()
    import copy

    from hdnas.mixed import MixedOp
    from hdnas.model.space import DLSR_PRIMITIVES
    b = get_backend("triton")
    torch.manual_seed(0)
    m = MixedOp(4, DLSR_PRIMITIVES).double()
    cd = torch.nn.Conv2d(4, 2, 1).double()
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(9, dtype=torch.float64), 0).requires_grad_(True)

    def f(x, w, m, cd):
        d, r = b.distill_step(x, w, m, cd)
        return (d ** 2).sum() + (r ** 2).sum()

    torch._dynamo.reset()
    m2, cd2 = copy.deepcopy(m), copy.deepcopy(cd)
    la = torch.compile(f, backend="aot_eager")(x, w, m, cd)
    ga = torch.autograd.grad(la, [x, w, *m.parameters(), *cd.parameters()])
    lb = f(x, w, m2, cd2)
    gb = torch.autograd.grad(lb, [x, w, *m2.parameters(), *cd2.parameters()])
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
    for a, c in zip(ga, gb):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_triton_unsupported_reasons():
    """The triton backend says why it cannot serve a device/dtype, and 'fused' never picks the
    numpy interpreter on CPU."""
    import subprocess
    import sys
    import warnings

    from hdnas.mixed import resolve_backend
    from hdnas.model.space import DLSR_PRIMITIVES
    _triton_ops()
    b = get_backend("triton")
    assert "bf16" in b.unsupported_reason(DLSR_PRIMITIVES, torch.device("cpu"), torch.bfloat16)
    assert "TRITON_INTERPRET" in b.unsupported_reason(DLSR_PRIMITIVES, torch.device("cuda"), torch.float32)
    assert "meta" in b.unsupported_reason(DLSR_PRIMITIVES, torch.device("meta"), torch.float32)
    assert "floating" in b.unsupported_reason(DLSR_PRIMITIVES, torch.device("cpu"), torch.int32)
    assert resolve_backend("fused", "cpu", torch.float32, DLSR_PRIMITIVES).name != "triton"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert resolve_backend("triton", "cpu", torch.bfloat16, DLSR_PRIMITIVES).name == "reference"
    assert any("bf16" in str(r.message) for r in rec)
    # without the interpreter, CPU tensors are declined with the reason (fresh process: the
    # interpreter is chosen when the kernels are decorated)
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch; from hdnas.mixed import get_backend; "
            "print(get_backend('triton').unsupported_reason(('conv_1x1',), torch.device('cpu'), torch.float32))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if torch.cuda.is_available():
        return
    assert "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


# --- Triton launch grids ----------------------------------------------------------------------
def test_triton_grids_fit_cuda_limits():
    """Grid arithmetic at large logical sizes, nothing allocated: an 8192x8192 image and a
    1 x 2**25 plane at the shipped GPU block sizes, for one image and batches of many (n, c)
    planes. Their pixel blocks alone exceed 65535 (the limit of grid axes 1 and 2, where they
    used to be); on axis 0 every (row, pixel) block gets exactly one program."""
    ops = _triton_ops()
    limits = ops.GRID_LIMITS
    br, bs = ops.GPU_FWD_CFG["BLOCK_R"], ops.GPU_FWD_CFG["BLOCK_S"]
    for H, W in ((8192, 8192), (1, 2**25)):
        pixel_blocks = -(-H * W // bs)
        assert pixel_blocks > 65535
        for rows in (1, 48, 64 * 48, 8192):
            for groups in (1, 9):
                grid = ops.dw_grid(rows, groups, H * W, br, bs)
                assert grid == (pixel_blocks * -(-rows // br), groups)
                assert all(n <= lim for n, lim in zip(grid, limits))
        for N in (1, 64):
            for blocks in (1, 4):
                grid = ops.epi_grid(H * W, N, blocks, ops.GPU_EPI_FWD_CFG["BLOCK_P"])
                assert grid[1:] == (N, blocks) and grid[0] <= limits[0]
        ops.check_index_range("dw_taps", 8192, H * W)  # fits int32 indexing
    with pytest.raises(ValueError, match="grid axis 0"):  # 2**36 programs: no launch can hold it
        ops.dw_grid(2**20, 1, 2**25, br, bs)
    with pytest.raises(ValueError, match="grid axis 1"):
        ops.dw_grid(48, 70000, 64, br, bs)
    with pytest.raises(ValueError, match="grid axis 1"):
        ops.epi_grid(64, 70000, 1, 64)
    with pytest.raises(ValueError, match="int32"):
        ops.check_index_range("dw_taps", 48, 46341 * 46341)
    with pytest.raises(ValueError, match="int32"):
        ops.check_index_range("dw_taps", 2**31, 64)


def test_triton_plane_offsets_int32():
    """In-plane offsets h * stride_h + w * stride_w are int32 in the kernels: a channels-last
    8192x8192 image with 48 channels overflows them and is copied to NCHW before a launch."""
    ops = _triton_ops()
    C, H, W = 48, 8192, 8192
    assert ops.plane_offsets_fit((1, C, H, W), (C * H * W, H * W, W, 1))
    assert not ops.plane_offsets_fit((1, C, H, W), (C * H * W, 1, W * C, C))
    x = torch.randn(1, 4, 3, 5).to(memory_format=torch.channels_last)
    assert ops.int32_planes(x) is x and ops.int32_planes(None) is None


@pytest.fixture
def small_triton_blocks(monkeypatch):
    """Tiny blocks, so that a small problem has several row, pixel, channel and split blocks."""
    ops = _triton_ops()
    monkeypatch.setattr(ops, "_fwd_cfg", lambda rows, hw: dict(BLOCK_R=2, BLOCK_S=16, num_warps=4))
    monkeypatch.setattr(ops, "_dk_cfg", lambda C, G, N, hw, device: (dict(BLOCK_C=2, BLOCK_S=16, num_warps=4), 3))
    monkeypatch.setattr(ops, "_epi_cfg", lambda kind, C, K, HW: dict(BLOCK_CO=16, BLOCK_P=16, BLOCK_K=16, num_warps=4))
    return ops


@pytest.mark.parametrize("shared,layout", [(True, "contiguous"), (False, "channels_last")])
def test_triton_dw_many_blocks(small_triton_blocks, shared, layout):
    """3 images x 3 channels (5 row blocks of 2, the last one partial) of 7x9 pixels (4 pixel
    blocks of 16, the last one partial), 3 groups: forward, dx and dkernels match the twin."""
    ops = small_triton_blocks
    ks, ds = (3, 5, 3), (1, 1, 2)
    N, C, H, W, G = 3, 3, 7, 9, len(ks)
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(N, C if shared else G * C, H, W, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        x0 = x0.to(memory_format=torch.channels_last)
    k0 = torch.randn(G, C, 5, 5, generator=gen, dtype=torch.float64)
    gy = torch.randn(N, G * C, H, W, generator=gen, dtype=torch.float64)
    assert ops.dw_grid(N * C, 1 if shared else G, H * W, 2, 16) == (4 * 5, 1 if shared else G)
    outs = []
    for fn in (ops.grouped_dw, grouped_dw_ref):
        x = x0.clone().requires_grad_(True)
        k = k0.clone().requires_grad_(True)
        y = fn(x, k, ks, ds, True, shared)
        outs.append((y,) + torch.autograd.grad(y, (x, k), gy))
    for a, b, what in zip(outs[0], outs[1], ("y", "dx", "dkernels")):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")


def test_triton_pw_epilogue_many_blocks(small_triton_blocks):
    """3 images of 7x9 pixels (4 pixel blocks of 16) and 20 output channels (2 blocks of 16):
    the epilogue and its gradients match einsum."""
    ops = small_triton_blocks
    gen = torch.Generator().manual_seed(12)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_(True)
    z1, w1, z2, w2, add, res = r(3, 18, 7, 9), r(20, 18), r(3, 5, 7, 9), r(20, 5), r(3, 20, 7, 9), r(3, 20, 7, 9)
    leaves = (z1, w1, z2, w2, add, res)
    g = torch.randn(3, 20, 7, 9, generator=gen, dtype=torch.float64)
    o1 = ops.pw_epilogue(z1, w1, z2, w2, add, res, True)
    o2 = _epi_ref(z1, w1, z2, w2, add, res, True)
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(o1, leaves, g), torch.autograd.grad(o2, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
