"""hdnas.darts.MixedOp against DARTS' plain per-op loop (PlainMixedOp): outputs, gradients of the
input, of every op parameter and of alpha, and the BN running statistics, at stride 1 and 2, for
every backend that serves the CPU and every weighting; recomputation; patch(); bad input."""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from torch import nn

import hdnas.darts as hd
from hdnas.darts.mixed import DartsBackendError, resolve_primitives
from hdnas.darts.operations import NotRecognised, identify_candidate

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}
WEIGHTINGS = {"softmax": lambda a: torch.softmax(a, -1), "sigmoid": torch.sigmoid,
              "pcdarts": lambda a: torch.softmax(a, -1)}


def _native_ok():
    from hdnas.mixed import native
    return native.available("cpu")


def _triton_ok():
    return (importlib.util.find_spec("triton") is not None
            and os.environ.get("TRITON_INTERPRET") == "1")


def backends():
    out = ["merged"]
    out.append("native" if _native_ok() else pytest.param("native", marks=pytest.mark.skip(
        reason="native CPU extension not built")))
    return out


def _pair(C, stride, dtype, backend, recompute=True, partial_k=1, seed=0):
    torch.manual_seed(seed)
    ref = hd.PlainMixedOp(C, stride, partial_k=partial_k).to(dtype)
    # non-trivial BN state, so that the running-statistics update is really checked
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(3)
    ours = hd.MixedOp.from_module(copy.deepcopy(ref), backend=backend, recompute=recompute,
                                  partial_k=partial_k)
    return ref, ours


def _g(ref, x, w):
    """A random output gradient of the right shape (from a copy: the BN state stays untouched)."""
    with torch.no_grad():
        return torch.randn_like(copy.deepcopy(ref)(x, w))


def _run(op, x, alpha, wfn, g, calls=2):
    """``calls`` forward/backward passes (BN statistics updated each time); the last output and
    the gradients accumulated over all calls."""
    x = x.detach().clone().requires_grad_()
    alpha = alpha.detach().clone().requires_grad_()
    for _ in range(calls):
        y = op(x, wfn(alpha))
        (y * g).sum().backward()
    return y.detach(), x.grad, alpha.grad


