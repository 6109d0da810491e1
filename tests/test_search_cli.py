"""The search command end to end on the embedded data, resume, and bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hdnas import checkpoint
from hdnas.genotype import Genotype
from hdnas.search import Search, SearchConfig, main

TINY = ["--channels", "8", "--cells", "3", "--batch", "2", "--patch", "32", "--quiet"]


def test_few_steps_on_embedded_data(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(TINY + ["--out", str(out), "--steps", "4", "--warmup", "1", "--log-every", "2",
                      "--ckpt-every", "2", "--rule", "darts1"])
    assert rc == 0
    assert capsys.readouterr().out.strip().endswith("genotype.json")
    for f in ("config.json", "genotype.json", "history.csv", "log.txt", "checkpoint.pt",
              "alpha.png", "beta.png"):
        assert (out / f).is_file(), f
    g = Genotype.load(out / "genotype.json")
    assert g.channels == 8 and g.num_cells == 3
    rows = (out / "history.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("step,lr,loss_train")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["rule"] == "darts1" and cfg["given"]["steps"] == 4
    assert "backend reference" in (out / "log.txt").read_text()
    # a finished run refuses to be overwritten
    with pytest.raises(SystemExit, match="already holds a run"):
        main(TINY + ["--out", str(out)])


def _cfg(tmp, **kw):
    base = dict(channels=8, cells=3, batch=2, patch=32, steps=6, warmup=2, log_every=1,
                ckpt_every=3, out=str(tmp))
    return SearchConfig(**(base | kw))


@pytest.mark.parametrize("rule", ["joint", pytest.param("darts2", marks=pytest.mark.slow)])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, rule):
    torch.use_deterministic_algorithms(True)
    try:
        a_dir, b_dir = tmp_path / "a", tmp_path / "b"
        a_dir.mkdir(), b_dir.mkdir()
        full = Search(_cfg(a_dir, rule=rule), a_dir)
        full.run(quiet=True)

        first = Search(_cfg(b_dir, rule=rule), b_dir)
        first.run(stop_after=4, quiet=True)  # checkpoint at step 3, then "killed" after step 4
        del first
        resumed = Search(_cfg(b_dir, rule=rule), b_dir)
        resumed.load_state_dict(checkpoint.load(b_dir / "checkpoint.pt"))
        assert resumed.step == 3
        resumed.history.truncate_after(resumed.step)
        resumed.run(quiet=True)
    finally:
        torch.use_deterministic_algorithms(False)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k

    def rows(d):  # every column but sec_per_step
        return [r.split(",")[:5] + r.split(",")[6:] for r in (d / "history.csv").read_text().splitlines()]

    assert rows(a_dir) == rows(b_dir)  # same losses and alpha/beta at every logged step


def test_resume_cli(tmp_path):
    out = tmp_path / "run"
    assert main(TINY + ["--out", str(out), "--steps", "3", "--warmup", "1", "--ckpt-every", "1",
                        "--log-every", "1"]) == 0
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["step"] == 3
    # a resumed finished run does nothing more and still succeeds
    assert main(["--resume", str(out), "--quiet"]) == 0
    with pytest.raises(SystemExit, match="no run to resume"):
        main(["--resume", str(tmp_path / "nothing")])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({"v": 1}, path)

    def boom(*a, **k):
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"v": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def _write_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.parametrize("args,match", [
    (["--scale", "5"], "scale 5 is not supported"),
    (["--ops", "conv_1x1", "conv_9x9"], "unknown op 'conv_9x9'"),
    (["--train-dir", "/nonexistent/folder"], "does not exist"),
    (["--patch", "20"], "at least 15"),
    (["--rule", "darts3"], "--rule"),
])
def test_bad_input_gives_clear_error(tmp_path, capsys, args, match):
    rc = main(TINY + ["--out", str(tmp_path / "r")] + args)
    assert rc == 2
    assert match in capsys.readouterr().err


def test_empty_and_small_image_folders(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(TINY + ["--out", str(tmp_path / "r1"), "--train-dir", str(empty)]) == 2
    assert "contains no images" in capsys.readouterr().err
    small = tmp_path / "small"
    _write_images(small, [(40, 40), (20, 50)])
    assert main(TINY + ["--out", str(tmp_path / "r2"), "--train-dir", str(small)]) == 2
    err = capsys.readouterr().err
    assert "1.png" in err and "smaller than scale x patch" in err


def test_training_patches_use_shipped_lr_and_stay_aligned(tmp_path):
    from hdnas.data.train import PatchSampler

    hr_dir = tmp_path / "DIV2K_train_HR"
    lr_dir = tmp_path / "DIV2K_train_LR_bicubic" / "X2"
    lr_dir.mkdir(parents=True)
    _write_images(hr_dir, [(40, 36)])
    Image.fromarray(np.full((20, 18, 3), 7, np.uint8)).save(lr_dir / "0x2.png")
    s = PatchSampler(hr_dir, 2, 32)
    lr, hr = s.sample(3, torch.Generator().manual_seed(0))
    assert lr.shape == (3, 3, 16, 16) and hr.shape == (3, 3, 32, 32)
    assert (lr == 7).all()  # the shipped LR image, not one made from HR
    # HR-only: the LR patch is the MATLAB-bicubic LR of the image at the same place
    s = PatchSampler(hr_dir.parent / "DIV2K_train_HR", 2, 32, augment=False)
    s.lr[0] = torch.arange(20 * 18).view(1, 20, 18).expand(3, 20, 18).to(torch.uint8)
    s.hr[0] = s.lr[0].repeat_interleave(2, 1).repeat_interleave(2, 2)
    lr, hr = s.sample(4, torch.Generator().manual_seed(1))
    assert torch.equal(hr[:, :, ::2, ::2], lr)


def test_one_folder_is_split_into_weight_and_arch_images(tmp_path):
    folder = tmp_path / "hr"
    _write_images(folder, [(40, 40)] * 8)
    cfg = _cfg(tmp_path, train_dir=str(folder), arch_fraction=0.25)
    s = Search(cfg, tmp_path)
    assert s.train_data.names == [str(i) for i in range(6)]
    assert s.arch_data.names == ["6", "7"]
    with pytest.raises(ValueError, match="split"):
        Search(_cfg(tmp_path, train_dir=str(folder), arch_fraction=0.01), tmp_path)


def test_retrain_and_resume(tmp_path, capsys):
    from hdnas.train import main as train_main
    out = tmp_path / "t"
    args = ["--genotype", "tiny18", "--batch", "2", "--patch", "32", "--steps", "3",
            "--ckpt-every", "2", "--log-every", "1", "--quiet", "--out", str(out)]
    assert train_main(args) == 0
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["step"] == 3 and Genotype.load(out / "genotype.json").channels == 18
    assert len((out / "history.csv").read_text().splitlines()) == 4
    assert train_main(["--resume", str(out), "--quiet"]) == 0
    assert train_main(["--genotype", str(tmp_path / "none.json"), "--out", str(tmp_path / "u")]) == 2
    assert "does not exist" in capsys.readouterr().err
