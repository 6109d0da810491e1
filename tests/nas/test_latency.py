"""Latency tables and the latency penalty (expected latency under softmax(alpha), with a
gradient), used with a SuperNet as the search uses it."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

from hdnas.model.genotype import Genotype
from hdnas.latency import main
from hdnas.nas.latency import (LatencyTableError, load_table, measure_table, predict_ms,
                           random_genotype, validate)
from hdnas.nas.losses import LatencyPenalty
from hdnas.model.network import SuperNet
from hdnas.model.space import DLSR_PRIMITIVES

torch.set_num_threads(2)
OPS = ("conv_1x1", "conv_3x3", "sep_conv_3x3", "dil_conv_3x3")


def fake_table(cells=3, channels=8, seed=0):
    """A table with made-up but distinct latencies (no timing: the penalty tests are exact)."""
    rng = random.Random(seed)
    return {"format": "hdnas-latency", "version": 1, "channels": channels, "cells": cells,
            "scale": 2, "lr_size": [20, 24], "fixed_ms": 3.0 + rng.random(),
            "ops_ms": {n: 0.1 + rng.random() for n in DLSR_PRIMITIVES}}


def test_measured_table_has_every_op_and_the_fixed_part():
    t = measure_table("cpu", channels=8, size=(20, 24), ops=OPS, cells=3, warmup=1, repeats=2)
    assert set(t["ops_ms"]) == set(OPS) and all(v > 0 for v in t["ops_ms"].values())
    assert t["fixed_ms"] > 0 and t["device"] == "cpu" and t["device_name"]
    assert t["torch"] == torch.__version__ and t["lr_size"] == [20, 24]
    # a network is slower than its fixed part alone on average (the ops add work); min of reps
    assert t["fixed_ms"] > t["parts_ms"]["fea_conv"]


def test_predict_sums_fixed_part_and_every_cells_ops():
    t = fake_table()
    g = Genotype([["conv_1x1", "conv_3x3", "sep_conv_3x3"], ["conv_1x1"] * 3,
                  ["dil_conv_3x3"] * 3], [[0, 1]], channels=8, num_cells=3)
    want = t["fixed_ms"] + sum(t["ops_ms"][n] for row in g.cell_ops for n in row)
    assert predict_ms(t, g) == pytest.approx(want, rel=1e-12)
    del t["ops_ms"]["dil_conv_3x3"]
    with pytest.raises(LatencyTableError, match="no entry for.*dil_conv_3x3"):
        predict_ms(t, g)


@pytest.mark.parametrize("per_cell", [False, True])
def test_penalty_on_a_supernet_is_the_expected_latency_with_a_gradient(per_cell):
    t = fake_table()
    torch.manual_seed(0)
    net = SuperNet(C=8, num_cells=3, op_names=OPS, alpha_per_cell=per_cell)
    pen = LatencyPenalty(t, OPS, weight=1.0, budget_ms=1.0, channels=8)
    # with (almost) one-hot alphas the expectation is the derived network's predicted latency
    with torch.no_grad():
        net.alphas.copy_(50 * F.one_hot(torch.randint(len(OPS), net.alphas.shape[:-1]),
                                        len(OPS)).float())
    assert pen.expected_total(net.alphas, net.num_cells).item() == \
        pytest.approx(predict_ms(t, net.genotype()), rel=1e-6)
    # a real gradient, equal to finite differences (double precision)
    a = (0.3 * torch.randn(net.alphas.shape)).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pen.expected_total(x, net.num_cells), (a,))
    net.alphas.data.normal_(0, 1e-3)
    loss = pen(net.alphas, net.num_cells)
    loss.backward()
    assert net.alphas.grad is not None and net.alphas.grad.abs().sum() > 0
    assert all(b.grad is None for b in net.betas)
    # gradient steps on the penalty alone move every step's argmax to the fastest op
    opt = torch.optim.SGD([net.alphas], lr=5.0)
    for _ in range(50):
        opt.zero_grad()
        pen(net.alphas, net.num_cells).backward()
        opt.step()
    fastest = min(OPS, key=lambda n: t["ops_ms"][n])
    assert set(n for row in net.genotype().cell_ops for n in row) == {fastest}


def test_budget_hinge_is_free_under_the_budget():
    t = fake_table()
    alphas = torch.zeros(3, len(OPS), requires_grad=True)
    expected = float(LatencyPenalty(t, OPS).expected_total(alphas, 3).detach())
    under = LatencyPenalty(t, OPS, weight=2.0, budget_ms=expected * 1.1)
    over = LatencyPenalty(t, OPS, weight=2.0, budget_ms=expected / 2)
    assert float(under(alphas, 3).detach()) == 0.0
    assert float(over(alphas, 3).detach()) == pytest.approx(2.0 * (expected / (expected / 2) - 1))
    over(alphas, 3).backward()
    assert alphas.grad.abs().sum() > 0
    # without a budget: the release's normalised form on latencies
    free = LatencyPenalty(t, OPS, weight=1.0)
    per_op = torch.tensor([t["ops_ms"][n] for n in OPS])
    assert float(free(alphas, 3).detach()) == pytest.approx(float(3 * per_op.mean() / per_op.sum()))


def test_table_must_fit_the_search(tmp_path):
    t = fake_table(cells=3)
    with pytest.raises(LatencyTableError, match="measured at 8 channels, the search uses 48"):
        LatencyPenalty(t, OPS, channels=48)
    with pytest.raises(LatencyTableError, match="fixed part is for 3 cells, the network has 6"):
        LatencyPenalty(t, OPS, budget_ms=5).expected_total(torch.zeros(3, len(OPS)), 6)
    del t["ops_ms"]["conv_3x3"]
    with pytest.raises(LatencyTableError, match="no entry for the ops.*conv_3x3"):
        LatencyPenalty(t, OPS)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(LatencyTableError, match="not a latency table"):
        LatencyPenalty(str(tmp_path / "bad.json"), OPS)
    with pytest.raises(LatencyTableError, match="does not exist"):
        load_table(tmp_path / "none.json")


def test_random_genotypes_are_valid_and_varied():
    rng = random.Random(1)
    gs = [random_genotype(rng, OPS, 8, 6, 2) for _ in range(10)]
    assert len({g.cell_ops for g in gs}) == 10


def test_cli_writes_a_table_and_validates(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["--channels", "8", "--size", "24x20", "--cells", "3", "--ops", *OPS,
                 "--warmup", "1", "--repeats", "2", "--validate", "2", "--out", str(out)]) == 0
    t = load_table(out)
    assert t["lr_size"] == [20, 24] and len(t["validation"]["rows"]) == 2
    v = validate(t, n=1, seed=3, warmup=0, repeats=1)
    assert v["rows"][0]["measured_ms"] > 0 and v["max_abs_rel_error"] >= 0
    assert "mean |rel. error|" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--size", "10x10", "--out", str(out)])
