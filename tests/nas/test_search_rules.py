"""Losses, the complexity penalty and the three architecture update rules, also under
mixed precision."""
import contextlib

import pytest
import torch

from hdnas.nas.architect import Architect
from hdnas.nas.losses import ComplexityPenalty, SRLoss, hfen
from hdnas.model.network import SuperNet
from hdnas.model.space import DLSR_PRIMITIVES


def test_penalty_has_gradient():
    alphas = (1e-3 * torch.randn(3, 9)).requires_grad_()
    pen = ComplexityPenalty(DLSR_PRIMITIVES, 48)
    pen(alphas, 6).backward()
    g = alphas.grad
    assert g.abs().sum() > 0
    # the gradient pushes toward cheap ops: conv_7x7 up-weights the penalty most
    assert (g[:, 3] > 0).all() and (g[:, 0] < 0).all()


def test_penalty_with_budget():
    alphas = torch.zeros(3, 9, requires_grad=True)
    pen = ComplexityPenalty(DLSR_PRIMITIVES, 48, budget=1e5, fixed_cost=5e4)
    value = pen(alphas, 6)
    assert value > 0
    value.backward()
    assert alphas.grad.abs().sum() > 0
    generous = ComplexityPenalty(DLSR_PRIMITIVES, 48, budget=1e9)
    assert float(generous(alphas, 6).detach()) == 0.0


def test_sr_loss_is_l1_plus_weighted_hfen():
    """SRLoss composes L1 and HFEN (HFEN itself is checked against scipy in test_losses.py)."""
    torch.manual_seed(0)
    sr, hr = torch.rand(2, 3, 12, 12) * 255, torch.rand(2, 3, 12, 12) * 255
    assert float(hfen(hr, hr)) == 0.0
    assert float(hfen(sr, hr)) > 0
    loss = SRLoss(0.2)(sr, hr)
    assert float(loss) == pytest.approx(float((sr - hr).abs().mean() + 0.2 * hfen(sr, hr)))


def _tiny_problem(seed=0):
    torch.manual_seed(seed)
    net = SuperNet(C=4, num_cells=3, op_names=["conv_1x1", "sep_conv_3x3", "dil_conv_3x3"]).double()
    mk = lambda: (torch.rand(2, 3, 15, 15, dtype=torch.float64), torch.rand(2, 3, 30, 30, dtype=torch.float64))
    return net, mk(), mk()


def test_second_order_hypergradient_matches_finite_difference():
    net, train, val = _tiny_problem()
    arch = Architect(net, lambda a, b: ((a - b) ** 2).mean(), "darts2", hvp_r=1e-4)
    eta = 0.5
    hyper, _ = arch.unrolled_hypergradient(train, val, eta)

    weights = net.weight_parameters()

    def objective():  # L_val(w - eta dL_train/dw, alpha), evaluated exactly
        lt = ((net(train[0]) - train[1]) ** 2).mean()
        gw = torch.autograd.grad(lt, weights)
        saved = [p.detach().clone() for p in weights]
        with torch.no_grad():
            for p, g in zip(weights, gw):
                p.sub_(eta * g)
            lv = float(((net(val[0]) - val[1]) ** 2).mean())
            for p, s in zip(weights, saved):
                p.copy_(s)
        return lv

    h = 1e-5
    for idx in [(0, 0), (1, 1), (2, 2)]:
        with torch.no_grad():
            net.alphas[idx] += h
        up = objective()
        with torch.no_grad():
            net.alphas[idx] -= 2 * h
        down = objective()
        with torch.no_grad():
            net.alphas[idx] += h
        fd = (up - down) / (2 * h)
        assert hyper[0][idx].item() == pytest.approx(fd, rel=1e-3, abs=1e-9)
    # and the second-order term matters here: the first-order gradient differs
    first = torch.autograd.grad(((net(val[0]) - val[1]) ** 2).mean(), net.alphas)[0]
    assert not torch.allclose(first, hyper[0], rtol=1e-2)


