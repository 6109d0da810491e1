"""One conformance suite for every registered mixed-op backend except 'reference'.

Each backend is compared with the reference (the plain per-op loop) on random inputs: outputs and
all gradients (input, every op parameter, the op weights, the distillation conv) in fp64 at 1e-10
relative to the largest reference value, and in fp32 at FP32_TOL. Backends are discovered from the
registry, so one registered later (e.g. 'native') is picked up automatically; a backend whose
``unsupported_reason`` is not None for a case is skipped for that case.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from hdnas.mixed import BackendError, MixedOp, available_backends, get_backend
from hdnas.model.space import DLSR_PRIMITIVES
from hdnas.testing.bounds import AUTOCAST_DEPTH, DEPTH, UNIT_ROUNDOFF, bound_ratio

get_backend("reference")  # loads the optional backends (triton, native) before discovery
BACKENDS = [b for b in available_backends() if b != "reference"]
REF = get_backend("reference")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FP64_TOL = 1e-10
FP32_TOL = 5e-5  # max abs error / max |reference|, fp32 reassociation of sums of <= 49*C terms

OP_SETS = {
    "dlsr": DLSR_PRIMITIVES,
    "no_dense": ("sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7", "dil_conv_3x3", "dil_conv_5x5"),
    "dense_only": ("conv_3x3", "conv_1x1", "conv_5x5"),
    "dlsr_skip": DLSR_PRIMITIVES + ("skip_connect",),
    "sep_only": ("sep_conv_5x5",),
    "dil_skip": ("skip_connect", "dil_conv_5x5", "dil_conv_3x3"),
    "conv_sep": ("conv_7x7", "sep_conv_3x3"),
    "conv1_dil": ("conv_1x1", "dil_conv_3x3"),  # 1x1 dense: the distill 1x1 joins that conv
}


def _backend_or_skip(name, op_names, device, dtype):
    b = get_backend(name)
    why = b.unsupported_reason(tuple(op_names), torch.device(device), dtype)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    return b


def _weights(kind, K, gen, dtype):
    a = torch.randn(K, generator=gen, dtype=torch.float64)
    if kind == "softmax":
        w = F.softmax(a, 0)
    elif kind == "sigmoid":
        w = torch.sigmoid(a)
    elif kind == "onehot":
        w = torch.zeros(K, dtype=torch.float64)
        w[int(torch.randint(K, (1,), generator=gen))] = 1.0
    else:
        w = a  # arbitrary real weights
    return w.to(dtype)


def _make(op_names, C, dtype, seed):
    torch.manual_seed(seed)
    m = MixedOp(C, op_names)
    with torch.no_grad():  # random, not-too-small weights everywhere
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m.to(dtype)


def _input(N, C, H, W, dtype, gen, layout, device="cpu"):
    if layout == "contiguous":
        return torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(device, dtype)
    if layout == "channel_slice":  # a channel slice of a bigger batch (distillation split)
        big = torch.randn(N, C + 5, H, W, generator=gen, dtype=torch.float64).to(device, dtype)
        return big[:, 2:2 + C]
    if layout == "transposed":  # non-contiguous spatial strides
        return torch.randn(N, C, W, H, generator=gen, dtype=torch.float64).to(device, dtype).transpose(2, 3)
    raise ValueError(layout)


def _rel_err(a, b):
    scale = b.abs().max().clamp_min(1e-30)
    return ((a - b).abs().max() / scale).item()


def _assert_close(a, b, tol, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    err = _rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def _leaf_input(x):
    """(leaf, view): a fresh leaf holding x's storage layout and the same (possibly
    non-contiguous) view of it, so the backend sees the strides and the gradient is readable."""
    if x._base is None:
        leaf = x.detach().clone().requires_grad_(True)
        return leaf, leaf
    leaf = x._base.detach().clone().requires_grad_(True)
    off = x.storage_offset() - x._base.storage_offset()
    return leaf, leaf.as_strided(x.shape, x.stride(), leaf.storage_offset() + off)


def _run(backend, mixed, distill, x, w, g_list):
    """Forward (mixed_op or distill_step), backward with fixed cotangents; returns outputs and
    gradients for x, w and every parameter."""
    mixed = copy.deepcopy(mixed)
    distill = copy.deepcopy(distill) if distill is not None else None
    leaf, xv = _leaf_input(x)
    assert xv.stride() == x.stride()
    w = w.detach().clone().requires_grad_(True)
    if distill is None:
        outs = (backend.mixed_op(xv, w, mixed),)
        params = list(mixed.named_parameters())
    else:
        outs = backend.distill_step(xv, w, mixed, distill)
        params = list(mixed.named_parameters()) + [("distill." + n, p) for n, p in distill.named_parameters()]
    loss = sum((o * g).sum() for o, g in zip(outs, g_list))
    loss.backward()
    grads = {"x": leaf.grad, "w": w.grad}
    for n, p in params:
        grads[n] = p.grad if p.grad is not None else torch.zeros_like(p)
    return [o.detach() for o in outs], grads


def _compare(name, op_names, N, C, H, W, dtype, wkind="softmax", layout="contiguous",
             distill=False, seed=0, device="cpu"):
    b = _backend_or_skip(name, op_names, device, dtype)
    gen = torch.Generator().manual_seed(seed)
    mixed = _make(op_names, C, dtype, seed).to(device)
    c_d = None
    if distill:
        c_d = torch.nn.Conv2d(C, C // 2 or 1, 1, bias=True).to(dtype)
        with torch.no_grad():
            c_d.weight.normal_(0, 0.5)
            c_d.bias.normal_(0, 0.5)
        c_d = c_d.to(device)
    x = _input(N, C, H, W, dtype, gen, layout, device)
    w = _weights(wkind, len(op_names), gen, dtype).to(device)
    shapes = [(N, C // 2 or 1, H, W), (N, C, H, W)] if distill else [(N, C, H, W)]
    g_list = [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]
    ref_out, ref_grads = _run(REF, mixed, c_d, x, w, g_list)
    out, grads = _run(b, mixed, c_d, x, w, g_list)
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    for i, (o, r) in enumerate(zip(out, ref_out)):
        _assert_close(o, r, tol, f"{name} output {i}")
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        _assert_close(grads[k], ref_grads[k], tol, f"{name} grad {k}")


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("ops", list(OP_SETS))
def test_op_sets_fp64(name, ops, device):
    _compare(name, OP_SETS[ops], 2, 6, 9, 7, torch.float64, "softmax", seed=1, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 5, 17, 9), (1, 1, 4, 11), (3, 7, 5, 5)])
def test_odd_shapes_fp64(name, shape, device):
    _compare(name, DLSR_PRIMITIVES, *shape, torch.float64, "sigmoid", seed=2, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("wkind", ["softmax", "sigmoid", "onehot", "raw"])
def test_weight_kinds_fp32(name, wkind, device):
    _compare(name, DLSR_PRIMITIVES + ("skip_connect",), 2, 6, 8, 10, torch.float32, wkind, seed=3,
             device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_search_shape(name, dtype):
    """A realistic size on the GPU (tile edges, many programs, split reductions)."""
    _compare(name, DLSR_PRIMITIVES, 8, 48, 33, 31, dtype, "softmax", distill=True, seed=11,
             device="cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("layout", ["channel_slice", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noncontiguous(name, layout, dtype, device):
    _compare(name, DLSR_PRIMITIVES, 2, 6, 7, 9, dtype, "softmax", layout=layout, seed=4, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("ops", ["dlsr", "no_dense", "dil_skip", "conv1_dil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distill_step(name, ops, dtype, device):
    _compare(name, OP_SETS[ops], 2, 6, 7, 6, dtype, "softmax", distill=True, seed=5, device=device)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("layout", ["channel_slice", "transposed"])
def test_distill_step_noncontiguous(name, layout):
    _compare(name, DLSR_PRIMITIVES, 2, 6, 5, 7, torch.float64, "softmax", layout=layout,
             distill=True, seed=13)


@pytest.mark.parametrize("name", BACKENDS)
def test_distill_step_odd_channels(name):
    _compare(name, DLSR_PRIMITIVES, 1, 5, 6, 5, torch.float64, "raw", distill=True, seed=6)


# --- bad input: clear errors before any kernel launch -----------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_bad_input(name):
    b = _backend_or_skip(name, DLSR_PRIMITIVES, "cpu", torch.float32)
    m = MixedOp(4, DLSR_PRIMITIVES)
    w = torch.full((9,), 1 / 9)
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(BackendError, match="4-D"):
        b.mixed_op(x[0], w, m)
    with pytest.raises(BackendError, match="channels"):
        b.mixed_op(torch.randn(1, 3, 5, 5), w, m)
    with pytest.raises(BackendError, match="floating point"):
        b.mixed_op(torch.ones(1, 4, 5, 5, dtype=torch.int64), w, m)
    with pytest.raises(BackendError, match="vector of 9"):
        b.mixed_op(x, torch.ones(8), m)
    with pytest.raises(BackendError, match="on meta"):
        b.mixed_op(x, w.to("meta"), m)
    with pytest.raises(BackendError, match="on meta"):
        b.mixed_op(x, w, copy.deepcopy(m).to("meta"))
    with pytest.raises(BackendError, match="4-D"):
        b.distill_step(x[0], w, m, torch.nn.Conv2d(4, 2, 1))


# --- whole supernet: one step and a few search steps ------------------------------------------
def _search(backend, steps, C=8, cells=3, dtype=torch.float64):
    from hdnas.model.network import SuperNet

    torch.manual_seed(0)
    net = SuperNet(C=C, num_cells=cells, scale=2, backend=get_backend("reference")).to(dtype)
    net.backend = get_backend(backend)
    gen = torch.Generator().manual_seed(1)
    lr = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64).to(dtype)
    hr = torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float64).to(dtype)
    opt_w = torch.optim.Adam(net.weight_parameters(), lr=1e-3)
    opt_a = torch.optim.Adam(net.arch_parameters(), lr=3e-2)
    losses = []
    for _ in range(steps):
        opt_w.zero_grad()
        opt_a.zero_grad()
        loss = F.l1_loss(net(lr), hr)
        loss.backward()
        opt_w.step()
        opt_a.step()
        losses.append(loss.item())
    return losses, net.alphas.detach().clone(), [p.grad.clone() for p in net.weight_parameters()]


_SEARCH_STEPS = 2
_REF_SEARCH = {}


@pytest.mark.parametrize("name", BACKENDS)
def test_supernet_search_steps(name):
    """A whole SuperNet (3 cells, C=8) in fp64: the same losses, alphas after Adam steps on
    alpha and the weights, and weight gradients as the reference. (Triton under the CPU
    interpreter takes one step: a second costs ~50 s there and adds no new kernel launch.)"""
    _backend_or_skip(name, DLSR_PRIMITIVES, "cpu", torch.float64)
    steps = _SEARCH_STEPS
    if name == "triton":
        from hdnas.kernels.ops import interpreting
        steps = 1 if interpreting() else steps
    if steps not in _REF_SEARCH:
        _REF_SEARCH[steps] = _search("reference", steps)
    ref_l, ref_a, ref_g = _REF_SEARCH[steps]
    l, a, g = _search(name, steps)
    assert l == pytest.approx(ref_l, rel=1e-9)
    _assert_close(a, ref_a, 1e-8, f"alphas after {steps} Adam steps")
    for i, (gi, ri) in enumerate(zip(g, ref_g)):
        _assert_close(gi, ri, 1e-8, f"weight grad {i} at the last step")


def _partial_backward_cases():
    """Every backend x (arch, weights) x (fp64, fp32); a backend interpreted on the CPU (Triton
    without a GPU: minutes per whole-net pass) only for the arch step in fp64, marked slow."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for name in BACKENDS:
        for part in ("arch", "weights"):
            for dtype, tol in ((torch.float64, FP64_TOL), (torch.float32, FP32_TOL)):
                if name == "triton" and interpreted:
                    if part == "arch" and dtype == torch.float64:
                        yield pytest.param(name, part, dtype, tol, marks=pytest.mark.slow)
                    continue
                yield name, part, dtype, tol


