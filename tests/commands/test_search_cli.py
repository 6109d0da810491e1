"""The search command end to end on the embedded data, resume, mixed precision, the warm-up,
the history's timing columns, and bad input."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from hdnas.mixed import resolve_backend
from PIL import Image

from hdnas.io import checkpoint
from hdnas.model.genotype import Genotype
from hdnas.engine.rundir import setup_logging
from hdnas.engine.search import PRESETS, Search, SearchConfig
from hdnas.search import main

OPS = ["conv_1x1", "sep_conv_3x3", "dil_conv_3x3"]  # a small space keeps these tests fast


@pytest.fixture(autouse=True, scope="module")
def _data_cache(tmp_path_factory):
    """One decoded-image cache for the module, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HDNAS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield
TINY = ["--channels", "8", "--cells", "3", "--batch", "2", "--patch", "32", "--quiet",
        "--ops"] + OPS


def test_few_steps_on_embedded_data(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(TINY + ["--out", str(out), "--steps", "4", "--warmup", "1", "--log-every", "2",
                      "--ckpt-every", "2", "--rule", "darts1"])
    assert rc == 0
    assert capsys.readouterr().out.strip().endswith("genotype.json")
    for f in ("config.json", "genotype.json", "history.csv", "log.txt", "checkpoint.pt",
              "alpha.png", "beta.png", "val.png", "curves.png", "network.png"):
        assert (out / f).is_file(), f
    g = Genotype.load(out / "genotype.json")
    assert g.channels == 8 and g.num_cells == 3
    rows = (out / "history.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("step,lr,loss_train")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["rule"] == "darts1" and cfg["given"]["steps"] == 4
    assert (cfg["schema"], cfg["kind"]) == (2, "hdnas-search")  # tests/engine/test_schema.py
    # the default backend is 'auto': the fastest exact one here, logged and in config.json
    chosen = resolve_backend("auto", "cpu", torch.float32, OPS).name
    assert chosen != "reference" and cfg["resolved"]["backend"] == "auto"
    assert f"backend {chosen}" in (out / "log.txt").read_text()
    assert "dense_conv" in json.loads((out / "timed_choices.json").read_text())
    from hdnas.io.official import read_state_dict
    sd = read_state_dict(out / "supernet.safetensors")  # the supernet's weights, alphas included
    assert torch.equal(sd["alphas"], checkpoint.load(out / "checkpoint.pt")["model"]["alphas"])
    # a finished run refuses to be overwritten (exit status 2, as the README promises)
    capsys.readouterr()
    assert main(TINY + ["--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def _cfg(tmp, **kw):
    # a fixed thread count: the default follows the load of other processes, and a thread
    # count is part of what makes two runs bit-identical (README: --deterministic / --threads)
    base = dict(channels=8, cells=3, batch=2, patch=32, steps=6, warmup=2, log_every=1,
                ckpt_every=3, out=str(tmp), ops=OPS, threads=1)
    return SearchConfig(**(base | kw))


def _history(d):
    with (d / "history.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("rule,amp", [("joint", "off"), ("joint", "fp16"),
                                      pytest.param("darts2", "off", marks=pytest.mark.slow)])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, rule, amp):
    torch.use_deterministic_algorithms(True)
    try:
        a_dir, b_dir = tmp_path / "a", tmp_path / "b"
        a_dir.mkdir(), b_dir.mkdir()
        full = Search(_cfg(a_dir, rule=rule, amp=amp), a_dir)
        full.run(quiet=True)

        first = Search(_cfg(b_dir, rule=rule, amp=amp), b_dir)
        first.run(stop_after=4, quiet=True)  # checkpoint at step 3, then "killed" after step 4
        del first
        state = checkpoint.load(b_dir / "checkpoint.pt")
        if amp == "fp16":  # the scaler has left its initial state, so restoring it matters
            assert state["w_scaler"]["scale"] < 2.0 ** 16
        resumed = Search(_cfg(b_dir, rule=rule, amp=amp), b_dir)
        resumed.load_state_dict(state)
        assert resumed.step == 3
        resumed.history.truncate_after(resumed.step)
        resumed.run(quiet=True)
    finally:
        torch.use_deterministic_algorithms(False)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert full.w_scaler.state_dict() == resumed.w_scaler.state_dict()

    def rows(d):  # every column but the times
        return [{k: v for k, v in r.items() if not k.startswith("sec_")} for r in _history(d)]

    assert rows(a_dir) == rows(b_dir)  # same losses and alpha/beta at every logged step
    assert len(rows(a_dir)) == 6


def test_bf16_search_is_close_to_fp32_and_keeps_fp32_parameters(tmp_path):
    runs = {}
    for amp in ("off", "bf16"):
        out = tmp_path / amp
        out.mkdir()
        # no validation: it runs in fp32 on purpose (the score of the weights, not of bf16)
        s = Search(_cfg(out, amp=amp, steps=3, warmup=1, ckpt_every=3, val_every=0), out)
        dtypes = set()
        s.model.register_forward_hook(lambda mod, inp, y: dtypes.add(y.dtype))
        s.run(quiet=True)
        # every forward pass, weight and architecture steps alike, ran under autocast
        assert dtypes == {torch.bfloat16 if amp == "bf16" else torch.float32}
        for p in s.model.parameters():
            assert p.dtype == torch.float32
            assert p.grad is None or p.grad.dtype == torch.float32
        assert s.model.alphas.grad is not None
        runs[amp] = _history(out)
    for ref, low in zip(runs["off"], runs["bf16"]):
        for col in ("loss_train", "loss_arch"):
            a, b = float(ref[col]), float(low[col])
            assert (math.isnan(a) and math.isnan(b)) or b == pytest.approx(a, rel=2e-3), col


def test_history_times_each_interval_and_each_kind_of_step(tmp_path):
    """sec_per_step is the mean over the logged interval, not since the start; the weight and
    architecture parts of a step are timed apart (a fake clock: a weight step costs 1 s, an
    architecture update 2 s)."""
    setup_logging(tmp_path, quiet=True)
    s = Search(_cfg(tmp_path, steps=4, warmup=2, log_every=2, ckpt_every=4), tmp_path)
    now = [0.0]
    s.timer.clock = lambda: now[0]

    def costs(fn, sec):
        def timed(*args, **kwargs):
            now[0] += sec
            return fn(*args, **kwargs)
        return timed

    s.weight_step = costs(s.weight_step, 1.0)
    s.architect.step = costs(s.architect.step, 2.0)
    s.run(quiet=True)
    rows = _history(tmp_path)
    assert [float(rows[0][k]) for k in ("sec_per_step", "sec_weight_step")] == [1.0, 1.0]
    assert math.isnan(float(rows[0]["sec_arch_step"]))  # steps 1-2: warm-up, no arch update
    assert [float(rows[1][k]) for k in ("sec_per_step", "sec_weight_step", "sec_arch_step")] \
        == [3.0, 1.0, 2.0]
    assert "3.000s/step (arch 2.000s, weight 1.000s)" in (tmp_path / "log.txt").read_text()


def test_warmup_shrinks_with_a_short_run(tmp_path, capsys):
    assert SearchConfig().warmup_steps() == 20  # 25% of the default 80 steps
    assert SearchConfig(steps=1).warmup_steps() == 0
    assert SearchConfig(steps=10, warmup=10).warmup_steps() == 10
    assert SearchConfig(**PRESETS["paper"]).warmup_steps() == 20_000  # 20 of 1000 epochs
    out = tmp_path / "one"
    assert main(TINY + ["--out", str(out), "--steps", "1"]) == 0
    assert "warm-up 0 of 1 steps (auto" in (out / "log.txt").read_text()
    assert math.isfinite(float(_history(out)[0]["loss_arch"]))  # step 1 updated alpha/beta


def test_passive_openmp_with_threads_is_warned_about(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    try:  # the thread count is the run's (--threads; 0 follows the free CPUs)
        assert main(TINY + ["--out", str(tmp_path / "a"), "--steps", "1", "--quiet",
                            "--threads", "2"]) == 0
        assert main(TINY + ["--out", str(tmp_path / "b"), "--steps", "1", "--quiet",
                            "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "OMP_WAIT_POLICY=PASSIVE with 2 threads" in (tmp_path / "a" / "log.txt").read_text()
    assert "OMP_WAIT_POLICY" not in (tmp_path / "b" / "log.txt").read_text()


def test_paper_preset_has_no_working_penalty_like_the_release(tmp_path):
    out = tmp_path / "p"
    assert main(["--preset", "paper"] + TINY + ["--out", str(out), "--steps", "1"]) == 0
    cfg = json.loads((out / "config.json").read_text())["resolved"]
    assert cfg["penalty"] == 0.0 and cfg["batch"] == 2 and cfg["hfen"] == 0.2
    assert float(_history(out)[0]["penalty"]) == 0.0
    out = tmp_path / "q"  # ours, explicitly
    assert main(["--preset", "paper", "--penalty", "1"] + TINY
                + ["--out", str(out), "--steps", "1"]) == 0
    assert float(_history(out)[0]["penalty"]) > 0


def test_resume_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--out", str(out), "--steps", "3", "--warmup", "1", "--ckpt-every", "1",
                        "--log-every", "1"]) == 0
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["step"] == 3
    # a resumed finished run does nothing more and still succeeds
    assert main(["--resume", str(out), "--quiet"]) == 0
    assert main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "no run to resume" in capsys.readouterr().err


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
    (["--amp", "fp32"], "--amp must be one of off, bf16, fp16, got 'fp32'"),
    (["--steps", "1", "--warmup", "2"], "--warmup 2 is not between 0 and --steps 1"),
    (["--warmup-fraction", "1.5"], "argument --warmup-fraction: 1.5 is out of range"),
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
    _write_images(small, [(40, 40), (20, 50)] + [(40, 40)] * 6)  # 6 validation, 7 arch
    assert main(TINY + ["--out", str(tmp_path / "r2"), "--train-dir", str(small)]) == 2
    err = capsys.readouterr().err
    assert "1.png: HR 50x20 is smaller than scale x patch" in err
    assert "--skip-bad-images" in err
    # asked to, the run leaves it out with a warning
    assert main(TINY + ["--out", str(tmp_path / "r3"), "--train-dir", str(small), "--steps", "1",
                        "--skip-bad-images"]) == 0
    assert "left out 1 images smaller than the patch" in (tmp_path / "r3" / "log.txt").read_text()


def test_training_patches_use_shipped_lr_and_stay_aligned(tmp_path):
    from hdnas.data.cache import open_cache
    from hdnas.data.train import PatchSampler

    hr_dir = tmp_path / "DIV2K_train_HR"
    lr_dir = tmp_path / "DIV2K_train_LR_bicubic" / "X2"
    lr_dir.mkdir(parents=True)
    _write_images(hr_dir, [(40, 36)])
    Image.fromarray(np.full((20, 18, 3), 7, np.uint8)).save(lr_dir / "0x2.png")
    s = PatchSampler(open_cache(hr_dir, 2, tmp_path / "c1"), 2, 32)
    lr, hr = s.batch_at(0, 3)
    assert lr.shape == (3, 3, 16, 16) and hr.shape == (3, 3, 32, 32) and lr.dtype == torch.uint8
    assert (lr == 7).all()  # the shipped LR image, not one made from HR
    # HR and LR patches are cut at the same place: LR values that code their position, HR the
    # same values repeated 2x2 (flips and transposes included)
    hr_only = tmp_path / "coded"
    hr_only.mkdir()
    (hr_only / "HR").mkdir()
    (hr_only / "LR_bicubic" / "X2").mkdir(parents=True)
    code = (np.arange(20 * 18).reshape(20, 18) % 251).astype(np.uint8)
    Image.fromarray(np.repeat(code[..., None], 3, 2)).save(hr_only / "LR_bicubic" / "X2" / "0x2.png")
    big = np.repeat(np.repeat(code, 2, 0), 2, 1)
    Image.fromarray(np.repeat(big[..., None], 3, 2)).save(hr_only / "HR" / "0.png")
    s = PatchSampler(open_cache(hr_only, 2, tmp_path / "c2"), 2, 32)
    for step in range(4):
        lr, hr = s.batch_at(step, 4)
        assert torch.equal(hr[:, :, ::2, ::2], lr)
        assert torch.equal(hr[:, :, 1::2, 1::2], lr)


def test_one_folder_is_split_into_weight_and_arch_images(tmp_path):
    folder = tmp_path / "hr"
    _write_images(folder, [(40, 40)] * 8)
    cfg = _cfg(tmp_path, train_dir=str(folder), arch_fraction=0.25)
    s = Search(cfg, tmp_path)
    assert s.train_data.names == [str(i) for i in range(5)]
    assert s.arch_data.names == ["6", "7"]
    val_cache, val_idx = s.val_data  # held out of the weight images, the last of them
    assert [val_cache.names[i] for i in val_idx] == ["5"]
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
    # model.safetensors carries the weights and the genotype: what evaluate/upscale/export read
    from hdnas.io.weights import read_genotype
    from hdnas.io.official import read_state_dict
    sd = read_state_dict(out / "model.safetensors")
    last = checkpoint.load(out / "checkpoint.pt")["model"]
    assert sd.keys() == last.keys() and all(torch.equal(sd[k], last[k]) for k in sd)
    assert read_genotype(out / "model.safetensors").channels == 18
    assert train_main(["--genotype", str(tmp_path / "none.json"), "--out", str(tmp_path / "u")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert train_main(["--amp", "half", "--out", str(tmp_path / "v")]) == 2
    assert "--amp must be one of" in capsys.readouterr().err


def test_retrain_with_fp16_saves_and_restores_the_scaler(tmp_path):
    from hdnas.engine.train import Train, TrainConfig
    cfg = TrainConfig(genotype="tiny18", batch=2, patch=32, steps=2, ckpt_every=2, amp="fp16",
                      out=str(tmp_path))
    t = Train(cfg, tmp_path)
    t.run(quiet=True)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["scaler"] == t.scaler.state_dict() and state["scaler"]["scale"] < 2.0 ** 16
    resumed = Train(cfg, tmp_path)
    assert resumed.scaler.get_scale() == 2.0 ** 16
    resumed.load_state_dict(state)
    assert resumed.scaler.state_dict() == state["scaler"]


def test_amp_refuses_an_autocast_torch_would_silently_disable(monkeypatch):
    from hdnas.engine.runtime import Amp
    Amp("fp16", torch.device("cpu"))  # torch 2.13 autocasts to fp16 on CPU
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False)
    with pytest.raises(ValueError, match="cannot autocast to torch.float16 on cpu"):
        Amp("fp16", torch.device("cpu"))
    Amp("off", torch.device("cpu"))  # no autocast, nothing to check


def test_latency_penalty_from_a_measured_table(tmp_path, capsys):
    """--penalty-kind latency reads a table of hdnas.latency and the search runs with it; a
    table for other channels, or a missing table, is a clear error."""
    from hdnas.latency import main as latency_main
    table = tmp_path / "lat.json"
    assert latency_main(["--channels", "8", "--size", "24x20", "--cells", "3", "--ops", *OPS,
                         "--warmup", "0", "--repeats", "1", "--out", str(table)]) == 0
    out = tmp_path / "run"
    args = TINY + ["--steps", "2", "--warmup", "0", "--penalty-kind", "latency",
                   "--latency-table", str(table)]
    assert main(args + ["--out", str(out), "--budget-ms", "1e-6"]) == 0
    pen = [float(r.split(",")[4]) for r in (out / "history.csv").read_text().splitlines()[1:]]
    assert pen and all(p > 0 for p in pen)  # far over a 1 ns budget: the hinge is active
    capsys.readouterr()
    assert main(TINY + ["--out", str(tmp_path / "x"), "--penalty-kind", "latency"]) == 2
    assert "--latency-table" in capsys.readouterr().err
    wrong = TINY[:]
    wrong[1] = "16"  # channels 16 against a table measured at 8
    assert main(wrong + ["--out", str(tmp_path / "y"), "--penalty-kind", "latency",
                         "--latency-table", str(table)]) == 2
    assert "channels" in capsys.readouterr().err


def test_pictures_without_validation_have_no_val_png(tmp_path):
    """val.png is drawn only from history rows that carry validation scores."""
    from hdnas.engine.plots import plot_run
    out = tmp_path / "run"
    assert main(TINY + ["--out", str(out), "--steps", "2", "--warmup", "1", "--log-every", "1",
                        "--ckpt-every", "2", "--val-every", "0"]) == 0
    (out / "val.png").unlink(missing_ok=True)
    assert [p.name for p in plot_run(out)] == ["alpha.png", "beta.png", "curves.png",
                                               "network.png"]
