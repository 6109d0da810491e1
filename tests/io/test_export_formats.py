"""Export (hdnas.io.export): safetensors weights (read first, no trust flag), ONNX checked with ONNX
Runtime, torch.export."""

import numpy as np
import pytest
import torch
from PIL import Image

from hdnas.io import checkpoint
from hdnas.io import weights as weights_io
from hdnas.io.export import (CHECK_TOLERANCE, PT2_MIN_LR, ExportError, check_onnx, export_onnx,
                             export_pt2)
from hdnas.io.official import WeightsError, load_weights, read_state_dict
from hdnas.model.genotype import Genotype
from hdnas.model.network import DerivedNet
from hdnas.testing.shared import shared_dir

torch.set_num_threads(2)

G = Genotype([["sep_conv_3x3", "conv_3x3", "dil_conv_3x3"]], [], channels=8, num_cells=2,
             name="tiny")


def net(seed=0):
    torch.manual_seed(seed)
    return DerivedNet(G).eval()


def test_safetensors_round_trip_with_genotype(tmp_path):
    m = net()
    path = weights_io.save_weights(m, G, tmp_path / "w.safetensors")
    sd, g = weights_io.read_weights(path)
    assert g == G and g.to_dict() == G.to_dict()
    assert set(sd) == set(m.state_dict())
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    loaded = load_weights(DerivedNet(G), path)  # no trust flag needed
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in m.state_dict().items())
    ck = checkpoint.load(path)
    assert Genotype.from_dict(ck["genotype"]) == G and set(ck["model"]) == set(sd)


def test_safetensors_detected_by_content_whatever_the_name(tmp_path):
    m = net()
    path = weights_io.save_weights(m, None, tmp_path / "w.safetensors")
    disguised = tmp_path / "weights.pt"
    disguised.write_bytes(path.read_bytes())
    assert weights_io.is_safetensors(disguised)
    assert weights_io.read_genotype(disguised) is None
    sd = read_state_dict(disguised)
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    torch.save({"model": m.state_dict()}, tmp_path / "torch.pt")
    assert not weights_io.is_safetensors(tmp_path / "torch.pt")


def test_broken_safetensors_is_a_clear_error(tmp_path):
    path = weights_io.save_weights(net(), G, tmp_path / "w.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="cut.safetensors: cannot read safetensors file"):
        read_state_dict(cut)
    wrong = DerivedNet(Genotype([["conv_5x5"] * 3], [], channels=8, num_cells=2))
    with pytest.raises(WeightsError, match=r"w.safetensors does not fit the model.*B1.c1_r"):
        load_weights(wrong, path)


def _real_inputs():
    shared = shared_dir()
    imgs = sorted((shared / "data" / "Set5").rglob("*.png"))[:2]
    out = []
    for p in imgs:
        a = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)[:45, :61]
        out.append(torch.from_numpy(a.copy()).permute(2, 0, 1)[None])
    return out


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    return export_onnx(net(), tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def test_onnx_matches_pytorch_on_random_batches(onnx_file):
    import onnx

    model = onnx.load(str(onnx_file))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2] == "height" and dims[3] == "width"
    g = torch.Generator().manual_seed(5)
    inputs = [torch.rand(b, 3, h, w, generator=g) * 255 for b, h, w in
              [(1, 15, 15), (3, 33, 20), (2, 64, 71)]]
    worst = check_onnx(net(), onnx_file, inputs)
    assert worst <= CHECK_TOLERANCE


def test_onnx_matches_pytorch_on_real_images(onnx_file):
    inputs = _real_inputs()
    if not inputs:
        pytest.skip("no Set5 images in ../shared/data")
    assert check_onnx(net(), onnx_file, inputs) <= CHECK_TOLERANCE


def test_onnx_check_can_fail(onnx_file):
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_onnx(net(seed=1), onnx_file, [torch.rand(1, 3, 20, 20) * 255])


def test_torch_export_program(tmp_path):
    path = export_pt2(net(), tmp_path / "tiny.pt2")
    program = torch.export.load(str(path)).module()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for b, h, w in [(1, PT2_MIN_LR, 30), (3, 40, 26)]:
            x = torch.rand(b, 3, h, w, generator=g) * 255
            assert (program(x) - net()(x)).abs().max() <= CHECK_TOLERANCE
