"""python -m hdnas.export: the files it writes and its errors (the export functions:
tests/io/test_export_formats.py)."""
import json

import pytest
import torch

from hdnas.io import weights as weights_io
from hdnas.io.export import CHECK_TOLERANCE
from hdnas.export import main
from hdnas.model.genotype import Genotype
from hdnas.model.network import DerivedNet

torch.set_num_threads(2)

G = Genotype([["sep_conv_3x3", "conv_3x3", "dil_conv_3x3"]], [], channels=8, num_cells=2,
             name="tiny")


def _checkpoint(tmp_path):
    """An hdnas checkpoint of G's network."""
    torch.manual_seed(0)
    torch.save({"model": DerivedNet(G).state_dict()}, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


def test_cli_writes_safetensors_and_onnx(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    _checkpoint(tmp_path)
    G.save(tmp_path / "g.json")
    rc = main(["--genotype", str(tmp_path / "g.json"), "--weights", str(tmp_path / "ckpt.pt"),
               "--out", str(tmp_path / "x"), "--formats", "safetensors", "onnx", "--check"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out[out.index("{"):])
    assert report["onnx_max_abs_diff"] <= CHECK_TOLERANCE
    assert Genotype.load(tmp_path / "x" / "tiny.genotype.json") == G
    assert weights_io.read_genotype(tmp_path / "x" / "tiny.safetensors") == G
    assert (tmp_path / "x" / "tiny.onnx").stat().st_size > 1000
    # the exported safetensors carries its genotype: no --genotype needed
    assert main(["--weights", str(tmp_path / "x" / "tiny.safetensors"), "--out",
                 str(tmp_path / "y"), "--formats", "safetensors"]) == 0


def test_cli_bad_weights(tmp_path, capsys):
    _checkpoint(tmp_path)
    assert main(["--genotype", "TINY18", "--weights", str(tmp_path / "ckpt.pt"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "first mismatched tensor" in capsys.readouterr().err
