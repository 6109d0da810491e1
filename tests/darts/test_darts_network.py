"""The whole DARTS search network (hdnas.darts.model_search), original vs patched: the same loss,
the same gradients and BN statistics, and a 5-step search that ends with the same alphas and
genotype; DARTS' derivation rule on hand-made alphas."""
from __future__ import annotations

import copy

import pytest
import torch

import hdnas.darts as hd
from hdnas.darts.model_search import Genotype, Network, make_architect, search_step

N_CLS = 5


def _nets(weighting, dtype=torch.float64, backend="fused", seed=0):
    torch.manual_seed(seed)
    ref = Network(C=8, num_classes=N_CLS, layers=3, weighting=weighting).to(dtype)
    ours = copy.deepcopy(ref)
    report = hd.patch(ours, backend=backend)
    assert len(report.swapped) == 3 * 14 and not report.skipped
    return ref, ours


def _batch(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 8, 8, generator=g, dtype=dtype),
            torch.randint(0, N_CLS, (2,), generator=g))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("weighting", ["softmax", "sigmoid", "gdas", "pcdarts"])
def test_same_loss_and_gradients(weighting, dtype):
    if dtype == torch.float32 and weighting in ("sigmoid", "gdas"):
        pytest.skip("fp32 is checked for softmax and PC-DARTS; fp64 covers every weighting")
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-5)
    ref, ours = _nets(weighting, dtype)
    x, y = _batch(dtype, 1)
    losses = []
    for m in (ref, ours):
        torch.manual_seed(7)  # the same Gumbel sample for GDAS
        loss = m._loss(x, y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], **tol)
    for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, **tol, msg=lambda m, n=n: f"{n}: {m}")
    for (n, b), c in zip(ref.named_buffers(), ours.buffers()):
        torch.testing.assert_close(c, b, **tol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("weighting,unrolled", [("softmax", False), ("pcdarts", False),
                                                ("softmax", True)])
def test_search_gives_same_alphas_and_genotype(weighting, unrolled):
    ref, ours = _nets(weighting)
    steps = 2 if unrolled else 5
    results = []
    for m in (ref, ours):
        arch = make_architect(m, unrolled=unrolled)
        opt = torch.optim.SGD(m.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
        alphas = []
        for s in range(steps):
            search_step(m, arch, opt, _batch(torch.float64, 10 + s), _batch(torch.float64, 50 + s),
                        0.025)
            alphas.append(torch.cat([a.detach().flatten() for a in m.arch_parameters()]))
        results.append((alphas[0], alphas[-1], m.genotype()))
    (f_ref, a_ref, g_ref), (f_ours, a_ours, g_ours) = results
    assert (a_ref - ref.arch_parameters()[0].new_zeros(1)).abs().max() > 0
    # the search amplifies fp64 rounding differences step by step (measured on an AVX-512 EPYC,
    # first order: 4e-19 after one step, 1e-16, 6e-15, 9e-15, 2.7e-12 after five, alphas ~4e-3;
    # the BLAS's fp64 GEMMs round differently per CPU): one step is compared tightly, the last
    # with that growth allowed. Second order: the finite-difference Hessian-vector product
    # divides by 2R = 0.02 / ||v||, which amplifies them further.
    if unrolled:
        first_tol, tol = dict(rtol=1e-8, atol=1e-11), dict(rtol=1e-6, atol=1e-9)
    else:
        first_tol, tol = dict(rtol=1e-12, atol=1e-16), dict(rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(f_ours, f_ref, **first_tol)
    torch.testing.assert_close(a_ours, a_ref, **tol)
    assert g_ours == g_ref


def test_genotype_rule():
    torch.manual_seed(0)
    net = Network(C=4, num_classes=2, layers=3)
    P = list(hd.PRIMITIVES)
    a = torch.zeros(14, 8)
    # node 0 (edges 0, 1): 'none' is strongest on edge 0 but never chosen; edge 1 wins by its max
    a[0, P.index("none")] = 9
    a[0, P.index("sep_conv_3x3")] = 2
    a[1, P.index("dil_conv_5x5")] = 3
    # node 1 (edges 2, 3, 4): edges 4 and 2 are the strongest
    a[2, P.index("max_pool_3x3")] = 2
    a[3, P.index("skip_connect")] = 1
    a[4, P.index("sep_conv_5x5")] = 4
    with torch.no_grad():
        net.alphas_normal.copy_(a)
    g = net.genotype()
    assert isinstance(g, Genotype)
    assert g.normal[:4] == [("dil_conv_5x5", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 2),
                            ("max_pool_3x3", 0)]
    assert all(op != "none" for op, _ in g.normal + g.reduce)
    assert list(g.normal_concat) == [2, 3, 4, 5] and len(g.reduce) == 8


def test_network_bad_input():
    with pytest.raises(ValueError, match="unknown weighting"):
        Network(C=4, layers=3, weighting="enas")
    with pytest.raises(ValueError, match="not divisible.*K=4"):
        Network(C=6, layers=3, weighting="pcdarts")
    with pytest.raises(ValueError, match="unknown primitive"):
        Network(C=4, layers=3, primitives=["sep_conv_3x3", "conv_9x9"])
