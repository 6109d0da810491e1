"""No input file may run code: weights (hdnas.evaluate, hdnas.io.official) and run checkpoints
(--resume) are read with torch's safe loader; the full unpickler only with trust_pickle."""
import dataclasses
import fractions
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from hdnas.io import checkpoint
from hdnas.evaluate import main as evaluate_main
from hdnas.model.genotype import TINY18
from hdnas.model.network import DerivedNet
from hdnas.io.official import WeightsError, load_official_checkpoint, load_weights, read_state_dict
from hdnas.testing.shared import shared_dir

torch.set_num_threads(2)


class Payload:
    """Unpickling this calls ``Path(marker).touch()``: a stand-in for any code a file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def tiny_state():
    torch.manual_seed(0)
    return DerivedNet(TINY18).state_dict()


@pytest.fixture(params=["zip", "legacy"])
def payload(tmp_path, request):
    """A checkpoint with real weights and a payload, in torch's zip or legacy format."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "payload.pt"
    torch.save({"model": tiny_state(), "state_dict": tiny_state(), "step": 1,
                "extra": Payload(marker)}, path,
               _use_new_zipfile_serialization=request.param == "zip")
    return path, marker


def test_the_payload_really_runs_code_when_fully_unpickled(payload):
    path, marker = payload
    torch.load(path, weights_only=False)
    assert marker.exists()  # so the tests below would notice if it ran


def test_read_state_dict_refuses_payload(payload):
    path, marker = payload
    with pytest.raises(WeightsError, match=r"payload.pt: the safe loader .*refused.*full unpickler"
                                           r".*arbitrary code.*--trust-pickle"):
        read_state_dict(path)
    with pytest.raises(WeightsError, match="--trust-pickle"):
        load_official_checkpoint(path, TINY18)
    assert not marker.exists()


def test_refusal_names_the_offending_global(payload):
    path, _ = payload
    # Path.touch is pickled as getattr(Path, 'touch'): the message names getattr
    with pytest.raises(WeightsError, match=r"getattr"):
        read_state_dict(path)


def test_evaluate_cli_refuses_payload(tmp_path, payload, capsys):
    path, marker = payload
    rc = evaluate_main(["--genotype", "TINY18", "--weights", str(path), "--data", str(tmp_path),
                        "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and "--trust-pickle" in err and "full unpickler" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_pickled_module_needs_trust_pickle(tmp_path, capsys):
    torch.manual_seed(1)
    net = DerivedNet(TINY18)
    path = tmp_path / "module.pt"
    torch.save(net, path)  # a whole pickled nn.Module: harmless, but needs the full unpickler
    with pytest.raises(WeightsError, match=r"hdnas\.model\.network\.DerivedNet.*--trust-pickle"):
        read_state_dict(path)
    sd = read_state_dict(path, trust_pickle=True)
    assert set(sd) == set(net.state_dict())
    assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items())
    loaded = load_weights(DerivedNet(TINY18), path, trust_pickle=True)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())

    data = tmp_path / "Tiny"
    data.mkdir()
    img = np.kron(np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8),
                  np.ones((16, 16, 1), np.uint8))
    Image.fromarray(img).save(data / "a.png")
    args = ["--genotype", "TINY18", "--weights", str(path), "--data", str(data), "--quiet"]
    assert evaluate_main(args + ["--out", str(tmp_path / "o1")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert evaluate_main(args + ["--out", str(tmp_path / "o2"), "--trust-pickle"]) == 0
    assert (tmp_path / "o2" / "results.csv").is_file()


def test_checkpoint_load_refuses_payload(payload):
    path, marker = payload
    with pytest.raises(checkpoint.CheckpointError, match="refused.*trust_pickle=True") as e:
        checkpoint.load(path)
    assert isinstance(e.value, ValueError)  # cli_main turns it into "error: ..." and status 2
    assert not marker.exists()


def test_checkpoint_load_trust_pickle_reads_a_harmless_full_pickle(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"step": 4, "ratio": fractions.Fraction(1, 3)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="fractions.Fraction"):
        checkpoint.load(path)
    assert checkpoint.load(path, trust_pickle=True) == {"step": 4,
                                                        "ratio": fractions.Fraction(1, 3)}


def test_checkpoint_load_not_a_checkpoint(tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint at all")
    with pytest.raises(checkpoint.CheckpointError, match="text.pt: cannot read checkpoint: not a "
                                                         "torch.save file"):
        checkpoint.load(tmp_path / "text.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="empty.pt: cannot read checkpoint"):
        checkpoint.load(tmp_path / "empty.pt")
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "none.pt")


@pytest.mark.parametrize("command", ["search", "train"])
def test_resume_refuses_payload(tmp_path, capsys, command):
    """A run folder whose checkpoint.pt carries a payload: --resume stops with status 2."""
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    run.mkdir()
    if command == "search":
        from hdnas.engine.search import SearchConfig as Config
        from hdnas.search import main
        cfg = Config(channels=8, cells=3, batch=2, patch=32, steps=2, warmup=1, out=str(run))
    else:
        from hdnas.engine.train import TrainConfig as Config
        from hdnas.train import main
        cfg = Config(genotype="tiny18", batch=2, patch=32, steps=2, out=str(run))
    (run / "config.json").write_text(json.dumps({"resolved": dataclasses.asdict(cfg)}))
    torch.save({"step": 1, "model": {}, "x": Payload(marker)}, run / "checkpoint.pt")
    assert main(["--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "checkpoint.pt" in err and "the safe loader" in err
    assert not marker.exists()


def official_checkpoints():
    shared = shared_dir()
    return sorted((shared / "pretrained").glob("*.pt"))


@pytest.mark.parametrize("path", official_checkpoints() or [None],
                         ids=lambda p: p.name if p else "none")
def test_official_checkpoints_load_safely(path):
    if path is None:
        pytest.skip("no official checkpoint in ../shared/pretrained")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = read_state_dict(path)  # no trust_pickle
    assert set(sd) == set(obj["state_dict"])
    assert all(torch.equal(v, obj["state_dict"][k]) for k, v in sd.items())
