"""Search space, cell, supernet and derived network: structure, shapes, gradients."""
import pytest
import torch

from hdnas.model.genotype import BETA21, PARA_LOSS, TINY18, Genotype
from hdnas.mixed import BackendError, MixedOp
from hdnas.model.complexity import count_params
from hdnas.model.network import DerivedNet, SuperNet
from hdnas.model.space import DLSR_PRIMITIVES, OPS, SearchSpaceError, check_op_set, get_op


def test_op_structure_matches_release():
    C = 6
    sep = get_op("sep_conv_5x5").build(C).op
    kinds = [type(m).__name__ for m in sep]
    assert kinds == ["ReLU", "Conv2d", "Conv2d", "ReLU", "Conv2d", "Conv2d"]
    assert sep[1].groups == C and sep[1].kernel_size == (5, 5) and sep[2].kernel_size == (1, 1)
    dil = get_op("dil_conv_5x5").build(C).op
    assert dil[1].dilation == (2, 2) and dil[1].padding == (4, 4) and dil[1].groups == C
    conv = get_op("conv_7x7").build(C).op
    assert conv[0].padding == (3, 3) and conv[0].groups == 1
    for name in DLSR_PRIMITIVES:
        m = get_op(name).build(C)
        assert all(c.bias is None for c in m.modules() if isinstance(c, torch.nn.Conv2d))
        assert all(not getattr(c, "inplace", False) for c in m.modules())
        assert count_params(m) == get_op(name).params(C), name


def test_release_param_table_is_c50():
    # the release's penalty table: parameters in thousands at C = 50
    table = [2.5, 22.5, 62.5, 122.5, 5.9, 7.5, 9.9, 2.95, 3.75]
    assert [get_op(n).params(50) / 1000 for n in DLSR_PRIMITIVES] == pytest.approx(table)


def test_unknown_op_and_bad_op_sets():
    with pytest.raises(SearchSpaceError, match="unknown op 'conv_9x9'"):
        get_op("conv_9x9")
    with pytest.raises(SearchSpaceError, match="duplicates"):
        check_op_set(["conv_1x1", "conv_1x1"])
    with pytest.raises(SearchSpaceError, match="empty"):
        check_op_set([])
    with pytest.raises(SearchSpaceError, match="unknown op"):
        SuperNet(C=8, op_names=["conv_1x1", "max_pool"])
    assert "skip_connect" in OPS


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_shapes_all_scales(scale):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 17) * 255
    net = SuperNet(C=8, scale=scale)
    assert net(x).shape == (2, 3, 16 * scale, 17 * scale)
    g = Genotype(BETA21.cell_ops, BETA21.inputs, channels=8, scale=scale)
    assert DerivedNet(g)(x).shape == (2, 3, 16 * scale, 17 * scale)


def test_bad_scale_and_input():
    with pytest.raises(ValueError, match="scale 5 is not supported"):
        SuperNet(C=8, scale=5)
    net = SuperNet(C=8)
    with pytest.raises(ValueError, match="too small"):
        net(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="RGB"):
        net(torch.rand(1, 4, 16, 16))


def test_gradients_reach_alpha_beta_and_weights():
    torch.manual_seed(0)
    net = SuperNet(C=8, num_cells=4)
    net(torch.rand(2, 3, 16, 16) * 255).abs().mean().backward()
    assert net.alphas.grad is not None and net.alphas.grad.abs().sum() > 0
    assert len(net.betas) == 2 and [b.numel() for b in net.betas] == [2, 3]
    for b in net.betas:
        assert b.grad is not None and b.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        if name.startswith(("alphas", "betas")):
            continue
        assert p.grad is not None, name
    assert {id(p) for p in net.weight_parameters()}.isdisjoint({id(p) for p in net.arch_parameters()})


def test_alpha_per_cell():
    torch.manual_seed(0)
    net = SuperNet(C=8, num_cells=3, alpha_per_cell=True)
    assert net.alphas.shape == (3, 3, 9)
    net(torch.rand(1, 3, 16, 16)).sum().backward()
    assert (net.alphas.grad.abs().sum(dim=(1, 2)) > 0).all()  # every cell's row is used
    g = net.genotype()
    assert len(g.cell_ops) == 3
    DerivedNet(g)  # a per-cell genotype builds


def test_supernet_equals_explicit_mixed_sum():
    """The cell's remaining branch is sum_k w_k op_k(x), as in the release's MixedLayer."""
    torch.manual_seed(0)
    m = MixedOp(6, DLSR_PRIMITIVES)
    x, w = torch.randn(2, 6, 9, 9), torch.softmax(torch.randn(9), 0)
    want = sum(w[k] * op(x) for k, op in enumerate(m.ops))
    torch.testing.assert_close(m(x, w), want)
    with pytest.raises(BackendError, match="vector of 9"):
        m(x, w[:8])
    with pytest.raises(BackendError, match="expects 6 channels"):
        m(torch.randn(2, 5, 9, 9), w)


@pytest.mark.parametrize("g,params", [(BETA21, 322_620), (PARA_LOSS, 327_804), (TINY18, 56_268)])
def test_official_architectures_param_counts(g, params):
    assert count_params(DerivedNet(g)) == params