def _assert_same(ref, ours, tol, **outs):
    for name, (a, b) in outs.items():
        torch.testing.assert_close(b, a, **tol, msg=lambda m, n=name: f"{n}: {m}")
    for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), n
        else:
            torch.testing.assert_close(q.grad, p.grad, **tol, msg=lambda m, n=n: f"grad {n}: {m}")
    for (n, b), c in zip(ref.named_buffers(), ours.buffers()):
        torch.testing.assert_close(c, b, **tol, msg=lambda m, n=n: f"buffer {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("backend", backends())
def test_matches_plain_loop(backend, stride, weighting, dtype):
    K = 4 if weighting == "pcdarts" else 1
    C = 8 if K > 1 else 4
    ref, ours = _pair(C, stride, dtype, backend, partial_k=K)
    torch.manual_seed(1)
    x = torch.randn(2, C, 6, 6, dtype=dtype)
    alpha = torch.randn(8, dtype=torch.float32)  # fp32 weights on fp64 input: promoted as DARTS does
    g = _g(ref, x, WEIGHTINGS[weighting](alpha))
    a = _run(ref, x, alpha, WEIGHTINGS[weighting], g)
    b = _run(ours, x, alpha, WEIGHTINGS[weighting], g)
    assert b[0].shape == a[0].shape
    _assert_same(ref, ours, TOL[dtype], out=(a[0], b[0]), grad_x=(a[1], b[1]), grad_alpha=(a[2], b[2]))


@pytest.mark.parametrize("stride", [1, 2])
def test_recompute_off_and_eval_mode(stride):
    ref, ours = _pair(4, stride, torch.float64, "merged", recompute=False)
    x, alpha = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(8)
    g = _g(ref, x, alpha.softmax(0))
    _assert_same(ref, ours, TOL[torch.float64],
                 **dict(zip(("out", "gx", "ga"), zip(_run(ref, x, alpha, WEIGHTINGS["softmax"], g),
                                                     _run(ours, x, alpha, WEIGHTINGS["softmax"], g)))))
    ref.eval()
    ours.eval()  # BN normalises with the running statistics and leaves them alone
    with torch.no_grad():
        torch.testing.assert_close(ours(x, alpha.softmax(0)), ref(x, alpha.softmax(0)),
                                   **TOL[torch.float64])


def test_bn_cumulative_average_momentum_none():
    ref, ours = _pair(4, 1, torch.float64, "merged")
    for m in list(ref.modules()) + list(ours.modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    x, alpha = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(8)
    g = _g(ref, x, alpha.softmax(0))
    _assert_same(ref, ours, TOL[torch.float64],
                 **dict(zip(("out", "gx", "ga"), zip(_run(ref, x, alpha, WEIGHTINGS["softmax"], g, 3),
                                                     _run(ours, x, alpha, WEIGHTINGS["softmax"], g, 3)))))


@pytest.mark.skipif(not _triton_ok(), reason="triton missing or TRITON_INTERPRET unset (no GPU)")
@pytest.mark.parametrize("stride", [1, 2])
def test_triton_interpreter_tiny(stride):
    ref, ours = _pair(2, stride, torch.float64, "triton")
    x, alpha = torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.randn(8)
    assert resolve_primitives("triton", x.device, x.dtype, ours.plan).name == "triton"
    g = _g(ref, x, alpha.softmax(0))
    a = _run(ref, x, alpha, WEIGHTINGS["softmax"], g, 1)
    b = _run(ours, x, alpha, WEIGHTINGS["softmax"], g, 1)
    _assert_same(ref, ours, TOL[torch.float64], out=(a[0], b[0]), gx=(a[1], b[1]), ga=(a[2], b[2]))


def test_gdas_only_chosen_candidate_runs():
    ref, ours = _pair(4, 2, torch.float64, "merged")
    torch.manual_seed(3)
    alpha = torch.randn(8, dtype=torch.float64, requires_grad=True)
    hardwts, index = hd.gdas_weights(alpha, tau=10.0)
    k = int(index)
    assert hardwts.detach().eq(torch.nn.functional.one_hot(index, 8).double()).all()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    y = ours.forward_gdas(x, hardwts, k)
    torch.testing.assert_close(y, ref.forward_gdas(x, hardwts, k), rtol=1e-12, atol=1e-12)
    y.sum().backward()
    # straight-through: every logit gets a gradient; only the chosen op's parameters do
    assert (alpha.grad != 0).all()
    for i, op in enumerate(ours._ops):
        for p in op.parameters():
            assert (p.grad is not None) == (i == k)


@pytest.mark.parametrize("backend", ["merged", "native"])
@pytest.mark.parametrize("stride", [1, 2])
def test_gdas_each_candidate_fused_equals_plain(backend, stride):
    """forward_gdas runs the chosen candidate by the fused path of that candidate alone: output,
    input, weight and parameter gradients and BN statistics equal the plain form in fp64, for
    every index."""
    if backend == "native" and not _native_ok():
        pytest.skip("native kernels not built")
    for k in range(len(hd.PRIMITIVES)):
        ref, ours = _pair(8, stride, torch.float64, backend)
        torch.manual_seed(k)
        size = 7 if stride == 1 else 8  # (DARTS' FactorizedReduce takes even sizes only)
        x = torch.randn(3, 8, size, size, dtype=torch.float64)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ws = [torch.rand(8, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        with torch.no_grad():
            ws[1].copy_(ws[0])
        ys = [m.forward_gdas(xi, wi, k) for m, xi, wi in zip((ref, ours), xs, ws)]
        g = torch.randn_like(ys[0])
        for y in ys:
            y.backward(g)
        torch.testing.assert_close(ys[1], ys[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ws[1].grad, ws[0].grad, rtol=1e-10, atol=1e-10)
        for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
            assert (p.grad is None) == (q.grad is None), (k, n)
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10)
        for (n, a), (_, b) in zip(ref.named_buffers(), ours.named_buffers()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=f"{hd.PRIMITIVES[k]} {n}")


def test_gdas_weights_resample_and_bad_tau():
    h, i = hd.gdas_weights(torch.zeros(14, 8), tau=1.0, generator=torch.Generator().manual_seed(0))
    assert h.shape == (14, 8) and i.shape == (14,) and h.sum(-1).sub(1).abs().max() < 1e-6
    with pytest.raises(ValueError, match="tau"):
        hd.gdas_weights(torch.zeros(3), tau=0.0)


def test_edge_weights():
    b = torch.randn(14)
    w = hd.edge_weights(b, 4)
    starts = [0, 2, 5, 9, 14]
    for s, e in zip(starts, starts[1:]):
        torch.testing.assert_close(w[s:e], torch.softmax(b[s:e], 0))
    with pytest.raises(ValueError, match="vector of 14"):
        hd.edge_weights(torch.randn(13), 4)


def test_recompute_keeps_only_the_input():
    """Saved-for-backward bytes (distinct tensors, parameters excluded): with recompute only the
    input stays; without it several inputs' worth per candidate."""
    from hdnas.testing.memory import saved_bytes
    for stride in (1, 2):
        _, on = _pair(8, stride, torch.float32, "merged", recompute=True)
        _, off = _pair(8, stride, torch.float32, "merged", recompute=False)
        x = torch.randn(4, 8, 16, 16, requires_grad=True)
        a = torch.randn(8, requires_grad=True)
        nx = x.numel() * 4
        s_on = saved_bytes(lambda: on(x, a.softmax(0)))
        s_off = saved_bytes(lambda: off(x, a.softmax(0)))
        assert s_on <= nx + 1024, (stride, s_on, nx)
        assert s_off > (4 if stride == 1 else 1.5) * nx, (stride, s_off, nx)


def test_recompute_auto_recomputes_large_planes_only():
    """recompute="auto" (the default): planes of more than AUTO_RECOMPUTE_ABOVE pixels keep only
    the input for backward, smaller ones their intermediates; bad values are refused."""
    from hdnas.darts.mixed import AUTO_RECOMPUTE_ABOVE
    from hdnas.testing.memory import saved_bytes
    ref, auto = _pair(8, 1, torch.float32, "merged", recompute="auto")
    assert hd.MixedOp(8, 1).recompute == "auto" and "recompute='auto'" in repr(auto)
    a = torch.randn(8, requires_grad=True)
    side = int(AUTO_RECOMPUTE_ABOVE ** 0.5)
    for H, W, recomputes in [(side, side, False), (side + 1, side, True), (1, side * side + 1, True),
                             (4, 4, False)]:
        x = torch.randn(2, 8, H, W, requires_grad=True)
        assert auto.recomputes(x) == recomputes, (H, W)
        saved = saved_bytes(lambda: auto(x, a.softmax(0)))
        nx = x.numel() * 4
        assert (saved <= nx + 1024) if recomputes else (saved > 4 * nx), (H, W, saved, nx)
        g = torch.randn(2, 8, H, W)
        got = torch.autograd.grad(auto(x, a.softmax(0)), [x, a], g)
        want = torch.autograd.grad(ref(x, a.softmax(0)), [x, a], g)
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="recompute must be"):
            hd.MixedOp(8, 1, recompute=bad)
        with pytest.raises(ValueError, match="recompute must be"):
            hd.patch(nn.Sequential(hd.PlainMixedOp(4, 1)), recompute=bad)


@pytest.mark.parametrize("backend", backends())
def test_recompute_second_derivatives(backend):
    """The fused op is differentiable twice (create_graph=True), with and without recomputation:
    a gradient penalty's gradients (x, alpha, every parameter) equal the plain loop's, fp64."""
    out = []
    for recompute in (None, True, False):
        ref, op = _pair(4, 1, torch.float64, backend, recompute=bool(recompute))
        op = ref if recompute is None else op
        torch.manual_seed(2)
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
        alpha = torch.randn(8, dtype=torch.float64, requires_grad=True)
        y = op(x, alpha.softmax(0))
        gx, ga = torch.autograd.grad((y * y.detach().cos()).sum(), (x, alpha), create_graph=True)
        params = [p for p in op.parameters() if p.requires_grad]
        second = torch.autograd.grad((gx ** 2).sum() + (ga ** 2).sum(), [x, alpha] + params,
                                     allow_unused=True)
        out.append([y, gx, ga] + [torch.zeros_like(p) if g is None else g
                                  for g, p in zip(second, [x, alpha] + params)])
    assert any(t.abs().max() > 0 for t in out[0][3:])
    for got in out[1:]:
        for i, (a, b) in enumerate(zip(out[0], got)):
            torch.testing.assert_close(b, a, **TOL[torch.float64], msg=lambda m, i=i: f"tensor {i}: {m}")


@pytest.mark.parametrize("backend", backends())
def test_architecture_step_recomputes_no_parameter_gradient(backend, monkeypatch):
    """``backward(inputs=alpha)`` (an architecture step): the recomputation asks autograd for the
    weights' gradient only (not the candidates' parameters', not x's when x needs none), and
    alpha's gradient equals the plain loop's."""
    ref, ours = _pair(4, 2, torch.float64, backend)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    asked = []
    grad = torch.autograd.grad

    def spy(outputs, inputs, *a, **k):
        asked.append(len(inputs))
        return grad(outputs, inputs, *a, **k)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    got = []
    for op in (ref, ours):
        alpha = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        alpha.requires_grad_()
        op(x, alpha.softmax(0)).square().sum().backward(inputs=[alpha])
        got.append(alpha.grad)
        assert all(p.grad is None for p in op.parameters())
    assert asked == [1]
    torch.testing.assert_close(got[1], got[0], **TOL[torch.float64])


def test_state_dict_layout_loads_by_name():
    ref = hd.PlainMixedOp(4, 2)
    ours = hd.MixedOp(4, 2, backend="merged")
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert "_ops.4.op.1.weight" in ref.state_dict() and "_ops.3.conv_1.weight" in ref.state_dict()
    ours.load_state_dict(ref.state_dict())
    pc = hd.MixedOp(16, 1, backend="merged", partial_k=4)
    pc.load_state_dict(hd.PlainMixedOp(16, 1, partial_k=4).state_dict())


def test_patch_swaps_in_place_and_keeps_parameters():
    class Custom(nn.Module):  # an _ops list that is not DARTS: left alone, with the reason
        def __init__(self):
            super().__init__()
            self._ops = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1)])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.edges = nn.ModuleList([hd.PlainMixedOp(4, 1), hd.PlainMixedOp(4, 2)])
            self.pc = hd.PlainMixedOp(8, 1, partial_k=4)
            self.other = Custom()

    net = Net()
    params = {id(p) for p in net.parameters()}
    buf = net.edges[0]._ops[1][1].running_mean
    report = hd.patch(net, backend="merged")
    assert isinstance(net.edges[0], hd.MixedOp) and isinstance(net.edges[1], hd.MixedOp)
    assert isinstance(net.pc, hd.MixedOp) and net.pc.partial_k == 4
    assert net.edges[1].stride == 2 and net.edges[0].primitives == hd.PRIMITIVES
    assert {id(p) for p in net.parameters()} == params  # the same objects: optimizers keep working
    assert net.edges[0]._ops[1][1].running_mean is buf
    assert set(report.swapped) == {"edges.0", "edges.1", "pc"}
    assert "other" in report.skipped and "Conv2d" in report.skipped["other"]
    assert "swapped 3" in str(report)
    assert not hd.patch(net).swapped  # idempotent


