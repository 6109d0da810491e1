"""Benchmark folder layouts, modcrop, LR making, and clear errors for bad images and folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from hdnas.data.benchmark import BenchmarkError, BenchmarkSet, find_pairs, modcrop
from hdnas.io.images import ImageError, load_rgb, save_rgb
from hdnas.data.imresize import imresize_uint8
from hdnas.testing.shared import shared_dir




def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return path


# ------------------------------------------------------------------ io
def test_load_rgb_formats(tmp_path):
    a = rgb(20, 30)
    write(tmp_path / "a.png", a)
    got = load_rgb(tmp_path / "a.png")
    assert got.dtype == np.uint8 and got.shape == (20, 30, 3) and np.array_equal(got, a)
    t = load_rgb(tmp_path / "a.png", as_tensor=True)
    assert t.shape == (3, 20, 30) and t.dtype == torch.uint8 and torch.equal(t.permute(1, 2, 0),
                                                                             torch.from_numpy(a))
    got.fill(0)  # writable, independent copy


def test_gray_choices(tmp_path):
    g = np.arange(600, dtype=np.uint8).reshape(20, 30)
    write(tmp_path / "g.png", g)
    rep = load_rgb(tmp_path / "g.png")
    assert rep.shape == (20, 30, 3) and all(np.array_equal(rep[..., c], g) for c in range(3))
    assert load_rgb(tmp_path / "g.png", gray="keep").shape == (20, 30, 1)
    with pytest.raises(ImageError, match=r"g.png: grey image"):
        load_rgb(tmp_path / "g.png", gray="error")


def test_alpha_and_palette(tmp_path):
    a = rgb(8, 9)
    opaque = np.dstack([a, np.full((8, 9), 255, np.uint8)])
    write(tmp_path / "opaque.png", opaque, "RGBA")
    assert np.array_equal(load_rgb(tmp_path / "opaque.png"), a)
    holes = opaque.copy()
    holes[0, 0, 3] = 10
    write(tmp_path / "holes.png", holes, "RGBA")
    with pytest.raises(ImageError, match=r"holes.png: image has transparency"):
        load_rgb(tmp_path / "holes.png")
    Image.fromarray(a).convert("P").save(tmp_path / "pal.png")
    assert load_rgb(tmp_path / "pal.png").shape == (8, 9, 3)


def test_bad_files(tmp_path):
    with pytest.raises(ImageError, match="no such image"):
        load_rgb(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageError, match=r"junk.png: cannot read image"):
        load_rgb(tmp_path / "junk.png")
    write(tmp_path / "full.png", rgb(64, 64))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"trunc.png: cannot read image"):
        load_rgb(tmp_path / "trunc.png")
    Image.fromarray(np.zeros((5, 5), np.uint16) + 4000).save(tmp_path / "deep.png")
    with pytest.raises(ImageError, match=r"deep.png: unsupported image mode"):
        load_rgb(tmp_path / "deep.png")


def test_save_rgb_rounds_and_clamps(tmp_path):
    x = torch.tensor([[[-3.0, 0.5], [254.6, 300.0]]]).expand(3, 2, 2)
    save_rgb(tmp_path / "o.png", x)
    assert load_rgb(tmp_path / "o.png")[..., 0].tolist() == [[0, 1], [255, 255]]


# ------------------------------------------------------------------ layouts
def test_modcrop():
    assert modcrop(torch.zeros(3, 101, 77), 4).shape == (3, 100, 76)


def test_srf_layout_and_fallback_to_our_resize(tmp_path):
    hr = rgb(48, 36)
    write(tmp_path / "a_SRF_2_HR.png", hr)
    lr = imresize_uint8(torch.from_numpy(hr).permute(2, 0, 1), 0.5)
    write(tmp_path / "a_SRF_2_LR.png", lr.permute(1, 2, 0).numpy())
    layout, pairs = find_pairs(tmp_path, 2)
    assert layout == "srf" and [(p.name, p.lr_path is not None) for p in pairs] == [("a", True)]
    b3 = BenchmarkSet(tmp_path, 3, min_lr_size=5)
    item = b3[0]
    assert item["lr_made"] and item["hr"].shape == (3, 48, 36) and item["lr"].shape == (3, 16, 12)
    b4 = BenchmarkSet(tmp_path, 4, min_lr_size=5)
    assert torch.equal(b4[0]["lr"], imresize_uint8(b4[0]["hr"], 0.25))


def test_edsr_layout(tmp_path):
    hr = rgb(61, 50)  # modcrop to 60x50 at x2
    write(tmp_path / "HR" / "baby.png", hr)
    lr = imresize_uint8(torch.from_numpy(hr[:60, :50]).permute(2, 0, 1), 0.5)
    write(tmp_path / "LR_bicubic" / "X2" / "babyx2.png", lr.permute(1, 2, 0).numpy())
    b = BenchmarkSet(tmp_path, 2)
    assert b.layout == "edsr" and len(b) == 1
    item = b[0]
    assert not item["lr_made"] and item["hr"].shape == (3, 60, 50) and torch.equal(item["lr"], lr)
    assert BenchmarkSet(tmp_path, 3)[0]["lr_made"]  # no X3 folder: made by our resize


def test_div2k_layouts(tmp_path):
    hr = rgb(40, 40)
    write(tmp_path / "DIV2K_valid_HR" / "0801.png", hr)
    lr = imresize_uint8(torch.from_numpy(hr).permute(2, 0, 1), 0.5)
    write(tmp_path / "DIV2K_valid_LR_bicubic" / "X2" / "0801x2.png", lr.permute(1, 2, 0).numpy())
    for folder in (tmp_path, tmp_path / "DIV2K_valid_HR"):
        layout, pairs = find_pairs(folder, 2)
        assert layout == "div2k" and pairs[0].lr_path.name == "0801x2.png"
    write(tmp_path / "DIV2K_train_HR" / "0001.png", hr)
    with pytest.raises(BenchmarkError, match="several HR folders"):
        find_pairs(tmp_path, 2)


def test_hr_only_folder(tmp_path):
    write(tmp_path / "x.png", rgb(49, 64))
    b = BenchmarkSet(tmp_path, 3)
    assert b.layout == "hr-only"
    assert b[0]["hr"].shape == (3, 48, 63) and b[0]["lr"].shape == (3, 16, 21) and b[0]["lr_made"]


def test_folder_errors(tmp_path):
    with pytest.raises(BenchmarkError, match="does not exist"):
        BenchmarkSet(tmp_path / "nope", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkError, match="contains no images"):
        BenchmarkSet(tmp_path / "empty", 2)
    (tmp_path / "emptyhr" / "HR").mkdir(parents=True)
    with pytest.raises(BenchmarkError, match="HR folder .* contains no images"):
        BenchmarkSet(tmp_path / "emptyhr", 2)


def test_size_disagreement_and_too_small(tmp_path):
    write(tmp_path / "p" / "a_SRF_2_HR.png", rgb(40, 40))
    write(tmp_path / "p" / "a_SRF_2_LR.png", rgb(21, 20))
    with pytest.raises(BenchmarkError, match=r"HR/LR sizes disagree at x2: a_SRF_2_HR.png is 40x40.*"
                                             r"LR should be 20x20.*a_SRF_2_LR.png is 20x21"):
        BenchmarkSet(tmp_path / "p", 2)[0]
    write(tmp_path / "s" / "tiny.png", rgb(40, 100))
    with pytest.raises(BenchmarkError, match=r"tiny.png: HR 100x40 is smaller than scale x patch"):
        BenchmarkSet(tmp_path / "s", 3)[0]
    write(tmp_path / "m" / "HR" / "a.png", rgb(40, 40))
    (tmp_path / "m" / "LR_bicubic" / "X2").mkdir(parents=True)
    with pytest.raises(BenchmarkError, match="has no LR image for a.png"):
        BenchmarkSet(tmp_path / "m", 2)
    write(tmp_path / "c" / "HR" / "a.png", rgb(40, 40))
    (tmp_path / "c" / "LR_bicubic" / "X2").mkdir(parents=True)
    (tmp_path / "c" / "LR_bicubic" / "X2" / "ax2.png").write_bytes(b"broken")
    with pytest.raises(ImageError, match=r"ax2.png: cannot read image"):
        BenchmarkSet(tmp_path / "c", 2)[0]


def test_shared_sets():
    root = shared_dir() / "data"
    if not (root / "Set14").is_dir():
        pytest.skip(f"{root} not found")
    b = BenchmarkSet(root / "Set14", 2)
    assert b.layout == "srf" and len(b) == 14
    assert all(not it["lr_made"] for it in b)
    assert len(BenchmarkSet(root / "Set5", 2)) == 5
