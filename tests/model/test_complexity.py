"""Params and Multi-Adds by forward hooks against docs/method.md §4 (the official archs)."""
import pytest
import torch
from torch import nn

from hdnas.model.complexity import count_params_and_macs, lr_size_for
from hdnas.model.genotype import BETA21, PARA_LOSS, TINY18, Genotype
from hdnas.model.network import DerivedNet


def at_scale(g, s):
    return Genotype(g.cell_ops, g.inputs, channels=g.channels, scale=s, name=g.name)


# docs/method.md §4: (genotype, scale) -> (params or None, Multi-Adds in G)
TABLE = [
    (BETA21, 2, 322_620, 67.31), (BETA21, 3, 329_115, 30.60), (BETA21, 4, 338_208, 17.72),
    (PARA_LOSS, 2, 327_804, 68.50), (PARA_LOSS, 4, None, 18.02),
    (TINY18, 2, 56_268, 12.07), (TINY18, 4, None, 3.35),
]


@pytest.mark.parametrize("g,scale,params,gmacs", TABLE,
                         ids=[f"{g.name}-x{s}" for g, s, _, _ in TABLE])
def test_official_archs(g, scale, params, gmacs):
    n, macs = count_params_and_macs(DerivedNet(at_scale(g, scale)))
    print(f"{g.name} x{scale}: {n:,} params, {macs / 1e9:.3f}G Multi-Adds "
          f"(docs/method.md §4: {params}, {gmacs}G)")
    if params is not None:
        assert n == params
    assert abs(macs / 1e9 - gmacs) <= 0.005 * gmacs


def test_lr_sizes():
    assert [lr_size_for(s) for s in (2, 3, 4)] == [(360, 640), (240, 427), (180, 320)]


def test_meta_count_equals_real_forward():
    """The meta-device count must equal hooks on a real CPU forward (small input)."""
    from hdnas.model.complexity import _count_macs

    net = DerivedNet(TINY18).eval()
    x = torch.zeros(1, 3, 40, 56)
    real = _count_macs(net, x)
    _, macs = count_params_and_macs(net, 2, hr_size=(80, 112))
    assert macs == real and lr_size_for(2, (80, 112)) == (40, 56)
    assert next(net.parameters()).device.type == "cpu"  # the model itself is untouched


def test_conv_formula_groups_and_no_bias():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 5, padding=2, groups=8),
                      nn.Conv2d(8, 4, 3, stride=2, padding=1))
    m.scale = 1
    n, macs = count_params_and_macs(m, hr_size=(10, 12))
    expect = 10 * 12 * 8 * 3 * 9 + 10 * 12 * 8 * 25 + 5 * 6 * 4 * 8 * 9
    assert macs == expect
    assert n == sum(p.numel() for p in m.parameters())


def test_esa_counted_at_its_resolution():
    """The ESA convs after the stride-2 conv and the pool run on small maps: count them there."""
    from hdnas.model.cell import ESA

    class Wrap(nn.Module):
        scale = 1

        def __init__(self):
            super().__init__()
            self.esa = ESA(16)

        def forward(self, x):
            return self.esa(x)

    w = Wrap()
    _, macs = count_params_and_macs(w, hr_size=(47, 47), in_channels=16)
    f = 4
    c2 = 23  # (47 - 3) // 2 + 1
    p = (c2 - 7) // 3 + 1  # 6
    expect = (47 * 47 * f * 16  # conv1
              + c2 * c2 * f * f * 9  # conv2
              + 3 * p * p * f * f * 9  # conv_max, conv3, conv3_
              + 47 * 47 * f * f  # conv_f
              + 47 * 47 * 16 * f)  # conv4
    assert macs == expect


def test_needs_scale():
    with pytest.raises(ValueError, match="scale"):
        count_params_and_macs(nn.Conv2d(3, 3, 1))
