"""Versioned run files: config.json and checkpoint.pt carry the schema version and the kind; a
run folder from before versioning (schema 1) resumes; a newer version, or a run of the other
kind, is refused with a message naming the file and the versions."""
import dataclasses
import json

import pytest
import torch

from hdnas.engine.schema import SCHEMA, SchemaError, upgrade
from hdnas.engine.train import Train, TrainConfig
from hdnas.io import checkpoint
from hdnas.search import main as search_main
from hdnas.train import main as train_main

TRAIN = ["--genotype", "tiny18", "--batch", "2", "--patch", "32", "--log-every", "1",
         "--val-every", "0", "--quiet"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HDNAS_CACHE_DIR", str(tmp_path / "cache"))


def _edit(run, config=None, state=None):
    """Rewrite the run's config.json / checkpoint.pt through ``config(doc)`` / ``state(doc)``."""
    if config:
        path = run / "config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    if state:
        torch.save(state(checkpoint.load(run / "checkpoint.pt")), run / "checkpoint.pt")


def _unversioned(doc):
    """The file as it was written before versioning (schema 1)."""
    return {k: v for k, v in doc.items() if k not in ("schema", "kind")}


def test_the_version_and_kind_are_written(tmp_path):
    out = tmp_path / "run"
    assert train_main(TRAIN + ["--steps", "1", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert list(cfg)[:2] == ["schema", "kind"]
    assert (cfg["schema"], cfg["kind"]) == (SCHEMA, "hdnas-train") and SCHEMA == 2
    state = checkpoint.load(out / "checkpoint.pt")
    assert (state["schema"], state["kind"]) == (2, "hdnas-train")


def test_an_unversioned_run_folder_resumes(tmp_path):
    """A killed run written in schema 1 (no version) is resumed, and its next checkpoint is
    written in this schema."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(genotype="tiny18", batch=2, patch=32, steps=3, ckpt_every=2, log_every=1,
                      val_every=0, out=str(run))
    Train(cfg, run).run(stop_after=2, quiet=True)  # checkpoint at step 2, "killed"
    (run / "config.json").write_text(json.dumps({"given": {}, "resolved": dataclasses.asdict(cfg),
                                                 "environment": {}}))
    _edit(run, state=_unversioned)
    assert "schema" not in checkpoint.load(run / "checkpoint.pt")
    assert train_main(["--resume", str(run), "--quiet"]) == 0
    state = checkpoint.load(run / "checkpoint.pt")
    assert state["step"] == 3 and (state["schema"], state["kind"]) == (2, "hdnas-train")
    assert "resumed" in (run / "log.txt").read_text()


@pytest.mark.parametrize("file", ["config.json", "checkpoint.pt"])
def test_a_newer_version_is_refused(tmp_path, capsys, file):
    out = tmp_path / "run"
    assert train_main(TRAIN + ["--steps", "1", "--out", str(out)]) == 0
    newer = lambda d: d | {"schema": 3}  # noqa: E731
    _edit(out, *((newer, None) if file == "config.json" else (None, newer)))
    capsys.readouterr()
    assert train_main(["--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / file}: schema 3 (hdnas-train) is newer than this hdnas "
                          "reads (schema 1 to 2)"), err


def test_a_run_of_the_other_kind_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(TRAIN + ["--steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert search_main(["--resume", str(out), "--quiet"]) == 2
    assert (f"error: {out / 'config.json'} is a hdnas-train file (schema 2), not hdnas-search "
            "(schema 2): resume it with python -m hdnas.train") in capsys.readouterr().err
    _edit(out, _unversioned, _unversioned)  # schema 1: the kind is told by the contents
    assert search_main(["--resume", str(out), "--quiet"]) == 2
    assert "config.json is a hdnas-train file (schema 1)" in capsys.readouterr().err


def test_upgrade_migrates_step_by_step_and_refuses_what_it_cannot_read():
    v1 = {"step": 4, "a_opt": {}, "model": {}}
    assert upgrade(v1, "hdnas-search", "c.pt") == {"schema": 2, "kind": "hdnas-search", **v1}
    assert upgrade({"step": 1}, "hdnas-train", "c.pt")["kind"] == "hdnas-train"  # unknown: as asked
    with pytest.raises(SchemaError, match=r"c.pt is a hdnas-search file \(schema 1\), not "
                                          r"hdnas-train"):
        upgrade(v1, "hdnas-train", "c.pt")
    for bad in ("2", 0, True, 2.0):
        with pytest.raises(SchemaError, match=f"c.pt: schema {bad!r} .* is not a version"):
            upgrade({"schema": bad, "kind": "hdnas-train"}, "hdnas-train", "c.pt")