@pytest.mark.parametrize("rule", ["joint", "darts1", "darts2"])
def test_rules_update_alpha_and_beta(rule):
    net, train, val = _tiny_problem(1)
    before = [p.detach().clone() for p in net.arch_parameters()]
    w_before = [p.detach().clone() for p in net.weight_parameters()]
    arch = Architect(net, SRLoss(0.2), rule, lr=1e-2)
    out = arch.step(train, val, eta=1e-3)
    assert out["loss_arch"] > 0
    for b, p in zip(before, net.arch_parameters()):
        assert not torch.equal(b, p.detach())
    for b, p in zip(w_before, net.weight_parameters()):  # an arch step leaves the weights alone
        assert torch.equal(b, p.detach())


def _amp_step(rule, dtype, scaler=None, seed=1):
    """One architecture step on a float32 problem under CPU autocast to ``dtype`` (None: none);
    returns the net, the alpha/beta gradients as one vector and the output dtypes seen."""
    net, train, val = _tiny_problem(seed)
    net.float()
    train, val = [tuple(t.float() for t in b) for b in (train, val)]
    seen = set()
    net.register_forward_hook(lambda mod, inp, y: seen.add(y.dtype))
    autocast = ((lambda: torch.autocast("cpu", dtype=dtype)) if dtype is not None
                else contextlib.nullcontext)
    arch = Architect(net, SRLoss(0.2), rule, lr=1e-2, autocast=autocast, scaler=scaler)
    arch.step(train, val, eta=1e-3)
    for p in net.arch_parameters():
        assert p.dtype == p.grad.dtype == torch.float32
    return net, torch.cat([p.grad.flatten() for p in net.arch_parameters()]), seen


@pytest.mark.parametrize("rule", ["joint", "darts1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_first_order_rules_under_autocast(rule, dtype):
    """The losses run in low precision; the fp16 step goes through a scaler whose gradients are
    unscaled before the step, so both give about the fp32 gradient."""
    _, ref, seen = _amp_step(rule, None)
    assert seen == {torch.float32}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6, enabled=dtype == torch.float16)
    _, low, seen = _amp_step(rule, dtype, scaler)
    assert seen == {dtype}
    # measured: bf16 0.7-1.7%, fp16 0.4-0.6%; unit round-off bf16 2**-8, fp16 2**-11
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.02
    assert float((low - ref).norm() / ref.norm()) < tolerance


def test_fp16_arch_step_is_skipped_when_its_scaled_gradient_overflows():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    before = [p.detach().clone() for p in _tiny_problem(1)[0].arch_parameters()]
    net, _, _ = _amp_step("joint", torch.float16, scaler)
    for b, p in zip(before, net.arch_parameters()):
        assert torch.equal(b.float(), p.detach())
    assert scaler.get_scale() == 2.0 ** 99


def test_darts2_step_is_computed_in_fp32_under_amp():
    """Its virtual step and finite differences are below low-precision resolution, so it
    ignores the autocast and scaler it is given, and a caller's autocast too."""
    torch.use_deterministic_algorithms(True)
    try:
        ref, g_ref, seen = _amp_step("darts2", None)
        assert seen == {torch.float32}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net, g, seen = _amp_step("darts2", torch.bfloat16,
                                     torch.amp.GradScaler("cpu", init_scale=2.0 ** 100))
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == {torch.float32}
    assert torch.equal(g, g_ref)
    for a, b in zip(ref.arch_parameters(), net.arch_parameters()):
        assert torch.equal(a, b)


def test_unknown_rule():
    net, _, _ = _tiny_problem()
    with pytest.raises(ValueError, match="unknown update rule"):
        Architect(net, SRLoss(), "darts3")


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_budget_fixed_part_plus_ops_is_the_evaluated_cost(kind):
    """A budget means the number the evaluation table prints: fixed part + chosen ops."""
    from hdnas.nas.budget import fixed_cost
    from hdnas.model.complexity import count_params_and_macs
    from hdnas.model.genotype import BETA21
    from hdnas.model.network import DerivedNet
    from hdnas.model.space import get_op

    fixed, pixels = fixed_cost(48, 6, 2, kind)
    ops = sum(get_op(n).params(48) for n in BETA21.cell_ops[0]) * 6
    params, macs = count_params_and_macs(DerivedNet(BETA21), 2)
    assert fixed + ops * pixels == (params if kind == "params" else macs)
