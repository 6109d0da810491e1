"""The BN of the fused DARTS op with the native batch statistics (hdnas/darts/batchnorm.py,
csrc/cpu/bn_stats.cpp) against its twins: the statistics against ``torch.var_mean`` in fp64, the
normalisation against ``F.batch_norm`` in training mode (forward, backward, double backward, fp32
accuracy against fp64), running statistics against ``nn.BatchNorm2d``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdnas.darts.batchnorm import RunState, _StatsNorm, group_batch_norm, group_batch_norm_sum
from hdnas.mixed import native
from hdnas.mixed.primitives import batch_stats_ref

pytestmark = pytest.mark.skipif(not native.available("cpu"), reason="native kernels not built")

SHAPES = [(1, 3, 1, 2), (2, 5, 1, 1), (4, 8, 7, 5), (3, 16, 32, 32), (2, 4, 33, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stats_equal_the_twin(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1e3).to(dtype)  # mean far from 0
    mean, var = native.batch_stats(x)
    m_ref, v_ref = batch_stats_ref(x)
    assert mean.dtype == var.dtype == torch.float64 and mean.shape == (shape[1],)
    torch.testing.assert_close(mean, m_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(var, v_ref, rtol=1e-10, atol=1e-12)


def test_stats_do_not_depend_on_threads_or_layout():
    torch.manual_seed(1)
    x = torch.randn(6, 12, 9, 11)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.batch_stats(x)
        torch.set_num_threads(2)
        two = native.batch_stats(x)
        cl = native.batch_stats(x.contiguous(memory_format=torch.channels_last))
    finally:
        torch.set_num_threads(prev)
    for a, b, c in zip(one, two, cl):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_stats_decline_what_they_do_not_serve():
    assert native.batch_stats(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)) is None
    assert native.batch_stats(torch.randn(2, 3, 4)) is None
    assert native.batch_stats(torch.randn(0, 3, 4, 4)) is None


def _norm(u, w, b, use_stats):
    if use_stats:
        return _StatsNorm.apply(u, w, b, *native.batch_stats(u.detach()), 1e-5)
    return F.batch_norm(u, None, None, w, b, True, 0.0, 1e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_normalisation_equals_f_batch_norm_fp64(affine):
    torch.manual_seed(2)
    u = (torch.randn(4, 6, 5, 3, dtype=torch.float64) * 2 + 3).requires_grad_()
    w = torch.rand(6, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.rand(6, dtype=torch.float64, requires_grad=True) if affine else None
    ins = [t for t in (u, w, b) if t is not None]
    g = torch.randn(4, 6, 5, 3, dtype=torch.float64)
    outs = []
    for use in (False, True):
        y = _norm(u, w, b, use)
        outs.append([y, *torch.autograd.grad(y, ins, g)])
    for a, c in zip(*outs):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: _norm(*t, True), (u, w, b) if affine else (u, None, None))
    assert torch.autograd.gradgradcheck(lambda *t: _norm(*t, True), (u, w, b) if affine else (u, None, None))


def test_fp32_no_less_accurate_than_f_batch_norm():
    errs = {False: [], True: []}
    for seed in range(6):
        torch.manual_seed(seed)
        u64 = torch.randn(8, 16, 12, 12, dtype=torch.float64) * 3 + 50
        w64, b64 = torch.rand(16, dtype=torch.float64) + 0.5, torch.rand(16, dtype=torch.float64)
        g64 = torch.randn_like(u64)
        truth = None
        for use in (None, False, True):
            dt = torch.float64 if use is None else torch.float32
            ins = [t.to(dt).requires_grad_() for t in (u64, w64, b64)]
            y = _norm(*ins, bool(use))
            got = [y, *torch.autograd.grad(y, ins, g64.to(dt))]
            if use is None:
                truth = got
                continue
            errs[use].append(max(((a.double() - t).abs().max() / t.abs().max()).item()
                                 for a, t in zip(got, truth)))
    assert max(errs[True]) <= 2 * max(errs[False]) + 1e-7, errs


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_as_nn_batchnorm(momentum):
    torch.manual_seed(3)
    bns = [nn.BatchNorm2d(4, momentum=momentum).double() for _ in range(3)]
    ref = [nn.BatchNorm2d(4, momentum=momentum).double() for _ in range(3)]
    for a, b in zip(bns, ref):
        a.running_mean.uniform_(-1, 1), a.running_var.uniform_(0.5, 2)
        b.load_state_dict(a.state_dict())
    for _ in range(3):
        u = torch.randn(5, 12, 6, 6, dtype=torch.float64) * 2 + 1
        y = group_batch_norm(u, bns, [None] * 3, RunState(), native.batch_stats)
        want = torch.cat([m(u[:, 4 * i:4 * i + 4]) for i, m in enumerate(ref)], 1)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(bns, ref):
        for k, v in b.state_dict().items():
            torch.testing.assert_close(a.state_dict()[k], v, rtol=1e-12, atol=1e-12)


def test_one_value_per_channel_is_refused_as_nn_batchnorm():
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        group_batch_norm(torch.randn(1, 3, 1, 1), [bn], [None], RunState(), native.batch_stats)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kernel", [True, False], ids=["bn_sum", "fallback"])
def test_group_sum_as_nn_batchnorms_summed(momentum, kernel):
    """``group_batch_norm_sum``: sum_g w_g bn_g(u_g) and every module's running statistics as
    the nn.BatchNorm2d modules compute them (with the native summing pass and without it), and
    a recomputation (second run of the state) normalises alike without touching the buffers."""
    torch.manual_seed(4)
    bns = [nn.BatchNorm2d(4, affine=False, momentum=momentum).double() for _ in range(3)]
    ref = [nn.BatchNorm2d(4, affine=False, momentum=momentum).double() for _ in range(3)]
    for a, b in zip(bns, ref):
        a.running_mean.uniform_(-1, 1), a.running_var.uniform_(0.5, 2)
        b.load_state_dict(a.state_dict())
    w = torch.rand(3, dtype=torch.float64) + 0.5
    bn_sum = native.bn_sum if kernel else None
    for _ in range(2):
        u = torch.randn(5, 12, 6, 6, dtype=torch.float64) * 2 + 1
        state = RunState()
        y = group_batch_norm_sum(u, bns, w, state, native.batch_stats, bn_sum)
        want = sum(w[i] * m(u[:, 4 * i:4 * i + 4]) for i, m in enumerate(ref))
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        before = [t.clone() for b in bns for t in b.buffers()]
        state.first = False
        again = group_batch_norm_sum(u, bns, w, state, native.batch_stats, bn_sum)
        torch.testing.assert_close(again, y, rtol=0, atol=0)
        assert all(torch.equal(t, b) for t, b in zip(before, [t for m in bns for t in m.buffers()]))
    for a, b in zip(bns, ref):
        for k, v in b.state_dict().items():
            torch.testing.assert_close(a.state_dict()[k], v, rtol=1e-12, atol=1e-12)
