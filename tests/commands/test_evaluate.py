"""The evaluation CLI end to end on a tiny synthetic set, self-ensemble, and error paths."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hdnas.evaluate import main
from hdnas.model.genotype import TINY18
from hdnas.model.network import DerivedNet
from hdnas.testing.shared import shared_dir

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[2]




@pytest.fixture
def tiny_set(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "Tiny"
    d.mkdir()
    for i in range(2):
        img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = np.kron(img, np.ones((8, 8, 1), np.uint8))  # smooth-ish 64x64
        Image.fromarray(img).save(d / f"im{i}.png")
    Image.fromarray(np.kron(rng.integers(0, 256, (8, 6), dtype=np.uint8),
                            np.ones((8, 8), np.uint8))).save(d / "grey.png")
    return d


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    p = tmp_path / "tiny.pt"
    torch.save({"model": DerivedNet(TINY18).state_dict(), "epoch": 1}, p)
    return p


def test_help_runs():
    r = subprocess.run([sys.executable, "-m", "hdnas.evaluate", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--bicubic" in r.stdout and "--self-ensemble" in r.stdout


def test_model_run_writes_tables_images_and_comparison(tmp_path, tiny_set, tiny_weights, capsys):
    out = tmp_path / "out"
    rc = main(["--genotype", "TINY18", "--weights", str(tiny_weights), "--data", str(tiny_set),
               "--out", str(out), "--save-images", "--compare", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| tiny18 | x2 | 56,268 | 12.07G |" in printed
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 1 and rows[0]["set"] == "Tiny" and rows[0]["images"] == "3"
    assert int(rows[0]["params"]) == 56_268 and abs(int(rows[0]["multi_adds"]) / 1e9 - 12.07) < 0.01
    per = list(csv.DictReader(open(out / "per_image.csv")))
    assert [r["image"] for r in per] == ["grey", "im0", "im1"]
    assert float(rows[0]["psnr"]) == pytest.approx(np.mean([float(r["psnr"]) for r in per]), abs=1e-3)
    assert (out / "results.md").read_text().startswith("| Method | Scale |")
    sr = Image.open(out / "images" / "Tiny" / "x2" / "im0.png")
    assert sr.size == (64, 64) and sr.mode == "RGB"
    cmp_ = Image.open(out / "compare" / "Tiny_x2_im0.png")
    assert cmp_.width > 3 * cmp_.height - 100  # three panels side by side


def test_self_ensemble_cli(tmp_path, tiny_set, tiny_weights):
    rc = main(["--genotype", "TINY18", "--weights", str(tiny_weights), "--data", str(tiny_set),
               "--out", str(tmp_path / "e"), "--self-ensemble", "--quiet"])
    assert rc == 0
    assert list(csv.DictReader(open(tmp_path / "e" / "results.csv")))[0]["method"] == "tiny18 (x8)"


def test_bicubic_mode(tmp_path, tiny_set, capsys):
    rc = main(["--bicubic", "--data", str(tiny_set), "--scales", "2", "4", "--out",
               str(tmp_path / "b"), "--quiet"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "b" / "results.csv")))
    assert [(r["method"], r["scale"]) for r in rows] == [("Bicubic", "2"), ("Bicubic", "4")]
    assert float(rows[0]["psnr"]) > float(rows[1]["psnr"])  # x2 is easier than x4


def test_errors(tmp_path, tiny_set, tiny_weights, capsys):
    rc = main(["--genotype", "BETA21", "--weights", str(tiny_weights), "--data", str(tiny_set),
               "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 2 and "'fea_conv.weight'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--genotype", "TINY18", "--weights", str(tiny_weights), "--data", str(tiny_set),
              "--scales", "3"])
    with pytest.raises(SystemExit):
        main(["--genotype", "NOPE", "--weights", str(tiny_weights), "--data", str(tiny_set)])
    with pytest.raises(SystemExit):
        main(["--data", str(tiny_set)])
    (tmp_path / "empty").mkdir()
    rc = main(["--bicubic", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "y")])
    assert rc == 2 and "contains no images" in capsys.readouterr().err
    (tiny_set / "im0.png").write_bytes(b"corrupt")
    rc = main(["--bicubic", "--data", str(tiny_set), "--out", str(tmp_path / "z"), "--quiet"])
    assert rc == 2 and "im0.png: cannot read image" in capsys.readouterr().err


def test_cli_bicubic_on_shared_set5(tmp_path):
    data = shared_dir() / "data" / "Set5"
    if not data.is_dir():
        pytest.skip(f"{data} not found")
    assert main(["--bicubic", "--data", str(data), "--scales", "2", "--out", str(tmp_path),
                 "--quiet"]) == 0
    row = next(csv.DictReader(open(tmp_path / "results.csv")))
    assert abs(float(row["psnr"]) - 33.66) <= 0.01 and abs(float(row["ssim"]) - 0.9299) <= 0.0005


@pytest.mark.parametrize("flags, bar, lines", [([], False, True), (["--progress"], True, True),
                                               (["--quiet", "--progress"], True, False),
                                               (["--no-progress"], False, True)])
def test_progress_bar(tmp_path, tiny_set, capsys, flags, bar, lines):
    # under pytest stderr is not a terminal, so the default (auto) shows no bar
    rc = main(["--bicubic", "--data", str(tiny_set), "--scales", "2", "--out", str(tmp_path)]
              + flags)
    err = capsys.readouterr().err
    assert rc == 0
    assert ("Tiny x2: 100%" in err and "3/3" in err) == bar, err
    assert ("Tiny x2 im0:" in err) == lines, err


def test_progress_auto_follows_terminal(tmp_path, tiny_set, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    args = ["--bicubic", "--data", str(tiny_set), "--scales", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "Tiny x2: 100%" in capsys.readouterr().err
    assert main(args + ["--quiet"]) == 2  # the tables exist: no overwrite without consent
    assert "already exists (--overwrite replaces it)" in capsys.readouterr().err
    assert main(args + ["--quiet", "--overwrite"]) == 0
    assert "100%" not in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["native", "channels_last", "fused", "auto"])
def test_backends_score_alike(tmp_path, tiny_set, tiny_weights, backend):
    """--backend native (depthwise convs on the native kernels), channels_last, fused and auto give
    the 8-bit SR images of --backend torch (the plain modules, NCHW) up to a rounding step."""
    from hdnas.mixed import native

    if backend == "native" and not native.available("cpu"):
        pytest.skip("native CPU kernels unavailable")
    per = {}
    for b in ("torch", backend):
        per[b] = _run_backend(tmp_path / b, tiny_set, tiny_weights, b)
    (p0, i0), (p1, i1) = per["torch"], per[backend]
    assert len(i0) == 3
    for a, b in zip(i0, i1):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # rounding of a half at most
    assert [float(r["psnr"]) for r in p0] == pytest.approx([float(r["psnr"]) for r in p1], abs=0.01)


def _run_backend(out, tiny_set, tiny_weights, backend):
    rc = main(["--genotype", "TINY18", "--weights", str(tiny_weights), "--data", str(tiny_set),
               "--out", str(out), "--save-images", "--quiet", "--backend", backend])
    assert rc == 0
    imgs = sorted((out / "images").rglob("*.png"))
    return (list(csv.DictReader(open(out / "per_image.csv"))),
            [np.asarray(Image.open(p)) for p in imgs])


def test_backend_choice_is_checked(tiny_set, tiny_weights):
    with pytest.raises(SystemExit):
        main(["--genotype", "TINY18", "--weights", str(tiny_weights), "--data", str(tiny_set),
              "--backend", "fast"])
