"""hdnas.infer.fused.FusedInference against its plain twin, the DerivedNet's own forward.

Every op kind (dense, double separable, dilated, skip), every scale, random genotypes and
weights, odd sizes, batch > 1. The reference is the plain network in fp64; the fused fp32 result
must be within 4x the plain fp32 network's own error (plus a floor of a few fp32 ulps of the
output's magnitude), a bound that a wrong activation, a dropped bias or a misplaced residual
breaks by orders of magnitude (test_bound_catches_a_wrong_epilogue).
"""
from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from hdnas.infer import fused as inference
from hdnas.model.genotype import BETA21, Genotype
from hdnas.model.network import DerivedNet
from hdnas.model.space import DLSR_PRIMITIVES

pytestmark = pytest.mark.skipif(not inference.available(), reason="no oneDNN in this torch build")


def _random_genotype(rng: random.Random, scale: int, C: int, num_cells: int = 4) -> Genotype:
    ops = [[rng.choice(DLSR_PRIMITIVES) for _ in range(3)] for _ in range(num_cells)]
    inputs = [rng.sample(range(c - 1), 2) for c in range(3, num_cells + 1)]
    return Genotype(ops, inputs, channels=C, scale=scale, num_cells=num_cells)


def _randomise(net: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # weights of both signs, biases away from 0
            p.copy_(torch.randn(p.shape, generator=g) * (0.7 / max(1, p[0].numel()) ** 0.5))
    return net.eval()


def _check(net: DerivedNet, x: torch.Tensor):
    net = net.set_depthwise("torch")
    fused = inference.FusedInference(net)
    with torch.no_grad():
        assert fused.serves(x)
        got = fused(x)
        plain = net(x)
        exact = copy.deepcopy(net).double()(x.double())
    assert got.shape == exact.shape and got.dtype == torch.float32 and got.is_contiguous()
    err, own = (got.double() - exact).abs().max(), (plain.double() - exact).abs().max()
    floor = 8 * torch.finfo(torch.float32).eps * exact.abs().max()
    assert err <= 4 * own + floor, (float(err), float(own), float(floor))
    return err, own


@pytest.mark.parametrize("seed", range(6))
def test_random_genotypes_match_the_plain_network(seed):
    rng = random.Random(seed)
    scale = [2, 3, 4][seed % 3]
    net = _randomise(DerivedNet(_random_genotype(rng, scale, C=rng.choice([8, 12, 16]))), seed)
    h, w = rng.randint(15, 29), rng.randint(15, 29)
    _check(net, torch.rand(rng.randint(1, 2), 3, h, w) * 255)


def test_every_op_kind_and_skip():
    names = list(DLSR_PRIMITIVES)
    rows = [names[i:i + 3] for i in range(0, len(names) - len(names) % 3, 3)]
    rows.append(["skip_connect", names[0], names[-1]])
    g = Genotype(rows, [[c - 3, c - 2] for c in range(3, len(rows) + 1)], channels=8,
                 num_cells=len(rows))
    _check(_randomise(DerivedNet(g), 7), torch.rand(1, 3, 17, 23) * 255)


def test_released_architecture():
    _check(_randomise(DerivedNet(BETA21), 3), torch.rand(1, 3, 40, 36) * 255)


def test_bound_catches_a_wrong_epilogue(monkeypatch):
    """The tolerance is tight enough: a LeakyReLU slope off by 0.01 in the fused path fails."""
    net = _randomise(DerivedNet(BETA21), 4)
    monkeypatch.setattr(inference, "LRELU_SLOPE", 0.06)
    with pytest.raises(AssertionError):
        _check(net, torch.rand(1, 3, 20, 20) * 255)


def test_weights_changed_in_place_are_re_read():
    net = _randomise(DerivedNet(BETA21), 5)
    fused = inference.FusedInference(net)
    x = torch.rand(1, 3, 16, 16) * 255
    with torch.no_grad():
        before = fused(x)
        net.B2.c5.weight.mul_(2)  # a new version of the same storage
        after, plain = fused(x), net(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, plain, rtol=1e-4, atol=1e-3)
    net.load_state_dict(_randomise(DerivedNet(BETA21), 6).state_dict())
    with torch.no_grad():
        assert torch.allclose(fused(x), net(x), rtol=1e-4, atol=1e-3)


def test_falls_back_to_the_plain_network_where_it_cannot_serve():
    net = _randomise(DerivedNet(BETA21), 8)
    fused = inference.FusedInference(net)
    x = torch.rand(1, 3, 16, 16)
    assert not fused.serves(x)  # autograd on and the parameters require grad
    y = fused(x)
    y.sum().backward()  # the plain network ran: gradients exist
    assert net.fea_conv.weight.grad is not None
    with torch.no_grad():
        assert fused.serves(x)
        assert not fused.serves(x.double()) and not fused.serves(x.to("meta"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused.serves(x)
    net.double()
    with torch.no_grad():  # float64 weights: the plain network, in float64
        assert fused(x.double()).dtype == torch.float64
    net.float()
    with pytest.raises(ValueError, match="too small"):
        with torch.no_grad():
            fused(torch.rand(1, 3, 8, 8))
    torch.backends.mkldnn.enabled = False
    try:
        with torch.no_grad():
            assert not fused.serves(x)  # the user switched oneDNN off
    finally:
        torch.backends.mkldnn.enabled = True
    with pytest.raises(TypeError, match="DerivedNet"):
        inference.FusedInference(nn.Conv2d(3, 3, 1))


def test_unknown_modules_run_as_modules():
    """A replaced ESA (as hdnas.upscale does for tiles) or an op it does not know is called as a
    module, so the result is still the network's."""
    net = _randomise(DerivedNet(BETA21), 9)

    class Scaled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0.5

    net.B1.esa = Scaled(net.B1.esa)
    net.B2.c1_r = Scaled(net.B2.c1_r)
    _check(net, torch.rand(1, 3, 18, 18) * 255)
