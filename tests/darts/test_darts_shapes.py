"""The fused DARTS MixedOp equals DARTS' plain loop on every shape the plain loop accepts:
degenerate (1x1, 1xW) and odd sizes, stride 1 and 2, each candidate alone and all together.
fp64: outputs, input/alpha/parameter gradients and BN statistics to 1e-10. fp32: no less
accurate against fp64 than the plain loop itself (up to a small factor and a floor). With and
without recomputation (``recompute="auto"``, the default, picks either by the plane size)."""
import copy
import statistics

import pytest
import torch

import hdnas.darts as hd
from hdnas.darts.operations import PRIMITIVES, PlainMixedOp

SIZES = [(1, 1), (1, 3), (2, 2), (3, 3), (5, 4), (7, 7)]
SETS = [(p,) for p in PRIMITIVES] + [PRIMITIVES]
BACKENDS = ["merged", "fused"]


def _run(op, x, w, g):
    """Output, dx, dw and every parameter gradient and BN buffer after one training pass."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = op(x, w)
    inputs = [x, w, *[p for p in op.parameters() if p.requires_grad]]
    grads = torch.autograd.grad(y, inputs, g, allow_unused=True)
    bufs = [b.clone() for b in op.buffers()]
    return [y.detach(), *[torch.zeros_like(i) if gr is None else gr for gr, i in zip(grads, inputs)],
            *bufs]


def _case(prims, stride, H, W, dtype, seed):
    torch.manual_seed(seed)
    ref = PlainMixedOp(8, stride, prims).to(dtype)
    for m in ref.modules():  # non-trivial BN affine parameters and statistics
        if isinstance(m, torch.nn.BatchNorm2d) and m.affine:
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    x = torch.randn(4, 8, H, W, dtype=dtype)
    w = torch.softmax(torch.randn(len(prims), dtype=dtype), 0)
    return ref, x, w


def _plain_accepts(ref, x, w):
    try:
        with torch.no_grad():
            copy.deepcopy(ref)(x, w)
        return True
    except RuntimeError:
        return False


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_fp64_equals_the_plain_loop_on_every_shape(backend, stride, recompute):
    checked = 0
    for prims in SETS:
        for i, (H, W) in enumerate(SIZES):
            ref, x, w = _case(prims, stride, H, W, torch.float64, seed=31 * i + stride)
            if not _plain_accepts(ref, x, w):
                with pytest.raises(RuntimeError):  # where DARTS' loop fails, so does ours
                    hd.MixedOp.from_module(copy.deepcopy(ref), backend, recompute)(x, w)
                continue
            ours = hd.MixedOp.from_module(copy.deepcopy(ref), backend, recompute)
            g = torch.randn_like(copy.deepcopy(ref)(x, w))
            want = _run(copy.deepcopy(ref), x, w, g)
            got = _run(ours, x, w, g)
            for k, (a, b) in enumerate(zip(got, want)):
                assert a.shape == b.shape, (prims, H, W, k)
                assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), \
                    (prims, (H, W), stride, k, (a - b).abs().max().item())
            checked += 1
    assert checked >= len(SETS) * (len(SIZES) - 3)  # most shapes are valid for the plain loop


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
@pytest.mark.parametrize("stride", [1, 2])
def test_fp32_no_less_accurate_than_the_plain_loop(stride, recompute):
    worst = []
    for prims in [("max_pool_3x3",), ("avg_pool_3x3",), ("sep_conv_3x3",), PRIMITIVES]:
        for i, (H, W) in enumerate([(1, 1), (6, 6), (16, 16)]):
            ref64, x64, w64 = _case(prims, stride, H, W, torch.float64, seed=7 * i + stride)
            x64 = 3 * x64 + 5  # a mean far from 0: what makes sloppy BN statistics show
            if not _plain_accepts(ref64, x64, w64):
                continue
            g64 = torch.randn_like(copy.deepcopy(ref64)(x64, w64))
            truth = _run(copy.deepcopy(ref64), x64, w64, g64)
            ref32 = copy.deepcopy(ref64).float()
            x, w, g = x64.float(), w64.float(), g64.float()
            plain = _run(copy.deepcopy(ref32), x, w, g)
            fused = _run(hd.MixedOp.from_module(copy.deepcopy(ref32), "fused", recompute), x, w, g)
            for k, (f, p, t) in enumerate(zip(fused, plain, truth)):
                ef, ep = _rel(f.double(), t), _rel(p.double(), t)
                worst.append(ef / max(ep, 1e-7))
                # a floor of ~8 fp32 ulps: one scalar's error (a mixing-weight gradient) is
                # round-off noise on both sides, and the plain loop's is at times luckily small
                assert ef <= 4 * ep + 1e-6, (prims, (H, W), k, ef, ep)
    assert worst  # the comparison ran
    assert statistics.median(worst) <= 2.0, sorted(worst)


@pytest.mark.parametrize("prims", [
    PRIMITIVES,  # sep before dil: the dil groups on the even-pixel image
    ("dil_conv_3x3", "sep_conv_3x3", "skip_connect", "dil_conv_5x5", "sep_conv_5x5"),  # interleaved
    ("dil_conv_5x5", "skip_connect")])
@pytest.mark.parametrize("H,W", [(8, 8), (6, 10), (9, 6), (4, 5)])
def test_fp64_stride2_routes_equal_the_plain_loop(prims, H, W):
    """The stride-2 routes of the native fused path (even-pixel dil stage, interleaved candidate
    orders, FactorizedReduce as one GEMM over the pixel phases where H and W are even, the convs
    otherwise) on larger even and odd sizes, recomputed: fp64 to 1e-10, or DARTS' own error."""
    ref, x, w = _case(prims, 2, H, W, torch.float64, seed=H * 11 + W)
    ours = hd.MixedOp.from_module(copy.deepcopy(ref), backend="fused", recompute=True)
    if not _plain_accepts(ref, x, w):
        with pytest.raises(RuntimeError):
            ours(x, w)
        return
    g = torch.randn_like(copy.deepcopy(ref)(x, w))
    for k, (a, b) in enumerate(zip(_run(ours, x, w, g), _run(copy.deepcopy(ref), x, w, g))):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-10), \
            (k, (a - b).abs().max().item())
