"""Choices made by timing (the merged dense conv's route, hdnas.mixed.dense) belong to the run:
saved in each checkpoint and timed_choices.json, adopted again by --resume (so a resumed run
takes the same routes, whatever the machine measures now), and fixed up front by
--deterministic (nothing timed)."""
import json

import pytest
import torch

from hdnas.mixed import dense
from hdnas.search import main

TINY = ["--channels", "8", "--cells", "3", "--batch", "2", "--patch", "32", "--warmup", "0",
        "--ops", "conv_5x5", "sep_conv_3x3", "--quiet", "--val-every", "0", "--backend", "native"]


@pytest.fixture
def timed(monkeypatch):
    """The timed route, with a fresh decision table; restored afterwards."""
    monkeypatch.setenv("HDNAS_DENSE_CONV", "auto")
    saved = dense.choices()
    monkeypatch.setattr(dense, "_choices", {})
    yield
    dense.pin(None)
    dense._choices.update(saved)


def _no_timing(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a route was timed")
    monkeypatch.setattr(dense, "_time", refuse)


def test_export_and_load_round_trip(timed):
    key = ((2, 8, 16, 16), (8, 8, 5, 5), torch.float32, True, 1)
    dense._choices[key] = "fft"
    records = json.loads(json.dumps(dense.export_choices()))
    dense._choices.clear()
    assert dense.load_choices(records) == 1 and dense.choices() == {key: "fft"}
    for bad in ([{"x": [1], "route": "fft"}], [{**records[0], "route": "slow"}],
                [{**records[0], "dtype": "nonsense"}]):
        with pytest.raises(ValueError, match="malformed"):
            dense.load_choices(bad)


def test_resume_adopts_the_runs_choices(tmp_path, timed, monkeypatch, nat):
    out = tmp_path / "run"
    assert main(TINY + ["--steps", "2", "--ckpt-every", "1", "--out", str(out)]) == 0
    saved = json.loads((out / "timed_choices.json").read_text())
    assert saved["dense_conv"] and not saved["deterministic"]
    # a resumed run must not time again: it adopts what the run chose
    dense._choices.clear()
    _no_timing(monkeypatch)
    assert main(["--resume", str(out), "--steps", "3"]) == 0
    assert {r["route"] for r in saved["dense_conv"]} >= set(dense.choices().values())
    assert len(dense.choices()) == len(saved["dense_conv"])


def test_deterministic_times_nothing(tmp_path, timed, monkeypatch, nat):
    _no_timing(monkeypatch)
    out = tmp_path / "det"
    assert main(TINY + ["--steps", "2", "--deterministic", "--out", str(out)]) == 0
    saved = json.loads((out / "timed_choices.json").read_text())
    assert saved == {"dense_conv": [], "deterministic": True}
    assert "timed choices pinned (--deterministic)" in (out / "log.txt").read_text()