@pytest.mark.parametrize("name,part,dtype,tol", list(_partial_backward_cases()))
def test_supernet_partial_backward(name, part, dtype, tol):
    """``loss.backward(inputs=...)`` as the search does it: to alpha/beta only (an
    architecture step: backends skip the op-parameter gradients there) or to the weights only
    (a weight step): the same gradients as the reference, and none for the other group."""
    from hdnas.model.network import SuperNet

    _backend_or_skip(name, DLSR_PRIMITIVES, "cpu", dtype)
    torch.manual_seed(0)
    net = SuperNet(C=8, num_cells=3, scale=2, backend=get_backend("reference")).to(dtype)
    with torch.no_grad():  # alpha/beta away from uniform so every candidate matters
        for p in net.arch_parameters():
            p.normal_(0, 1)
    gen = torch.Generator().manual_seed(2)
    lr = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64).to(dtype)
    hr = torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float64).to(dtype)
    wanted = net.arch_parameters() if part == "arch" else net.weight_parameters()
    others = net.weight_parameters() if part == "arch" else net.arch_parameters()
    grads = {}
    for b in ("reference", name):
        net.backend = get_backend(b)
        net.zero_grad(set_to_none=True)
        F.l1_loss(net(lr), hr).backward(inputs=wanted)
        assert all(p.grad is None for p in others), f"{b}: gradients outside inputs="
        grads[b] = [p.grad.clone() for p in wanted]
    for i, (g, r) in enumerate(zip(grads[name], grads["reference"])):
        _assert_close(g, r, tol, f"{part} grad {i}")


