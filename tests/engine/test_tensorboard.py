"""--tensorboard: a tiny search and a tiny retraining write event files under RUN_DIR/tensorboard
that TensorBoard's own reader reads back (the history's scalars with the same values, softmax
alpha/beta per op and cell, the genotype as text, LR-bicubic / SR / HR validation images); a
missing tensorboard package is an error naming the install command, before anything is
written."""
import csv
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from hdnas.engine.tensorboard import CROP, INSTALL
from hdnas.search import main as search_main
from hdnas.train import main as train_main

OPS = ["conv_1x1", "sep_conv_3x3", "dil_conv_3x3"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HDNAS_CACHE_DIR", str(tmp_path / "cache"))


def _images(folder, n, size=(48, 44), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 255, (size[0] // 8 + 1, size[1] // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(base).resize(size[::-1], Image.BILINEAR).save(folder / f"{i}.png")


def _events(run):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(run / "tensorboard"),
                              size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _rows(run):
    with (run / "history.csv").open() as f:
        return list(csv.DictReader(f))


def _text(acc) -> str:
    return acc.Tensors("genotype/text_summary")[-1].tensor_proto.string_val[0].decode()


def _check_images(acc, steps, hr=(40, 52)):
    """val/image0 at ``steps``: three tiles (LR bicubic, SR, HR) of the validation image of
    ``hr`` pixels (at most CROP a side), 4-pixel gaps, a 14-pixel line of labels."""
    images = acc.Images("val/image0")
    assert [i.step for i in images] == steps
    h, w = min(hr[0], CROP), min(hr[1], CROP)
    with Image.open(io.BytesIO(images[-1].encoded_image_string)) as im:
        assert im.format == "PNG" and im.size == (3 * w + 8, h + 14)
        assert np.asarray(im.convert("L")).std() > 1  # not a blank picture


def test_search_writes_scalars_text_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    train, val, out = tmp_path / "train", tmp_path / "val", tmp_path / "run"
    _images(train, 8)
    _images(val, 2, size=(40, 52), seed=1)
    assert search_main(["--train-dir", str(train), "--val-dir", str(val), "--channels", "8",
                        "--cells", "4", "--batch", "1", "--patch", "32", "--steps", "4",
                        "--warmup", "1", "--log-every", "1", "--ckpt-every", "2",
                        "--val-every", "2", "--quiet", "--ops", *OPS, "--out", str(out),
                        "--tensorboard"]) == 0
    acc = _events(out)
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/arch", "loss/penalty", "lr", "time/sec_per_step",
            "time/sec_weight_step", "time/sec_arch_step", "val/psnr", "val/ssim"} <= scalars
    alpha = {f"alpha/step{s}/{op}" for s in (1, 2, 3) for op in OPS}
    beta = {"beta/cell3/B1", "beta/cell3/B2", "beta/cell4/B1", "beta/cell4/B2", "beta/cell4/B3"}
    assert alpha | beta <= scalars
    rows = _rows(out)
    assert [e.step for e in acc.Scalars("loss/train")] == [int(r["step"]) for r in rows]
    assert [e.value for e in acc.Scalars("loss/train")] == pytest.approx(
        [float(r["loss_train"]) for r in rows], rel=1e-5)
    val_rows = [r for r in rows if r["val_psnr"]]
    assert [e.step for e in acc.Scalars("val/psnr")] == [int(r["step"]) for r in val_rows]
    assert [e.value for e in acc.Scalars("val/psnr")] == pytest.approx(
        [float(r["val_psnr"]) for r in val_rows], abs=1e-4)
    assert [e.step for e in acc.Scalars("loss/arch")] == [2, 3, 4]  # none in the warm-up
    # softmax(alpha) of a step sums to one at every logged step
    sums = np.sum([[e.value for e in acc.Scalars(f"alpha/step2/{op}")] for op in OPS], axis=0)
    assert sums == pytest.approx(np.ones(len(rows)), abs=1e-5)
    genotype = json.loads((out / "genotype.json").read_text())
    assert json.dumps(genotype["cell_ops"]) in _text(acc)
    assert "| B4 |" in _text(acc)
    _check_images(acc, [2, 4])
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_train_writes_the_genotype_once_and_its_pictures(tmp_path):
    pytest.importorskip("tensorboard")
    train, val, out = tmp_path / "train", tmp_path / "val", tmp_path / "run"
    _images(train, 3)
    _images(val, 1, size=(40, 52), seed=1)
    assert train_main(["--genotype", "tiny18", "--train-dir", str(train), "--val-dir", str(val),
                       "--batch", "2", "--patch", "32", "--steps", "2", "--val-every", "2",
                       "--quiet", "--out", str(out), "--tensorboard"]) == 0
    acc = _events(out)
    assert {"loss/train", "lr", "time/sec_per_step", "val/psnr", "val/ssim"} <= \
        set(acc.Tags()["scalars"])
    assert len(acc.Tensors("genotype/text_summary")) == 1 and "tiny18" in _text(acc)
    _check_images(acc, [2])
    for name in ("network.png", "curves.png", "val.png"):
        assert (out / name).is_file(), name


def test_missing_tensorboard_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    out = tmp_path / "run"
    assert search_main(["--channels", "8", "--cells", "3", "--batch", "1", "--patch", "32",
                        "--steps", "1", "--quiet", "--ops", *OPS, "--out", str(out),
                        "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tensorboard needs the tensorboard package") and INSTALL in err
    assert not out.exists() or not any(out.iterdir())  # nothing written
