"""python -m hdnas.upscale: image kinds, exact tiling, errors that name the file (the tiling
itself: tests/infer/test_tiling.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hdnas.infer.tiling import receptive_radius
from hdnas.io import weights as weights_io
from hdnas.io.images import read_image
from hdnas.model.genotype import TINY18, Genotype
from hdnas.model.network import DerivedNet
from hdnas.upscale import main
from hdnas.testing.shared import shared_dir

torch.set_num_threads(2)
png = pytest.importorskip("png")

G2 = Genotype([["conv_1x1", "conv_3x3", "dil_conv_3x3"]], [], channels=8, num_cells=2, name="g2")


def net(seed=0):
    """G2 with weights larger than at init, so that distant pixels matter (as for the tiling)."""
    torch.manual_seed(seed)
    m = DerivedNet(G2).eval()
    vec = torch.nn.utils.parameters_to_vector(m.parameters()).detach()
    torch.nn.utils.vector_to_parameters(vec * 1.5, m.parameters())
    return m


# --------------------------------------------------------------------------- the command
@pytest.fixture()
def setup(tmp_path):
    m = net()
    weights = weights_io.save_weights(m, G2, tmp_path / "g2.safetensors")
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    rgb = rng.integers(0, 256, (20, 23, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(src / "rgb.bmp")
    Image.fromarray(rgb[..., 0]).save(src / "grey.jpg", quality=95)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (20, 23, 1), dtype=np.uint8)], 2)
    Image.fromarray(rgba, "RGBA").save(src / "rgba.png")
    deep = rng.integers(0, 65536, (21, 22, 3), dtype=np.uint16)
    png.from_array(deep.reshape(21, -1), "RGB;16").save(str(src / "deep.png"))
    png.from_array(deep[..., 0], "L;16").save(str(src / "deepgrey.png"))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return m, weights, src, tmp_path / "out"


def _sr(m, arr):
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        return m(x)[0].permute(1, 2, 0).numpy()


def test_cli_image_kinds_and_a_broken_file(setup, capsys):
    m, weights, src, out = setup
    rc = main([str(src), "--weights", str(weights), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1  # broken.png failed; the others are written
    assert "broken.png: cannot read image" in err
    assert sorted(p.name for p in out.iterdir()) == ["deep.png", "deepgrey.png", "grey.png",
                                                     "rgb.png", "rgba.png"]
    rgb = np.asarray(Image.open(src / "rgb.bmp"), dtype=np.float32)
    got = np.asarray(Image.open(out / "rgb.png"))
    assert got.shape == (40, 46, 3) and got.dtype == np.uint8
    assert np.abs(got - np.clip(_sr(m, rgb), 0, 255)).max() <= 0.5 + 1e-3

    grey_in = np.asarray(Image.open(src / "grey.jpg"), dtype=np.float32)
    grey = Image.open(out / "grey.png")
    assert grey.mode == "L"
    ref = np.clip(_sr(m, np.repeat(grey_in[..., None], 3, 2)).mean(2), 0, 255)
    assert np.abs(np.asarray(grey, dtype=np.float32) - ref).max() <= 0.5 + 1e-3

    rgba_in = np.asarray(Image.open(src / "rgba.png"), dtype=np.float32)
    rgba = Image.open(out / "rgba.png")
    assert rgba.mode == "RGBA"
    a = F.interpolate(torch.from_numpy(rgba_in[..., 3])[None, None], scale_factor=2,
                      mode="bicubic", align_corners=False)[0, 0].clamp(0, 255).numpy()
    assert np.abs(np.asarray(rgba, dtype=np.float32)[..., 3] - a).max() <= 0.5 + 1e-3
    assert np.abs(np.asarray(rgba, dtype=np.float32)[..., :3]
                  - np.clip(_sr(m, rgba_in[..., :3]), 0, 255)).max() <= 0.5 + 1e-3

    w, h, rows, info = png.Reader(filename=str(out / "deep.png")).asDirect()
    assert (w, h, info["bitdepth"], info["planes"]) == (44, 42, 16, 3)
    deep = np.vstack([np.asarray(r) for r in rows]).reshape(42, 44, 3).astype(np.float64)
    deep_in = read_image(src / "deep.png")
    assert deep_in.bits == 16 and deep_in.rgb.max() <= 255
    ref = np.clip(_sr(m, deep_in.rgb), 0, 255) * 65535 / 255
    assert np.abs(deep - ref).max() <= 0.5 + 0.02  # 16-bit rounding, float32 net
    assert len(np.unique(deep)) > 256  # really 16-bit values, not 8-bit ones scaled up
    w, h, rows, info = png.Reader(filename=str(out / "deepgrey.png")).asDirect()
    assert (info["bitdepth"], info["planes"]) == (16, 1)


def test_cli_tiled_matches_untiled(setup, tmp_path):
    m, weights, src, out = setup
    big = (np.random.default_rng(3).random((40, 200, 3)) * 255).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "wide.png")
    R = receptive_radius(G2)
    args = [str(tmp_path / "wide.png"), "--weights", str(weights), "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--tile", str(2 * R + 11)]) == 0
    a = np.asarray(Image.open(tmp_path / "a" / "wide.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "b" / "wide.png"), dtype=int)
    assert np.abs(a - b).max() <= 1  # float differences of <= TILE_TOLERANCE can flip a rounding
    assert (a != b).mean() < 1e-3


def test_cli_setup_errors_stop_with_status_2(setup, tmp_path, capsys):
    m, weights, src, out = setup
    files = [str(src / "rgb.bmp")]
    assert main(files + ["--weights", str(weights), "--out", str(out), "--scale", "3"]) == 2
    assert "--scale 3 does not match the network" in capsys.readouterr().err
    assert main(files + ["--weights", str(weights), "--out", str(out), "--genotype", "TINY18"]) == 2
    assert "differs from the genotype stored in" in capsys.readouterr().err
    bare = weights_io.save_weights(m, None, tmp_path / "bare.safetensors")
    assert main(files + ["--weights", str(bare), "--out", str(out), "--genotype", "TINY18"]) == 2
    assert "first mismatched tensor" in capsys.readouterr().err
    assert main(files + ["--weights", str(bare), "--out", str(out)]) == 2
    assert "holds no genotype" in capsys.readouterr().err
    assert main(files + ["--weights", str(weights), "--out", str(out), "--tile", "100"]) == 2
    assert "leaves no room for --tile-overlap" in capsys.readouterr().err
    assert not out.exists()


def test_cli_missing_input_and_name_clash(setup, tmp_path, capsys):
    m, weights, src, out = setup
    Image.open(src / "rgb.bmp").save(tmp_path / "rgb.png")
    rc = main([str(src / "rgb.bmp"), str(tmp_path / "rgb.png"), str(tmp_path / "nothing.png"),
               "--weights", str(weights), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "nothing.png: no such file or folder" in err and "is already taken by" in err
    assert (out / "rgb.png").is_file()


def _official():
    shared = shared_dir()
    ckpt = shared / "pretrained" / "RFDN_beta21_tiny18_ps128_20210306_lr4_700.pt"
    imgs = sorted((shared / "data" / "Set5").rglob("*.png"))
    return ckpt, imgs


def test_named_official_network(tmp_path):
    ckpt, imgs = _official()
    if not ckpt.is_file() or not imgs:
        pytest.skip("official tiny checkpoint or Set5 not in ../shared")
    crop = np.asarray(Image.open(imgs[0]).convert("RGB"))[:48, :64]
    Image.fromarray(crop).save(tmp_path / "crop.png")
    assert main([str(tmp_path / "crop.png"), "--genotype", "TINY18", "--weights", str(ckpt),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    out = np.asarray(Image.open(tmp_path / "o" / "crop.png"), dtype=np.float64)
    up = np.asarray(Image.fromarray(crop).resize((128, 96), Image.BICUBIC), dtype=np.float64)
    assert out.shape == (96, 128, 3)
    assert np.abs(out - up).mean() < 8  # a trained x2 net stays close to bicubic on average
    assert TINY18.scale == 2
