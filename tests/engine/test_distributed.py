"""Data-parallel search and retraining on the CPU (gloo, 2 processes started by torchrun):
a 2-process run on global batch B equals a 1-process run on B (up to the summation order),
resume across world sizes, rank 0 alone writes, the debug sync check, and a hung rank."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hdnas.io import checkpoint
from hdnas.engine.distributed import Dist
from hdnas.search import main as search_main
from hdnas.train import main as train_main

DRIVER = Path(__file__).with_name("dist_driver.py")
# hfen 0: HFEN normalises by the max over the batch a rank sees, which differs from the max over
# the global batch (docs/distributed.md); L1 is a mean, so the mean of the ranks' means is exact
SEARCH = ["--channels", "8", "--cells", "3", "--batch", "4", "--patch", "32", "--hfen", "0",
          "--ops", "conv_1x1", "sep_conv_3x3", "--log-every", "1", "--quiet", "--threads", "1"]
TRAIN = ["--genotype", "tiny18", "--batch", "4", "--patch", "32", "--log-every", "1",
         "--quiet", "--threads", "1", "--grad-clip", "0.5"]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("HDNAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def torchrun(cmd, args, fault="", timeout=300, env=None):
    env = dict(os.environ, DRIVER_FAULT=fault, **(env or {}))
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(DRIVER), cmd, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def history(run):
    with (run / "history.csv").open() as f:
        return list(csv.DictReader(f))


def assert_same_run(a: Path, b: Path, opt_keys=("w_opt", "a_opt")):
    """Same losses and validation scores at every logged step, same final weights, alpha,
    beta and optimizer moments (the averaged gradients), within float32 summation noise."""
    ha, hb = history(a), history(b)
    assert [r["step"] for r in ha] == [r["step"] for r in hb]
    for ra, rb in zip(ha, hb):
        for k, v in ra.items():
            if k.startswith(("loss", "val_", "alpha", "beta")) and v not in ("", "nan"):
                assert float(rb[k]) == pytest.approx(float(v), rel=1e-4, abs=1e-7), (ra["step"], k)
    sa, sb = checkpoint.load(a / "checkpoint.pt"), checkpoint.load(b / "checkpoint.pt")
    assert sa["step"] == sb["step"]
    for k, v in sa["model"].items():
        torch.testing.assert_close(sb["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    for key in opt_keys:
        for i, st in sa[key]["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sb[key]["state"][i][name], st[name], rtol=1e-3,
                                           atol=1e-9, msg=f"{key} {i} {name}")


def test_two_process_search_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = SEARCH + ["--steps", "4", "--warmup", "1", "--val-every", "2", "--ckpt-every", "2"]
    assert search_main(args + ["--out", str(one)]) == 0
    proc = ok(torchrun("search", args + ["--out", str(two), "--debug-sync", "1"]))
    assert proc.stdout.strip() == str(two / "genotype.json")  # printed once, by rank 0
    assert_same_run(one, two)
    assert json.loads((one / "genotype.json").read_text())["cell_ops"] == \
        json.loads((two / "genotype.json").read_text())["cell_ops"]
    # the genotype recorded at each validation
    rec = [json.loads(ln) for ln in (two / "genotypes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [2, 4] and rec[0]["genotype"]["channels"] == 8
    log = (two / "log.txt").read_text()
    assert "distributed: 2 ranks (gloo), global batch 4 = 2 per rank" in log
    assert log.count("run folder") == 1  # one writer


@pytest.mark.slow
def test_two_process_darts2_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = SEARCH + ["--steps", "2", "--warmup", "0", "--rule", "darts2", "--val-every", "0"]
    assert search_main(args + ["--out", str(one)]) == 0
    ok(torchrun("search", args + ["--out", str(two), "--debug-sync", "1"]))
    assert_same_run(one, two)


def test_two_process_retraining_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = TRAIN + ["--steps", "2", "--val-every", "1"]
    assert train_main(args + ["--out", str(one)]) == 0
    ok(torchrun("train", args + ["--out", str(two), "--debug-sync", "1"]))
    assert_same_run(one, two, opt_keys=("opt",))
    best = checkpoint.load(two / "best.pt")
    assert set(best) >= {"model", "step", "val_psnr"} and best["step"] in (1, 2)
    rows = history(two)
    assert best["val_psnr"] == pytest.approx(max(float(r["val_psnr"]) for r in rows), abs=1e-4)


def test_resume_of_a_two_process_run_on_two_or_one_processes(tmp_path):
    """Killed after step 3 (checkpoint at step 2), then resumed with 2 processes and, from a
    copy, with 1: both equal an uninterrupted 1-process run."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    args = SEARCH + ["--steps", "4", "--warmup", "1", "--ckpt-every", "2", "--val-every", "2"]
    assert search_main(args + ["--out", str(ref)]) == 0
    ok(torchrun("search", args + ["--out", str(killed)], fault="stop=3"))
    assert checkpoint.load(killed / "checkpoint.pt")["step"] == 2
    assert [r["step"] for r in history(killed)] == ["1", "2", "3"]
    shutil.copytree(killed, tmp_path / "copy")
    ok(torchrun("search", ["--resume", str(killed), "--quiet"]))
    assert_same_run(ref, killed)
    assert search_main(["--resume", str(tmp_path / "copy"), "--quiet"]) == 0
    assert_same_run(ref, tmp_path / "copy")
    assert [json.loads(ln)["step"] for ln in
            (killed / "genotypes.jsonl").read_text().splitlines()] == [2, 4]