def test_patch_report_tips_the_glibc_tunables_only_where_they_apply(monkeypatch):
    """On glibc without its small-chunk caches off the report names the environment line
    (docs/darts.md, "Memory: the heap"); with both set, or on another C library, it says nothing."""
    from hdnas.darts.patch import GLIBC_MEMORY_TUNABLES, memory_tip
    assert GLIBC_MEMORY_TUNABLES in memory_tip({}, "glibc")
    assert memory_tip({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, "glibc") is not None
    assert memory_tip({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7:glibc.malloc.mxfast=0"},
                      "glibc") is not None
    both = "glibc.malloc.check=0:glibc.malloc.mxfast=0:glibc.malloc.tcache_count=0"
    assert memory_tip({"GLIBC_TUNABLES": both}, "glibc") is None
    assert memory_tip({}, "") is None  # musl, macOS, Windows: platform.libc_ver() is not glibc
    from hdnas.mixed import cpu_cache
    was = cpu_cache.disable()  # (the session runs under it: tests/conftest.py)
    try:
        net = nn.Sequential(hd.PlainMixedOp(4, 1))
        monkeypatch.setenv("GLIBC_TUNABLES", both)
        assert hd.patch(net, cpu_cache=False).tip is None
        monkeypatch.delenv("GLIBC_TUNABLES")
        report = hd.patch(nn.Sequential(hd.PlainMixedOp(4, 1)), cpu_cache=False)
        assert report.tip == memory_tip(libc=None) and not report.cpu_cache
        assert (("tip: " + report.tip) in str(report)) if report.tip else "tip:" not in str(report)
        # with hdnas' caching CPU allocator installed (the default where the library is built)
        # the heap's growth is not the concern any more: no tip
        report = hd.patch(nn.Sequential(hd.PlainMixedOp(4, 1)))
        assert report.tip is None if report.cpu_cache else report.tip == memory_tip(libc=None)
    finally:
        if was:
            cpu_cache.enable()


def test_identify_rejects_foreign_layouts():
    with pytest.raises(NotRecognised):
        identify_candidate(nn.Conv2d(4, 4, 3))
    with pytest.raises(NotRecognised, match="pool"):
        identify_candidate(nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4)))  # counts pad
    assert identify_candidate(hd.OPS["dil_conv_5x5"](4, 2, False)) == ("dil_conv_5x5", 2, 4)