# --- low precision: error bounds from the unit round-off and the reduction length -------------


def _reduction_length(N, C, H, W):
    """The longest dot product of a mixed op's forward or backward: the 7x7 dense conv (49 C
    terms, forward and input gradient) or a weight gradient (N H W terms)."""
    return max(49 * C, N * H * W) + DEPTH


def _magnitude(mixed, c_d, x, w, g_list):
    """|.|-magnitudes: the fp64 reference run on the absolute values of every input, parameter,
    op weight and cotangent. Each output and gradient element of it bounds the sum of the
    absolute values of the terms that make that element (ReLU masks and LeakyReLU slopes are
    <= 1), which is what floating-point error bounds scale with."""
    m = copy.deepcopy(mixed)
    d = copy.deepcopy(c_d)
    with torch.no_grad():
        for p in list(m.parameters()) + list(d.parameters()):
            p.abs_()
    return _run(REF, m, d, x.abs(), w.abs(), [g.abs() for g in g_list])


def _assert_bounded(got, truth, mag, dtype, n, what, depth=DEPTH):
    """|got - truth| <= (depth u + gamma_n(u32)) * magnitude, elementwise: ``depth`` roundings to
    the storage dtype's unit round-off u along a chain of ops, and a length-n dot product
    accumulated in fp32 (Higham's gamma_n), plus u times a 1e-3 fraction of the largest
    magnitude for values near underflow (``hdnas.testing.bounds.bound_ratio``, which the GPU checks
    use too). This is the promise of a backend that stores in ``dtype`` and accumulates in fp32."""
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    ratio = bound_ratio(got, truth, mag, UNIT_ROUNDOFF[dtype], n, depth)
    assert ratio <= 1.0, (f"{what}: error {ratio:.3g}x the bound ({depth} u + gamma_{n}(fp32)) "
                          "times the |.|-magnitude")


