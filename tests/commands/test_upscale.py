"""python -m hdnas.upscale: image kinds, exact tiling, errors that name the file."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hdnas.io import weights as weights_io
from hdnas.model.cell import ESA
from hdnas.model.genotype import TINY18, Genotype
from hdnas.model.network import DerivedNet
from hdnas.upscale import (ALIGN, ESA_RADIUS, MIN_LR, TILE_TOLERANCE, Frame, FramedESA, TileError,
                           main, read_image, receptive_radius, tile_spans, upscale_tensor)

torch.set_num_threads(2)
png = pytest.importorskip("png")

G2 = Genotype([["conv_1x1", "conv_3x3", "dil_conv_3x3"]], [], channels=8, num_cells=2, name="g2")
G3 = Genotype([["sep_conv_3x3", "conv_1x1", "dil_conv_5x5"]], [[1, 0]], channels=8, num_cells=3)


def net(g=G2, seed=0):
    torch.manual_seed(seed)
    m = DerivedNet(g).eval()
    with torch.no_grad():  # larger than init weights, so that distant pixels matter
        for p in m.parameters():
            p.mul_(1.5)
    return m


def test_receptive_radius_counts_the_longest_path():
    # head 1; cell: ops (0 + 1 + 2) + c4 1 + ESA 41 = 45; 2 cells; LR_conv 1, upsampler 1
    assert receptive_radius(G2) == 1 + 2 * 45 + 2
    # cell 3 reads cells 2 and 1: ops 2 + 0 + 4, so 48 per cell, three in a row
    assert receptive_radius(G3) == 1 + 3 * 48 + 2


def test_esa_radius_bounds_the_index_arithmetic():
    """For every LR size, the rows ESA's attention at row g reads (framed bilinear source rows,
    three 3x3 convs on the pooled map, max-pool 7/3, conv 3/2) lie within ESA_RADIUS of g."""
    worst = 0
    for H in range(MIN_LR, 3000):
        P = ((H - 3) // 2 + 1 - 7) // 3 + 1
        g = np.arange(H, dtype=np.float32)
        src = np.maximum(np.float32(P) / np.float32(H) * (g + np.float32(0.5)) - np.float32(0.5), 0)
        i0 = np.floor(src).astype(int)
        i1 = np.where(i0 < P - 1, i0 + 1, i0)
        lo = 6 * np.maximum(i0 - 3, 0)
        hi = np.minimum(6 * np.minimum(i1 + 3, P - 1) + 14, H - 1)
        worst = max(worst, int((g - lo).max()), int((hi - g).max()))
    assert 38 <= worst <= ESA_RADIUS


def test_framed_esa_with_the_whole_frame_is_esa():
    torch.manual_seed(1)
    esa = ESA(8)
    x = torch.randn(2, 8, 37, 50)
    with torch.no_grad():
        ref = esa(x)
        got = FramedESA(esa, Frame(0, 0, 37, 50))(x)
    assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize("n,tile,overlap", [(263, 240, 93), (100, 40, 8), (500, 64, 0), (37, 20, 0),
                                            (30, 100, 5)])
def test_tile_spans_cover_with_context(n, tile, overlap):
    spans = tile_spans(n, tile, overlap)
    assert spans[0][2] == 0 and spans[-1][3] == n
    for (s, e, c0, c1), nxt in zip(spans, spans[1:] + [None]):
        assert s % ALIGN == 0 and s <= c0 < c1 <= e <= n
        assert e - s <= tile or len(spans) == 1
        assert e - s >= min(n, MIN_LR)
        assert c0 - s >= min(overlap, c0) and e - c1 >= min(overlap, n - c1)
        if nxt is not None:
            assert nxt[2] == c1


def test_tile_too_small_for_its_overlap():
    with pytest.raises(TileError, match=r"--tile 100 leaves no room for --tile-overlap 93.*197"):
        tile_spans(300, 100, 93)
    with pytest.raises(TileError, match="smaller than the network's smallest input"):
        tile_spans(300, 19, 0)


@pytest.mark.parametrize("shape", [(40, 400), (400, 40)], ids=["wide", "tall"])
def test_tiled_equals_untiled_with_the_receptive_overlap(shape):
    """Tiles along one axis at a time (a tile must be > 2 R wide, so 2-D tiling of an image
    that shows it is slow); the spans are the same function on both axes."""
    m = net()
    R = receptive_radius(G2)
    torch.manual_seed(2)
    x = torch.rand(1, 3, *shape) * 255
    with torch.no_grad():
        ref = m(x)
    tile = 2 * R + 11 + 48
    tiled = upscale_tensor(m, x, tile=tile)  # the overlap defaults to R
    assert len(tile_spans(max(shape), tile, R)) >= 5
    assert (tiled - ref).abs().max() <= TILE_TOLERANCE
    # the check can fail: a small overlap changes the result by much more than the tolerance
    loose = upscale_tensor(m, x, tile=64, overlap=4)
    assert (loose - ref).abs().max() > 20 * TILE_TOLERANCE


def test_too_small_image_is_refused():
    with pytest.raises(ValueError, match="too small"):
        upscale_tensor(net(), torch.rand(1, 3, 14, 40) * 255)


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
    env = os.environ.get("HDNAS_SHARED")
    shared = Path(env) if env else Path(__file__).resolve().parents[3] / "shared"
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