def test_bad_input_clear_errors():
    op = hd.MixedOp(4, 1, backend="merged")
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(DartsBackendError, match="vector of 8"):
        op(x, torch.rand(7))
    with pytest.raises(DartsBackendError, match="vector of 8"):
        op(x, torch.rand(2, 8))
    with pytest.raises(DartsBackendError, match="expects 4 input channels, got 3"):
        op(torch.randn(1, 3, 6, 6), torch.rand(8))
    with pytest.raises(DartsBackendError, match="floating-point"):
        op(torch.ones(1, 4, 6, 6, dtype=torch.long), torch.rand(8))
    with pytest.raises(DartsBackendError, match="not divisible.*K=4"):
        hd.MixedOp(6, 1, partial_k=4)
    with pytest.raises(ValueError, match="not divisible.*K=4"):
        hd.PlainMixedOp(6, 1, partial_k=4)
    with pytest.raises(ValueError, match="unknown primitive.*conv_9x9"):
        hd.MixedOp(4, 1, primitives=["sep_conv_3x3", "conv_9x9"])
    with pytest.raises(DartsBackendError, match="unknown DARTS backend 'cuda'"):
        hd.MixedOp(4, 1, backend="cuda")
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        hd.MixedOp(4, 3)
    with pytest.raises(DartsBackendError, match="GDAS index 8"):
        op.forward_gdas(x, torch.rand(8), 8)


