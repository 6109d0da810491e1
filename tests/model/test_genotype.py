import json

import pytest
import torch

from hdnas.model.genotype import BETA21, Genotype, GenotypeError, derive
from hdnas.model.network import SuperNet


def test_round_trip(tmp_path):
    p = tmp_path / "g.json"
    BETA21.save(p)
    assert Genotype.load(p) == BETA21
    assert Genotype.load("beta21") == BETA21  # named genotypes resolve without a file


def test_derivation_follows_release():
    alphas = torch.zeros(3, 9)
    alphas[0, 0] = alphas[1, 6] = alphas[2, 5] = 1.0
    betas = [torch.tensor([0.2, 0.1]), torch.tensor([0.0, 0.3, 0.2]),
             torch.tensor([0.0, 0.5, 0.0, 0.4]), torch.tensor([0.0, 0.0, 0.0, 0.6, 0.7])]
    g = derive(alphas, betas)
    assert g.cell_ops == (("conv_1x1", "sep_conv_7x7", "sep_conv_5x5"),)
    assert g.inputs == ((0, 1), (1, 2), (1, 3), (4, 3))  # strongest first


def test_supernet_genotype_is_valid():
    torch.manual_seed(0)
    g = SuperNet(C=8).genotype()
    Genotype.from_dict(json.loads(json.dumps(g.to_dict())))


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(cell_ops=[["conv_1x1", "conv_2x2", "conv_1x1"]]), "unknown op 'conv_2x2'"),
    (lambda d: d.update(cell_ops=[["conv_1x1"]]), "needs 3 op names"),
    (lambda d: d.update(inputs=[[0, 1]]), "needs 4 pairs"),
    (lambda d: d.update(inputs=[[0, 0], [1, 2], [1, 3], [3, 4]]), "two different"),
    (lambda d: d.update(inputs=[[0, 2], [1, 2], [1, 3], [3, 4]]), "earlier cells"),
    (lambda d: d.update(scale=5), "scale 5"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(format="other"), "not a genotype"),
    (lambda d: d.update(extra=1), "unknown genotype fields"),
    (lambda d: d.pop("inputs"), "misses fields"),
    (lambda d: d.update(channels="many"), "channels"),
])
def test_malformed(mutate, match):
    d = BETA21.to_dict()
    mutate(d)
    with pytest.raises(GenotypeError, match=match):
        Genotype.from_dict(d)


def test_bad_files(tmp_path):
    with pytest.raises(GenotypeError, match="does not exist"):
        Genotype.load(tmp_path / "missing.json")
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(GenotypeError, match="not valid JSON"):
        Genotype.load(p)
