"""Strict loading of official DLSR and hdnas checkpoints; the tiny checkpoint's reference scores."""
from pathlib import Path

import pytest
import torch

from hdnas.model.genotype import BETA21, PARA_LOSS, TINY18, Genotype
from hdnas.model.network import DerivedNet
from hdnas.io.official import WeightsError, load_official_checkpoint, load_weights
from hdnas.testing.shared import shared_dir

torch.set_num_threads(2)
CKPT = "pretrained/RFDN_beta21_tiny18_ps128_20210306_lr4_700.pt"




def ckpt_path() -> Path:
    p = shared_dir() / CKPT
    if not p.is_file():
        pytest.skip(f"official checkpoint not found at {p}")
    return p


def tiny_state():
    torch.manual_seed(0)
    return DerivedNet(TINY18).state_dict()


@pytest.mark.parametrize("wrap", ["model", "state_dict", "bare", "module"])
def test_accepted_formats(tmp_path, wrap):
    sd = tiny_state()
    obj = {"model": sd, "epoch": 3} if wrap == "model" else \
        {"state_dict": sd, "epoch": 1, "optimizer": {}} if wrap == "state_dict" else \
        {f"module.{k}": v for k, v in sd.items()} if wrap == "module" else sd
    torch.save(obj, tmp_path / "w.pt")
    net = load_weights(DerivedNet(TINY18), tmp_path / "w.pt")
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k])


def test_another_architecture_names_first_tensor(tmp_path):
    torch.save({"model": tiny_state()}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"'fea_conv.weight'.*\(18, 3, 3, 3\).*\(48, 3, 3, 3\)"):
        load_weights(DerivedNet(BETA21), tmp_path / "w.pt")
    x4 = Genotype(TINY18.cell_ops, TINY18.inputs, channels=18, scale=4)
    with pytest.raises(WeightsError, match=r"'upsampler.0.weight'.*\(12, 18, 3, 3\).*\(48, 18, 3, 3\)"
                                           r".*scale=2"):
        load_weights(DerivedNet(x4), tmp_path / "w.pt")
    other_ops = Genotype(PARA_LOSS.cell_ops, PARA_LOSS.inputs, channels=18)
    with pytest.raises(WeightsError, match=r"'B1.c1_r.op.1.weight'.*missing"):
        load_weights(DerivedNet(other_ops), tmp_path / "w.pt")


def test_extra_and_missing_tensors(tmp_path):
    sd = tiny_state()
    sd["extra.weight"] = torch.zeros(2)
    with pytest.raises(WeightsError, match=r"'extra.weight'.*not in the model"):
        load_weights(DerivedNet(TINY18), sd)
    sd = tiny_state()
    del sd["LR_conv.bias"]
    with pytest.raises(WeightsError, match=r"'LR_conv.bias'.*missing"):
        load_weights(DerivedNet(TINY18), sd)


def test_unreadable_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(DerivedNet(TINY18), tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="junk.pt: cannot read"):
        load_weights(DerivedNet(TINY18), tmp_path / "junk.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(WeightsError, match="no state dict"):
        load_weights(DerivedNet(TINY18), tmp_path / "meta.pt")
    good = tmp_path / "good.pt"
    torch.save({"model": tiny_state()}, good)
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:2000])
    with pytest.raises(WeightsError, match="trunc.pt: cannot read"):
        load_weights(DerivedNet(TINY18), tmp_path / "trunc.pt")


def test_official_checkpoint_loads_strictly():
    net = load_official_checkpoint(ckpt_path(), "TINY18")
    # the release's file is plain tensors and numbers: torch's safe loader reads it
    raw = torch.load(ckpt_path(), map_location="cpu", weights_only=True)["state_dict"]
    assert set(raw) == set(net.state_dict())
    assert all(torch.equal(v, raw[k]) for k, v in net.state_dict().items())
    assert sum(p.numel() for p in net.parameters()) == 56_268
    with pytest.raises(WeightsError, match="fea_conv.weight"):
        load_official_checkpoint(ckpt_path(), BETA21)


def _score(name):
    from hdnas.data.benchmark import BenchmarkSet
    from hdnas.eval.protocol import evaluate_set

    data = shared_dir() / "data" / name
    if not data.is_dir():
        pytest.skip(f"{data} not found")
    net = load_official_checkpoint(ckpt_path(), TINY18)
    return evaluate_set(BenchmarkSet(data, 2), net)


# docs/method.md §7b: (PSNR, SSIM) of the tiny checkpoint at x2
REFERENCE = {"Set5": (37.716, 0.9595), "Set14": (33.269, 0.9151)}


@pytest.mark.parametrize("name", ["Set5", pytest.param("Set14", marks=pytest.mark.slow)])
def test_tiny_checkpoint_reproduces_reference(name):
    r = _score(name)
    p_ref, s_ref = REFERENCE[name]
    print(f"tiny-18 x2 {name}: {r['psnr']:.4f}/{r['ssim']:.5f} (docs/method.md §7b: {p_ref}/{s_ref})")
    assert abs(r["psnr"] - p_ref) <= 0.005
    assert abs(r["ssim"] - s_ref) <= 0.0001 + 1e-9