def test_subset_of_primitives_and_only_none():
    for prims in (["sep_conv_5x5", "skip_connect"], ["dil_conv_3x3", "avg_pool_3x3"], ["none"]):
        for stride in (1, 2):
            torch.manual_seed(0)
            ref = hd.PlainMixedOp(4, stride, prims).double()
            ours = hd.MixedOp.from_module(copy.deepcopy(ref), backend="merged")
            x, alpha = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(len(prims))
            g = _g(ref, x, alpha.softmax(0))
            a = _run(ref, x, alpha, WEIGHTINGS["softmax"], g, 1)
            b = _run(ours, x, alpha, WEIGHTINGS["softmax"], g, 1)
            _assert_same(ref, ours, TOL[torch.float64], out=(a[0], b[0]), gx=(a[1], b[1]))


@pytest.mark.parametrize("stride", [1, 2])
def test_pool_ties_route_gradients_like_the_plain_loop(stride):
    """Integer-valued input: many equal values in a 3x3 window. The max pool's gradient must go
    where nn.MaxPool2d sends it (the first maximum in row-major order), exactly."""
    torch.manual_seed(0)
    ref = hd.PlainMixedOp(4, stride, ["max_pool_3x3", "avg_pool_3x3"]).double()
    ours = hd.MixedOp.from_module(copy.deepcopy(ref), backend="merged")
    x = torch.randint(0, 3, (2, 4, 8, 8)).double()
    alpha = torch.randn(2)
    g = _g(ref, x, alpha.softmax(0))
    a = _run(ref, x, alpha, WEIGHTINGS["softmax"], g, 1)
    b = _run(ours, x, alpha, WEIGHTINGS["softmax"], g, 1)
    _assert_same(ref, ours, TOL[torch.float64], out=(a[0], b[0]), gx=(a[1], b[1]), ga=(a[2], b[2]))


def test_affine_batch_norms():
    from hdnas.darts.operations import build_candidates
    torch.manual_seed(0)
    ref = hd.PlainMixedOp(4, 2)
    ref._ops = build_candidates(4, 2, hd.PRIMITIVES, affine=True)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    ref = ref.double()
    ours = hd.MixedOp.from_module(copy.deepcopy(ref), backend="merged")
    x, alpha = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(8)
    g = _g(ref, x, alpha.softmax(0))
    a = _run(ref, x, alpha, WEIGHTINGS["softmax"], g)
    b = _run(ours, x, alpha, WEIGHTINGS["softmax"], g)
    _assert_same(ref, ours, TOL[torch.float64], out=(a[0], b[0]), gx=(a[1], b[1]), ga=(a[2], b[2]))
