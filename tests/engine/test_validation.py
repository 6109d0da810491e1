"""Validation during search and retraining: the scores are hdnas.evaluate's (Y, shave = scale),
best.pt holds the best weights, the search records its genotype at each validation."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hdnas.io import checkpoint
from hdnas.data.benchmark import BenchmarkSet
from hdnas.eval.protocol import evaluate_set
from hdnas.infer.run import prepare_model
from hdnas.infer.fused import FusedInference
from hdnas.model.genotype import Genotype
from hdnas.model.network import DerivedNet
from hdnas.engine.search import Search, SearchConfig
from hdnas.engine.train import Train, TrainConfig
from hdnas.train import main as train_main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HDNAS_CACHE_DIR", str(tmp_path / "cache"))


def _images(folder, n, size=(48, 44), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # smooth images: a network can learn something in a few steps
        base = rng.integers(0, 255, (size[0] // 8 + 1, size[1] // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize(size[::-1], Image.BILINEAR)
        img.save(folder / f"{i}.png")


def _rows(run):
    with (run / "history.csv").open() as f:
        return list(csv.DictReader(f))


def test_retraining_scores_are_evaluates_and_best_pt_holds_the_best(tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    _images(train, 3)
    _images(val, 2, size=(40, 52), seed=1)
    out = tmp_path / "run"
    assert train_main(["--genotype", "tiny18", "--train-dir", str(train), "--val-dir", str(val),
                       "--batch", "2", "--patch", "32", "--steps", "4", "--val-every", "2",
                       "--log-every", "4", "--lr", "1e-2", "--quiet", "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == ["2", "4"]  # validation steps get a row
    scores = [float(r["val_psnr"]) for r in rows]
    best = checkpoint.load(out / "best.pt")  # the safe loader reads it
    assert best["val_psnr"] == pytest.approx(max(scores), abs=1e-4)
    assert best["step"] == [2, 4][int(np.argmax(scores))]
    # the recorded score is what hdnas.evaluate gives for those weights on that folder
    net = DerivedNet(Genotype.load(out / "genotype.json"))
    net.load_state_dict(best["model"])
    ref = evaluate_set(BenchmarkSet(val, 2), prepare_model(net, "auto", "cpu"))  # evaluate's default
    assert best["val_psnr"] == pytest.approx(ref["psnr"], abs=1e-6)
    assert best["val_ssim"] == pytest.approx(ref["ssim"], abs=1e-6)
    last = checkpoint.load(out / "checkpoint.pt")
    assert last["best_val"]["step"] == best["step"]
    assert "validation PSNR" in (out / "log.txt").read_text()


def test_default_validation_is_held_out_of_the_training_images(tmp_path):
    folder = tmp_path / "train"
    _images(folder, 10)
    t = Train(TrainConfig(genotype="tiny18", train_dir=str(folder), patch=32, out=str(tmp_path),
                          val_fraction=0.2), tmp_path)
    cache, val_idx = t.val_data
    assert [cache.names[i] for i in val_idx] == ["8", "9"]
    assert t.data.names == [str(i) for i in range(8)]
    assert set(t.data.names).isdisjoint(cache.names[i] for i in val_idx)
    off = Train(TrainConfig(genotype="tiny18", train_dir=str(folder), patch=32, out=str(tmp_path),
                            val_every=0), tmp_path)
    assert off.val_data is None and len(off.data) == 10
    with pytest.raises(ValueError, match="leave none after holding out 1 for validation"):
        one = tmp_path / "one"
        _images(one, 1)
        Train(TrainConfig(genotype="tiny18", train_dir=str(one), patch=32, out=str(tmp_path)),
              tmp_path)


def test_search_records_the_genotype_at_each_validation(tmp_path):
    folder = tmp_path / "train"
    _images(folder, 6)
    cfg = SearchConfig(channels=8, cells=3, batch=2, patch=32, steps=4, warmup=0, val_every=2,
                       log_every=1, ckpt_every=4, train_dir=str(folder), arch_fraction=0.34,
                       ops=["conv_1x1", "sep_conv_3x3"], out=str(tmp_path))
    s = Search(cfg, tmp_path)
    genotypes = []
    s.on_validation = (lambda orig: lambda val: (orig(val), genotypes.append(
        s.model.genotype(name=f"{tmp_path.name}@{s.step}").to_dict())))(s.on_validation)
    s.run(quiet=True)
    recs = [json.loads(ln) for ln in (tmp_path / "genotypes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4]
    assert [r["genotype"] for r in recs] == genotypes
    rows = {r["step"]: r for r in _rows(tmp_path)}
    assert [float(rows[str(r["step"])]["val_psnr"]) for r in recs] == \
        pytest.approx([r["val_psnr"] for r in recs], abs=1e-4)
    assert rows["1"]["val_psnr"] == ""  # no validation at step 1
    # resuming from step 2 drops the later record
    s.truncate_after(2)
    assert [json.loads(ln)["step"] for ln in
            (tmp_path / "genotypes.jsonl").read_text().splitlines()] == [2]


def test_validation_scores_the_full_model_in_fp32(tmp_path):
    """The score uses every validation image, whole, and does not change the model."""
    folder = tmp_path / "train"
    _images(folder, 4)
    t = Train(TrainConfig(genotype="tiny18", train_dir=str(folder), patch=32, out=str(tmp_path),
                          val_fraction=0.5), tmp_path)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.model.train()
    got = t.validate()
    assert t.model.training
    assert isinstance(t.inference_model(), FusedInference)  # on a CPU: the fused oneDNN path
    assert t.inference_model() is t.inference_model()  # made once (its packed weights kept)
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in before.items())
    cache, idx = t.val_data
    ref = evaluate_set(BenchmarkSet(folder, 2), prepare_model(t.model, "auto", "cpu"))  # all 4
    per = {r["image"]: r for r in ref["per_image"]}
    names = [cache.names[i] for i in idx]
    assert got["val_psnr"] == pytest.approx(np.mean([per[n]["psnr"] for n in names]), abs=1e-9)
    assert got["val_ssim"] == pytest.approx(np.mean([per[n]["ssim"] for n in names]), abs=1e-9)