def _low_precision_case(dtype, device, seed):
    """fp64 module, distillation conv, input, op weights and cotangents."""
    N, C, H, W = 2, 6, 7, 5
    gen = torch.Generator().manual_seed(seed)
    mixed = _make(DLSR_PRIMITIVES, C, torch.float64, seed).to(device)
    c_d = torch.nn.Conv2d(C, max(C // 2, 1), 1).double().to(device)
    x = _input(N, C, H, W, torch.float64, gen, "contiguous", device)
    w = _weights("softmax", 9, gen, torch.float64).to(device)
    g_list = [torch.randn(s, generator=gen, dtype=torch.float64).to(device)
              for s in ((N, max(C // 2, 1), H, W), (N, C, H, W))]
    return (mixed, c_d, x, w, g_list), _reduction_length(N, C, H, W)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(name, dtype, device):
    """fp16/bf16 storage (module, input and op weights in that dtype) vs the fp64 reference:
    every output and gradient element within the fp32-accumulation bound of its |.|-magnitude.
    (The reference itself is not held to it: stock CPU fp16 conv weight gradients were measured
    at up to ~940 u, the fused backends at 1.4 u, on this case.)"""
    b = _backend_or_skip(name, DLSR_PRIMITIVES, device, dtype)
    (mixed, c_d, x, w, g_list), n = _low_precision_case(dtype, device, 12)
    truth = _run(REF, mixed, c_d, x, w, g_list)
    mag = _magnitude(mixed, c_d, x, w, g_list)
    got = _run(b, copy.deepcopy(mixed).to(dtype), copy.deepcopy(c_d).to(dtype), x.to(dtype),
               w.to(dtype), [g.to(dtype) for g in g_list])
    for i in range(len(truth[0])):
        assert got[0][i].dtype == dtype
        _assert_bounded(got[0][i], truth[0][i], mag[0][i], dtype, n, f"{name} {dtype} output {i}")
    for k in truth[1]:
        _assert_bounded(got[1][k], truth[1][k], mag[1][k], dtype, n, f"{name} {dtype} grad {k}")


def test_low_precision_bound_can_fail():
    """The bound above is not vacuous: dropping one candidate (a plausible kernel bug) or
    rounding the output through bf16 when fp16 was asked for breaks it."""
    (mixed, c_d, x, w, g_list), n = _low_precision_case(torch.float16, "cpu", 12)
    truth = _run(REF, mixed, c_d, x, w, g_list)
    mag = _magnitude(mixed, c_d, x, w, g_list)
    w_bad = w.clone()
    w_bad[int(w.argmax())] = 0
    wrong = _run(REF, mixed, c_d, x, w_bad, g_list)
    with pytest.raises(AssertionError, match="bound"):
        _assert_bounded(wrong[0][1], truth[0][1], mag[0][1], torch.float16, n, "dropped op")
    coarse = truth[1]["x"].to(torch.bfloat16).to(torch.float16) * 1.25
    with pytest.raises(AssertionError, match="bound"):
        _assert_bounded(coarse, truth[1]["x"], mag[1]["x"], torch.float16, n, "coarse")


def _autocast_dtypes(device):
    if device == "cpu":
        return [torch.bfloat16, torch.float16]
    return [torch.float16, torch.bfloat16]


def _run_autocast(backend, mixed, c_d, x, w_logits, g_list, dtype, device):
    """Like _run, with the forward under torch.autocast and the op weights a softmax of fp32
    logits (as the supernet makes them), so d alpha is the gradient of the logits."""
    mixed = copy.deepcopy(mixed)
    c_d = copy.deepcopy(c_d)
    leaf = x.detach().clone().requires_grad_(True)
    a = w_logits.detach().clone().requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        outs = backend.distill_step(leaf, F.softmax(a, 0), mixed, c_d)
        y = backend.mixed_op(leaf, F.softmax(a, 0), mixed)
    outs = outs + (y,)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, g_list))
    loss.backward()
    grads = {"x": leaf.grad, "alpha": a.grad}
    params = list(mixed.named_parameters()) + [("distill." + k, p) for k, p in c_d.named_parameters()]
    for k, p in params:
        grads[k] = p.grad if p.grad is not None else torch.zeros_like(p)
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("ops", ["dlsr", "dlsr_skip", "conv1_dil"])
@pytest.mark.parametrize("dtype_i", [0, 1])
def test_autocast(name, ops, dtype_i, device):
    """Under torch.autocast every backend follows the reference's dtype policy: the same output
    and gradient dtypes (fp32 parameters, input, alpha and their gradients; activations in the
    autocast dtype), and each element within gamma_n of the fp64 truth."""
    dtype = _autocast_dtypes(device)[dtype_i]
    op_names = OP_SETS[ops]
    try:
        with torch.autocast(device, dtype=dtype):
            pass
    except (RuntimeError, AssertionError) as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"autocast {device}/{dtype}: {e}")
    b = _backend_or_skip(name, op_names, device, dtype)
    N, C, H, W = 2, 6, 7, 5
    gen = torch.Generator().manual_seed(21)
    mixed32 = _make(op_names, C, torch.float32, 21).to(device)
    c_d32 = torch.nn.Conv2d(C, C // 2, 1).to(device)
    x32 = _input(N, C, H, W, torch.float32, gen, "contiguous", device)
    a32 = torch.randn(len(op_names), generator=gen).to(device)
    g_list = [torch.randn(s, generator=gen, dtype=torch.float64).to(device)
              for s in ((N, C // 2, H, W), (N, C, H, W), (N, C, H, W))]
    ref = _run_autocast(REF, mixed32, c_d32, x32, a32, g_list, dtype, device)
    got = _run_autocast(b, mixed32, c_d32, x32, a32, g_list, dtype, device)
    for i, (o, r) in enumerate(zip(got[0], ref[0])):
        assert o.dtype == r.dtype, f"{name} output {i}: {o.dtype}, the reference gives {r.dtype}"
    for k in ref[1]:
        assert got[1][k].dtype == ref[1][k].dtype == torch.float32, f"{name} grad {k}"

    # the fp64 truth of the same fp32 numbers, and its |.|-magnitude
    truth = _run_plain64(mixed32, c_d32, x32, a32, g_list)
    mag = _run_plain64(mixed32, c_d32, x32, a32, g_list, absolute=True)
    n = _reduction_length(N, C, H, W) + 2 * len(op_names)  # + the softmax Jacobian's sum
    for i in range(len(truth[0])):
        _assert_bounded(got[0][i], truth[0][i], mag[0][i], dtype, n, f"{name} autocast output {i}",
                        AUTOCAST_DEPTH)
    for k in truth[1]:
        _assert_bounded(got[1][k], truth[1][k], mag[1][k], dtype, n, f"{name} autocast grad {k}",
                        AUTOCAST_DEPTH)


def _run_plain64(mixed, c_d, x, a, g_list, absolute=False):
    """The fp64 reference of _run_autocast's computation (no autocast); with ``absolute`` the
    |.|-magnitudes: every input, parameter and cotangent by its absolute value, and the softmax
    Jacobian by its absolute value (w_i (delta_ij + w_j))."""
    m = copy.deepcopy(mixed).double()
    d = copy.deepcopy(c_d).double()
    if absolute:
        with torch.no_grad():
            for p in list(m.parameters()) + list(d.parameters()):
                p.abs_()
    leaf = (x.double().abs() if absolute else x.double()).requires_grad_(True)
    a = a.detach().double().requires_grad_(True)
    w = F.softmax(a, 0)
    if absolute:  # same values, |Jacobian| in backward: d|.|/da_j = w_j (g_j + sum_i w_i g_i)
        w = _AbsSoftmaxGrad.apply(a)
    gs = [g.abs() for g in g_list] if absolute else g_list
    outs = REF.distill_step(leaf, w, m, d) + (REF.mixed_op(leaf, w, m),)
    loss = sum((o * g).sum() for o, g in zip(outs, gs))
    loss.backward()
    grads = {"x": leaf.grad, "alpha": a.grad}
    for k, p in list(m.named_parameters()) + [("distill." + k, p) for k, p in d.named_parameters()]:
        grads[k] = p.grad if p.grad is not None else torch.zeros_like(p)
    return [o.detach() for o in outs], grads


class _AbsSoftmaxGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        w = F.softmax(a, 0)
        ctx.save_for_backward(w)
        return w

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return w * (g.abs() + (w * g.abs()).sum())


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fuse_concat(name, dtype):
    """The cell's 1x1 fuse over [d1, d2, d3, r4] (strided parts included), with gradients."""
    b = get_backend(name)
    gen = torch.Generator().manual_seed(5)
    fuse = torch.nn.Conv2d(4 * 5, 11, 1).to(dtype)
    big = torch.randn(2, 9, 6, 7, generator=gen, dtype=torch.float64).to(dtype)
    parts = [big[:, 0:5], torch.randn(2, 5, 6, 7, generator=gen, dtype=torch.float64).to(dtype),
             big[:, 4:9], torch.randn(2, 5, 7, 6, generator=gen, dtype=torch.float64).to(dtype).transpose(2, 3)]
    g = torch.randn(2, 11, 6, 7, generator=gen, dtype=torch.float64).to(dtype)
    results = []
    for backend in (REF, b):
        ps = [p.detach().clone().requires_grad_(True) for p in parts]
        f = copy.deepcopy(fuse)
        y = backend.fuse_concat(ps, f)
        y.backward(g)
        results.append([y] + [p.grad for p in ps] + [f.weight.grad, f.bias.grad])
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    for i, (want, got) in enumerate(zip(*results)):
        _assert_close(got, want, tol, f"{name} fuse_concat tensor {i}")