def test_debug_sync_finds_ranks_out_of_sync(tmp_path):
    proc = torchrun("search", SEARCH + ["--steps", "2", "--warmup", "0", "--val-every", "0",
                                        "--debug-sync", "1", "--out", str(tmp_path / "r")],
                    fault="desync")
    assert proc.returncode != 0
    assert "ranks out of sync at step 1: alphas differs between rank" in proc.stderr


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_with_a_clear_message(tmp_path):
    proc = torchrun("train", TRAIN + ["--steps", "3", "--val-every", "0",
                                      "--out", str(tmp_path / "r")],
                    fault="hang", env={"HDNAS_DIST_TIMEOUT": "5"})
    assert proc.returncode != 0  # well before rank 1's 600 s sleep ends (timeout=300)
    assert "rank 0 of 2" in proc.stderr and "communication with the other ranks failed" in proc.stderr
    assert "Timed out waiting 5000ms" in proc.stderr


def test_each_rank_takes_its_slice_of_the_same_global_draw(tmp_path):
    from PIL import Image
    import numpy as np
    from hdnas.data.cache import open_cache
    from hdnas.data.train import DataError, PatchSampler
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 40 + 8 * i, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    s = PatchSampler(open_cache(folder, 2, tmp_path / "c"), 2, 32, seed=5)
    full = s.batch_at(7, 6)
    for world in (2, 3):
        parts = [s.batch_at(7, 6, r, world) for r in range(world)]
        for k in (0, 1):
            assert torch.equal(torch.cat([p[k] for p in parts]), full[k])
    assert not torch.equal(s.batch_at(8, 6)[1], full[1])  # another step, other patches
    with pytest.raises(DataError, match="global batch 6 is not divisible by the 4 ranks"):
        s.batch_at(7, 6, 0, 4)


def test_single_process_collectives_are_no_ops():
    d = Dist()
    t = torch.arange(4.0)
    d.average([t])
    d.broadcast_tensors([t])
    assert torch.equal(t, torch.arange(4.0)) and d.sum([1.0, 2.0]) == [1.0, 2.0]
    assert d.on_main(lambda: 7) == 7 and d.first_on_each_node(lambda: 8) == 8
    d.check_same([("t", t)], "now")


def test_odd_global_batch_is_refused(tmp_path, monkeypatch, capsys):
    from hdnas.engine import cli
    monkeypatch.setattr(cli, "init_from_env", lambda device: Dist(0, 2))  # refused before
    assert search_main(SEARCH + ["--batch", "3", "--out", str(tmp_path / "r")]) == 2  # any message
    assert "--batch 3 (the global batch) is not divisible by the 2 ranks" in capsys.readouterr().err
