"""How a derived network runs for inference (hdnas.infer.run): evaluation's backends, the
fused-or-plain runner of upscaling and validation, and the x8 self-ensemble."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdnas.infer.fused import FusedInference
from hdnas.infer.run import inference_runner, pick_device, prepare_model, self_ensemble
from hdnas.model.genotype import TINY18
from hdnas.model.network import DerivedNet

torch.set_num_threads(2)


def test_self_ensemble_equivariance():
    up = lambda x: F.interpolate(x, scale_factor=2, mode="nearest")  # noqa: E731
    x = torch.rand(1, 3, 5, 7)
    torch.testing.assert_close(self_ensemble(up, x), up(x))

    class Shift(nn.Module):  # not equivariant: the ensemble must average the 8 views
        def forward(self, x):
            return up(torch.roll(x, 1, -1))
    y = self_ensemble(Shift(), x)
    # conjugating a one-pixel shift by the 8 dihedral maps gives each of the 4 directions twice
    rolls = [torch.roll(x, d, dim) for d in (1, -1) for dim in (-1, -2)]
    torch.testing.assert_close(y, up(torch.stack(rolls).mean(0)))
    assert not torch.allclose(y, Shift()(x))


def test_prepare_model_memory_format():
    net = prepare_model(DerivedNet(TINY18), "channels_last", "cpu")
    assert net.fea_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(getattr(m, "depthwise", "torch") == "torch" for m in net.modules())
    net = prepare_model(net, "native", "cpu")
    assert net.fea_conv.weight.is_contiguous() and net.B1.c2_r.depthwise == "native"
    with pytest.raises(ValueError, match="unknown backend"):
        prepare_model(net, "fast", "cpu")
    fused = prepare_model(net, "fused", "cpu")  # the fused runner around the plain network
    assert isinstance(fused, FusedInference) and fused.net is net
    assert net.fea_conv.weight.is_contiguous() and net.B1.c2_r.depthwise == "torch"
    assert isinstance(prepare_model(DerivedNet(TINY18), "auto", "cpu"), FusedInference)
    with pytest.raises(ValueError, match="needs a CPU"):
        prepare_model(net, "fused", "meta")


def test_inference_runner_leaves_the_model_as_it_is():
    net = DerivedNet(TINY18).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [getattr(m, "depthwise", None) for m in net.modules()]
    run = inference_runner(net)
    assert isinstance(run, FusedInference) and run.net is net
    assert inference_runner(net, fused=False) is net
    assert [getattr(m, "depthwise", None) for m in net.modules()] == modes
    assert all(torch.equal(v, before[k]) and v.is_contiguous() for k, v in net.state_dict().items())
    x = torch.rand(1, 3, 20, 24) * 255
    with torch.no_grad():
        assert (run(x) - net(x)).abs().max() < 1e-2  # fused on a CPU: summation order only


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
