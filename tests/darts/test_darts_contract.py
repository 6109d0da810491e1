"""``hdnas.darts.patch`` on DARTS' own search code (hdnas.testing.darts_reference: quark0/darts'
Network and Architect, CPU-runnable): the documented two lines patch the copies DARTS makes
(``new()`` for the unrolled model, ``copy.deepcopy``), and a second-order architect step equals
the unpatched one in fp64."""
import copy

import torch

import hdnas.darts
from hdnas.darts.mixed import MixedOp
from hdnas.darts.operations import PlainMixedOp
from hdnas.testing.darts_reference import Architect, Network


def _net(seed=0):
    torch.manual_seed(seed)
    return Network(4, 5, 3, torch.nn.CrossEntropyLoss(), steps=2, multiplier=2).to_double()


def _ops(model):
    mixed = [m for m in model.modules() if isinstance(m, (MixedOp, PlainMixedOp))]
    return mixed, [m for m in mixed if not isinstance(m, MixedOp)]


def _batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=g)  # noqa: E731
    y = lambda: torch.randint(0, 5, (4,), generator=g)  # noqa: E731
    return x(), y(), x(), y()


def _second_order_step(model):
    opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    arch = Architect(model)
    arch.step(*_batches(), eta=0.025, network_optimizer=opt, unrolled=True)
    return arch


def test_the_unrolled_model_of_a_second_order_step_is_patched_and_exact():
    plain, ours = _net(), _net()
    report = hdnas.darts.patch(ours)  # the documented line, after the Network is built
    assert report.wraps_new and "new() returns patched copies" in str(report)
    mixed, unpatched = _ops(ours)
    assert mixed and not unpatched
    a_plain, a_ours = _second_order_step(plain), _second_order_step(ours)
    (unrolled,) = a_ours.unrolled_models
    mixed, unpatched = _ops(unrolled)
    assert mixed and not unpatched, f"{len(unpatched)} ops of the unrolled model are not fused"
    assert not any(isinstance(m, MixedOp) for m in a_plain.unrolled_models[0].modules())
    for p, q in zip(plain.arch_parameters(), ours.arch_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)


def test_deepcopy_and_new_of_a_copy_stay_patched():
    model = _net()
    hdnas.darts.patch(model, backend="merged")
    twin = copy.deepcopy(model)
    assert not _ops(twin)[1] and _ops(twin)[0]
    fresh = twin.new()
    assert not _ops(fresh)[1] and _ops(fresh)[0]
    assert all(m.backend == "merged" for m in _ops(fresh)[0])
    # the copy's new() is bound to the copy, not to the original
    assert twin.new.__self__ is twin
    # copies=False leaves new() alone
    other = _net()
    assert not hdnas.darts.patch(other, copies=False).wraps_new
    assert _ops(other.new())[1]


def test_hdnas_network_honours_the_darts_model_contract():
    """hdnas.darts.model_search.Network runs under DARTS' own Architect (second order)."""
    from hdnas.darts.model_search import Network as HdNetwork

    torch.manual_seed(0)
    net = HdNetwork(C=4, num_classes=5, layers=3, steps=2, multiplier=2).double()
    arch = {id(p) for p in net.arch_parameters()}
    assert arch and not arch & {id(p) for p in net.parameters()}  # weights only
    assert {id(p) for p in net.all_parameters()} >= arch
    assert set(net.state_dict()) >= {"alphas_normal", "alphas_reduce"}
    fresh = net.new()
    assert type(fresh) is HdNetwork and fresh is not net
    for a, b in zip(fresh.arch_parameters(), net.arch_parameters()):
        assert a.dtype == torch.float64 and torch.equal(a, b) and a is not b
    hdnas.darts.patch(net)
    before = [a.detach().clone() for a in net.arch_parameters()]
    a_ours = _second_order_step(net)
    assert not _ops(a_ours.unrolled_models[0])[1]
    assert any((a - b).abs().max() > 0 for a, b in zip(net.arch_parameters(), before))
