"""Hostile inputs to ``python -m hdnas.search`` and ``hdnas.train`` (docs/security-runs.md): a
table of cases, each run in-process on the smallest config, checked for its exit status, its
message, and that nothing changed outside the folder it may write (the whole temporary tree is
snapshotted before and after; the working directory is that tree, so a stray relative write is
seen too). Exit statuses: 0 done, 2 bad input (nothing written), 3 diverged (last checkpoint
kept)."""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import shutil
import typing
from pathlib import Path

import pytest
import torch

from hdnas.engine.search import SearchConfig
from hdnas.engine.train import TrainConfig
from hdnas.io import checkpoint
from hdnas.mixed import available_backends
from hdnas.nas.latency import measure_table
from hdnas.search import main as search_main
from hdnas.train import main as train_main

OPS = ["conv_1x1", "sep_conv_3x3"]
SEARCH = ["--channels", "8", "--cells", "3", "--batch", "1", "--patch", "32", "--ops", *OPS,
          "--val-every", "0", "--quiet"]
TRAIN = ["--genotype", "tiny18", "--batch", "1", "--patch", "32", "--val-every", "0", "--quiet"]
MAINS = {"search": search_main, "train": train_main}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Finished runs to copy: a search and a retraining of 2 steps with a checkpoint at each
    (checkpoint.pt at step 2, checkpoint.prev.pt at step 1), and a latency table of the search's
    ops. The image cache lives outside the snapshotted trees."""
    root = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HDNAS_CACHE_DIR", str(root / "cache"))
        steps = ["--steps", "2", "--ckpt-every", "1", "--log-every", "1"]
        assert search_main(SEARCH + steps + ["--out", str(root / "search")]) == 0
        assert train_main(TRAIN + steps + ["--out", str(root / "train")]) == 0
        table = measure_table("cpu", channels=8, size=(20, 24), ops=OPS, cells=3, warmup=0,
                              repeats=1)
        (root / "lat.json").write_text(json.dumps(table))
        yield root


# -- setups: each prepares the temporary tree ----------------------------------------------
def _copy(kind):
    def setup(tmp, base):
        shutil.copytree(base / kind, tmp / "run")
    return setup


def _edit_config(edit, kind="search"):
    def setup(tmp, base):
        _copy(kind)(tmp, base)
        path = tmp / "run" / "config.json"
        doc = json.loads(path.read_text())
        edit(doc["resolved"])
        path.write_text(json.dumps(doc))
    return setup


def _raw_config(text):
    def setup(tmp, base):
        _copy("search")(tmp, base)
        (tmp / "run" / "config.json").write_text(text)
    return setup


def _checkpoints(last=None, prev=None):
    """The search run with checkpoint.pt / checkpoint.prev.pt replaced: ``"drop"`` removes one,
    bytes or a callable(tmp, base) -> bytes replaces it."""
    def setup(tmp, base):
        _copy("search")(tmp, base)
        for name, what in (("checkpoint.pt", last), ("checkpoint.prev.pt", prev)):
            path = tmp / "run" / name
            if what == "drop":
                path.unlink()
            elif what is not None:
                path.write_bytes(what(tmp, base) if callable(what) else what)
    return setup


def _truncated(tmp, base):
    return (base / "search" / "checkpoint.pt").read_bytes()[:1500]


def _train_checkpoint(tmp, base):
    return (base / "train" / "checkpoint.pt").read_bytes()


def _plain_dict(tmp, base):
    torch.save({"weights": torch.zeros(3)}, tmp / "plain.pt")
    return (tmp / "plain.pt").read_bytes()


def _dict_with_a_step(tmp, base):
    torch.save({"step": 1, "weights": torch.zeros(3)}, tmp / "plain.pt")
    return (tmp / "plain.pt").read_bytes()


def _foreign_out(tmp, base):
    out = tmp / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    (out / "history.csv").write_text("when,what\n2024,taxes\n")
    (out / "genotype.json").write_text('{"mine": true}\n')


def _file(tmp, base):
    (tmp / "out").write_text("a file\n")


def _empty_dir(tmp, base):
    (tmp / "empty").mkdir()


def _latency(mutate):
    def setup(tmp, base):
        table = json.loads((base / "lat.json").read_text())
        mutate(table)
        (tmp / "lat.json").write_text(json.dumps(table))  # NaN / Infinity as JSON literals
    return setup


def _symlinked_history(tmp, base):
    """A run whose history.csv is a symbolic link to a file outside it."""
    _copy("search")(tmp, base)
    outside = tmp / "outside.csv"
    shutil.copy(tmp / "run" / "history.csv", outside)
    (tmp / "run" / "history.csv").unlink()
    (tmp / "run" / "history.csv").symlink_to(outside)


def _nothing(tmp, base):
    pass


# -- checks after a case ---------------------------------------------------------------------
def _state(tmp, name="checkpoint.pt"):
    return checkpoint.load(tmp / "run" / name)


def _finite_checkpoint_at(step, folder="out"):
    def check(tmp):
        state = checkpoint.load(tmp / folder / "checkpoint.pt")
        assert state["step"] == step
        assert all(torch.isfinite(t).all() for t in state["model"].values()
                   if t.is_floating_point())
    return check


def _absent(tmp):
    assert not (tmp / "out").exists()


def _extended(tmp):
    assert _state(tmp)["step"] == 5 and _state(tmp, "checkpoint.prev.pt")["step"] == 4
    doc = json.loads((tmp / "run" / "config.json").read_text())
    assert doc["resolved"]["steps"] == 5
    assert doc["resumes"] == [{"step": 2, "changed": {"steps": 5, "warmup": 0}}]
    steps = [ln.split(",")[0] for ln in (tmp / "run" / "history.csv").read_text().splitlines()]
    assert steps == ["step", "1", "2", "3", "4", "5"]


def _unchanged_run(tmp):
    assert _state(tmp)["step"] == 2


def _fell_back(tmp):
    assert _state(tmp)["step"] == 3 and _state(tmp, "checkpoint.prev.pt")["step"] == 2
    assert (tmp / "run" / "checkpoint.damaged.pt").is_file()
    steps = [ln.split(",")[0] for ln in (tmp / "run" / "history.csv").read_text().splitlines()]
    assert steps == ["step", "1", "2", "3"]  # step 2 of the lost checkpoint was done again


def _link_replaced(tmp):
    assert not (tmp / "run" / "history.csv").is_symlink()
    assert len((tmp / "run" / "history.csv").read_text().splitlines()) == 4  # header + 3 steps


def _table_runs(tmp):
    assert (tmp / "out" / "checkpoint.pt").is_file()


# -- the table -------------------------------------------------------------------------------
C = collections.namedtuple("Case", "id cmd setup args code says may_change check",
                           defaults=(None, None))
LAT = ["--penalty-kind", "latency", "--latency-table", "{tmp}/lat.json", "--steps", "1"]
CASES = [
    # --out: new, empty, or refused
    C("foreign-out", "search", _foreign_out, SEARCH + ["--out", "{tmp}/out"], 2,
      "is not empty and holds no run (genotype.json, history.csv, notes.txt)"),
    C("out-is-a-file", "search", _file, SEARCH + ["--out", "{tmp}/out"], 2, "is a file"),
    C("out-under-a-file", "search", _file, SEARCH + ["--out", "{tmp}/out/run"], 2,
      "cannot create the run folder"),
    C("empty-out-is-fine", "search", _empty_dir, SEARCH + ["--steps", "1", "--out",
                                                           "{tmp}/empty"], 0, "",
      "empty"),
    C("out-holds-a-run", "search", _copy("search"), SEARCH + ["--out", "{tmp}/run"], 2,
      "already holds a run; resume it with --resume"),
    C("train-out-holds-a-run", "train", _copy("train"), TRAIN + ["--out", "{tmp}/run"], 2,
      "already holds a run"),
    # bad options that only show when the run starts: nothing is left behind
    C("device-tpu", "search", _nothing, SEARCH + ["--device", "tpu", "--out", "{tmp}/out"], 2,
      "argument --device: 'tpu' is not a device"),
    C("device-not-there", "search", _nothing, SEARCH + ["--device", "cuda:99", "--out",
                                                        "{tmp}/out"], 2, "--device cuda:99",
      None, _absent),
    C("threads-negative", "search", _nothing, SEARCH + ["--threads", "-1"], 2,
      "argument --threads: -1 is out of range"),
    C("train-threads-negative", "train", _nothing, TRAIN + ["--threads", "-1"], 2,
      "argument --threads"),
    C("seed-negative", "search", _nothing, SEARCH + ["--seed", "-1"], 2, "argument --seed"),
    C("workers-absurd", "train", _nothing, TRAIN + ["--workers", "100000"], 2,
      "argument --workers"),
    C("steps-negative", "search", _nothing, SEARCH + ["--steps", "-5"], 2, "argument --steps"),
    C("fused-and-a-backend", "search", _nothing, SEARCH + ["--fused", "--backend", "native"], 2,
      "--fused and --backend native"),
    C("bad-data-folder", "search", _empty_dir, SEARCH + ["--train-dir", "{tmp}/empty", "--out",
                                                         "{tmp}/out"], 2, "contains no images",
      None, _absent),
    C("train-bad-genotype", "train", _nothing, TRAIN + ["--genotype", "{tmp}/none.json",
                                                        "--out", "{tmp}/out"], 2,
      "does not exist", None, _absent),
    # a latency table with times that are not times
    C("latency-table-nan", "search", _latency(lambda t: t["ops_ms"].update(conv_1x1=math.nan)),
      SEARCH + LAT + ["--out", "{tmp}/out"], 2, "lat.json", None, _absent),
    C("latency-table-zero", "search", _latency(lambda t: t["ops_ms"].update(conv_1x1=0)),
      SEARCH + LAT + ["--out", "{tmp}/out"], 2, "lat.json", None, _absent),
    C("latency-table-negative", "search",
      _latency(lambda t: t["ops_ms"].update(sep_conv_3x3=-1.0)),
      SEARCH + LAT + ["--out", "{tmp}/out"], 2, "lat.json", None, _absent),
    C("latency-table-infinity", "search", _latency(lambda t: t.update(fixed_ms=math.inf)),
      SEARCH + LAT + ["--out", "{tmp}/out"], 2, "lat.json", None, _absent),
    C("latency-table-sound", "search", _latency(lambda t: None),
      SEARCH + LAT + ["--out", "{tmp}/out"], 0, "", "out", _table_runs),
    # divergence: exit 3 at the step, the last good checkpoint kept
    C("search-diverges", "search", _nothing, SEARCH + ["--lr", "1e30", "--steps", "4",
                                                       "--ckpt-every", "1", "--out",
                                                       "{tmp}/out"], 3,
      "the training loss is nan at step 2", "out", _finite_checkpoint_at(1)),
    C("search-diverges-before-a-checkpoint", "search", _nothing,
      SEARCH + ["--lr", "1e30", "--steps", "4", "--out", "{tmp}/out"], 3,
      "at step 2: the run diverged", None, _absent),
    C("train-diverges", "train", _nothing, TRAIN + ["--lr", "1e30", "--steps", "4",
                                                    "--ckpt-every", "1", "--out", "{tmp}/out"],
      3, "at step 2", "out", _finite_checkpoint_at(1)),
    # resume: it keeps its word
    C("no-run-to-resume", "search", _nothing, ["--resume", "{tmp}/nothing"], 2,
      "no run to resume"),
    C("resume-a-file", "train", _file, ["--resume", "{tmp}/out"], 2, "no run to resume"),
    C("resume-a-foreign-folder", "search", _foreign_out, ["--resume", "{tmp}/out"], 2,
      "holds no run to resume"),
    C("resume-before-first-checkpoint", "search", _checkpoints("drop", "drop"),
      ["--resume", "{tmp}/run"], 2, "stopped before its first"),
    C("resume-steps-negative", "search", _copy("search"), ["--resume", "{tmp}/run", "--steps",
                                                           "-5"], 2, "argument --steps"),
    C("resume-steps-not-beyond", "search", _copy("search"), ["--resume", "{tmp}/run",
                                                             "--steps", "1"], 2,
      "already reached step 2"),
    C("resume-extends", "search", _copy("search"), ["--resume", "{tmp}/run", "--steps", "5",
                                                    "--quiet"], 0, "", "run", _extended),
    C("resume-same-options", "search", _copy("search"),
      ["--resume", "{tmp}/run"] + SEARCH + ["--steps", "2", "--out", "{tmp}/run"], 0, "",
      "run", _unchanged_run),
    C("resume-conflict", "search", _copy("search"), ["--resume", "{tmp}/run", "--channels",
                                                     "64"], 2,
      "--channels 64 (the run's: 8) conflict with the run's settings"),
    C("train-resume-conflict", "train", _copy("train"), ["--resume", "{tmp}/run", "--genotype",
                                                         "BETA21"], 2, "--genotype BETA21"),
    C("resume-other-out", "search", _copy("search"), ["--resume", "{tmp}/run", "--out",
                                                      "{tmp}/else"], 2, "--out"),
    C("resume-with-preset", "search", _copy("search"), ["--resume", "{tmp}/run", "--preset",
                                                        "paper"], 2, "--preset paper"),
    C("resume-turns-validation-on", "search", _copy("search"),
      ["--resume", "{tmp}/run", "--val-every", "1"], 2, "turning validation on or off"),
    C("truncated-checkpoint", "search", _checkpoints(_truncated),
      ["--resume", "{tmp}/run", "--steps", "3"], 0,
      "checkpoint.pt is cannot read checkpoint", "run", _fell_back),
    C("both-checkpoints-damaged", "search", _checkpoints(b"PK\x03\x04junk", b""),
      ["--resume", "{tmp}/run"], 2, "holds no readable checkpoint"),
    C("checkpoint-of-a-retraining", "search", _checkpoints(_train_checkpoint, "drop"),
      ["--resume", "{tmp}/run"], 2, "is a hdnas-train file"),
    C("checkpoint-foreign-dict", "search", _checkpoints(_plain_dict, "drop"),
      ["--resume", "{tmp}/run"], 2, "is not a checkpoint of a run (step None)"),
    C("checkpoint-foreign-dict-with-a-step", "search", _checkpoints(_dict_with_a_step, "drop"),
      ["--resume", "{tmp}/run"], 2, "does not fit the run"),
    C("checkpoint-garbage", "search", _checkpoints(os.urandom(300), "drop"),
      ["--resume", "{tmp}/run"], 2, "holds no readable checkpoint"),
    C("config-not-json", "search", _raw_config('{"schema": 2, "kind": "hdnas-se'),
      ["--resume", "{tmp}/run"], 2, "config.json: not valid JSON"),
    C("config-a-list", "search", _raw_config("[1, 2]"), ["--resume", "{tmp}/run"], 2,
      "is not a run's config"),
    C("config-wrong-type", "search", _edit_config(lambda r: r.update(channels="abc")),
      ["--resume", "{tmp}/run"], 2, "setting 'channels' is 'abc', expected int"),
    C("config-nan", "search", _edit_config(lambda r: r.update(lr=math.nan)),
      ["--resume", "{tmp}/run"], 2, "config.json"),
    C("config-negative-lr", "search", _edit_config(lambda r: r.update(lr=-1.0)),
      ["--resume", "{tmp}/run"], 2, "--lr must be > 0"),
    C("config-unknown-setting", "search", _edit_config(lambda r: r.update(evil=1)),
      ["--resume", "{tmp}/run"], 2, "unknown settings ['evil']"),
    C("config-other-network", "search", _edit_config(lambda r: r.update(channels=16)),
      ["--resume", "{tmp}/run"], 2, "does not fit the run"),
    C("train-config-other-genotype", "train",
      _edit_config(lambda r: r.update(genotype="BETA21"), "train"),
      ["--resume", "{tmp}/run"], 2, "does not fit the run"),
    C("truncated-checkpoint-then-a-conflict", "search", _checkpoints(_truncated),
      ["--resume", "{tmp}/run", "--channels", "16"], 2, "--channels 16"),
    C("symlink-in-the-run", "search", _symlinked_history,
      ["--resume", "{tmp}/run", "--steps", "3"], 0, "", "run", _link_replaced),
]


def _snapshot(root: Path) -> dict:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _changed(before: dict, after: dict) -> set:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def _run(cmd, args, tmp, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = MAINS[cmd]([a.replace("{tmp}", str(tmp)) for a in args])
    except SystemExit as e:  # noqa: PT017 - a command must not raise it, but say which case did
        pytest.fail(f"SystemExit({e.code}) instead of an exit status")
    return code, capsys.readouterr().err


@pytest.fixture
def sandbox(tmp_path, monkeypatch, base):
    monkeypatch.setenv("HDNAS_CACHE_DIR", str(base / "cache"))  # outside the snapshot
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_run(case, sandbox, base, capsys):
    tmp = sandbox
    case.setup(tmp, base)
    before = _snapshot(tmp)
    code, err = _run(case.cmd, case.args, tmp, capsys)
    assert code == case.code, err
    assert case.says in err, err
    if code:
        assert err.startswith("error: ") and "Traceback" not in err, err
    changed = _changed(before, _snapshot(tmp))
    allowed = case.may_change
    outside = {c for c in changed if allowed is None or not (c == allowed
                                                              or c.startswith(allowed + "/"))}
    assert not outside, f"changed outside {allowed or 'nothing'}: {sorted(outside)}"
    if case.check:
        case.check(tmp)


def _float_flags(cfg_cls) -> list[str]:
    hints = typing.get_type_hints(cfg_cls)
    out = []
    for f in dataclasses.fields(cfg_cls):
        default = getattr(cfg_cls(), f.name)
        if float in (hints[f.name], *typing.get_args(hints[f.name])) or (
                isinstance(default, list) and default and isinstance(default[0], float)):
            out.append("--" + f.name.replace("_", "-"))
    return out


NONFINITE = [(cmd, flag, v) for cmd, cls in (("search", SearchConfig), ("train", TrainConfig))
             for flag in _float_flags(cls) for v in ("nan", "inf", "-inf")]
OUT_OF_RANGE = [("search", "--lr", "0"), ("search", "--lr-gamma", "1.5"),
                ("search", "--lr-gamma", "0"), ("search", "--hfen", "-1"),
                ("search", "--penalty", "-1"), ("search", "--grad-clip", "-1"),
                ("search", "--budget", "0"), ("search", "--budget-ms", "0"),
                ("search", "--val-fraction", "1"), ("search", "--warmup-fraction", "2"),
                ("search", "--arch-fraction", "0"), ("search", "--lr-milestones", "1.5"),
                ("search", "--arch-lr", "0"), ("train", "--lr", "-1e-3"),
                ("train", "--weight-decay", "-1")]


def test_every_float_option_is_covered():
    assert {"--lr", "--lr-gamma", "--hfen", "--penalty", "--grad-clip", "--budget",
            "--budget-ms", "--warmup-fraction", "--val-fraction", "--arch-fraction",
            "--lr-milestones"} <= set(_float_flags(SearchConfig))


@pytest.mark.parametrize("cmd,flag,value", NONFINITE + OUT_OF_RANGE)
def test_float_options_are_finite_and_in_range(cmd, flag, value, sandbox, capsys):
    base = SEARCH if cmd == "search" else TRAIN
    before = _snapshot(sandbox)
    code, err = _run(cmd, base + [flag, value, "--out", "{tmp}/out"], sandbox, capsys)
    assert code == 2, err
    assert err.startswith(f"error: argument {flag}: "), err
    assert _snapshot(sandbox) == before


def test_a_failed_start_leaves_nothing_that_blocks_a_retry(sandbox, capsys, monkeypatch):
    """A start that fails on a bad environment variable (met at the first step, after
    config.json was written) leaves no trace: the same command then runs."""
    if "native" not in available_backends():
        pytest.skip("needs the native backend (its dense conv reads HDNAS_DENSE_CONV)")
    args = SEARCH[:SEARCH.index("--ops")] + ["--ops", "conv_1x1", "conv_3x3", "--quiet",
                                             "--val-every", "0", "--backend", "native",
                                             "--steps", "1", "--out", "{tmp}/out"]
    monkeypatch.setenv("HDNAS_DENSE_CONV", "bogus")
    code, err = _run("search", args, sandbox, capsys)
    assert code == 2 and "HDNAS_DENSE_CONV='bogus'" in err, err
    assert not (sandbox / "out").exists()
    monkeypatch.setenv("HDNAS_DENSE_CONV", "direct")
    code, err = _run("search", args, sandbox, capsys)
    assert code == 0, err


def test_no_traceback_but_with_debug(sandbox, base, capsys):
    _copy("search")(sandbox, base)
    (sandbox / "run" / "config.json").write_text("{")
    code, err = _run("search", ["--resume", "{tmp}/run"], sandbox, capsys)
    assert code == 2 and "Traceback" not in err
    with pytest.raises(ValueError, match="not valid JSON"):
        search_main(["--resume", str(sandbox / "run"), "--debug"])


def test_help_lists_the_resume_overrides_and_exit_statuses(capsys):
    assert search_main(["--help"]) == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps at hyphens too
    for needle in ("may be given other values: --steps, --log-every, --ckpt-every, "
                   "--val-every, --workers, --prefetch, --threads, --device, --debug-sync, "
                   "--cache-dir, --backend", "Exit status: 0 done; 2 bad options",
                   "3 the run diverged"):
        assert "".join(needle.split()) in text, needle
