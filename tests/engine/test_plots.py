"""The pictures of a run (hdnas.engine.plots) and python -m hdnas.visualize: a search and a
retraining run folder of many logged rows and of one row give the expected PNG files, decodable,
of sane sizes, a single point drawn as a visible marker; the command redraws a run folder, draws
a genotype file or a released name, and refuses what it cannot draw with error: (exit 2)."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from hdnas.engine.plots import PlotError, plot_run
from hdnas.model.genotype import NAMED
from hdnas.visualize import main

OPS = ["conv_1x1", "sep_conv_3x3", "dil_conv_3x3"]
BLUE = (0x1f, 0x77, 0xb4)  # matplotlib's first colour (C0)


def _run(folder, rows: int, cells: int = 4, per_cell: bool = False, kind: str = "hdnas-search",
         genotype=True):
    """A run folder as search / train leave it: config.json, history.csv (``rows`` rows),
    genotype.json."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    search = kind == "hdnas-search"
    resolved = {"ops": OPS, "cells": cells, "steps": 10 * rows, "warmup": None,
                "warmup_fraction": 0.25} if search else {"genotype": "TINY18"}
    (folder / "config.json").write_text(json.dumps({"kind": kind, "resolved": resolved}))
    n_alpha = (cells if per_cell else 1) * 3 * len(OPS)
    cols = ["step", "lr", "loss_train", "sec_per_step"]
    if search:
        cols += ["loss_arch", "penalty", "sec_weight_step", "sec_arch_step"] \
            + [f"alpha_{i}" for i in range(n_alpha)] \
            + [f"beta{c}_{j}" for c in range(3, cells + 1) for j in range(c - 1)]
    cols += ["val_psnr", "val_ssim"]
    lines = [",".join(cols)]
    drift = rng.normal(size=len(cols)) * 1e-3
    for r in range(rows):
        step = 10 * (r + 1)
        v = {"step": step, "lr": 5e-4 * 0.5 ** (r * 4 // max(rows, 1)),
             "loss_train": 40 * math.exp(-r / 50) + rng.random(), "sec_per_step": 0.3,
             "loss_arch": "nan" if step <= 2.5 * rows else 35 * math.exp(-r / 50),
             "penalty": 1 - r / (rows + 1), "sec_weight_step": 0.12,
             "sec_arch_step": "nan" if step <= 2.5 * rows else 0.17,
             "val_psnr": 20 + r / 10 if r % 5 == 4 or rows == 1 else "",
             "val_ssim": 0.5 + r / 1000 if r % 5 == 4 or rows == 1 else ""}
        lines.append(",".join(str(v.get(c, drift[k] * r)) for k, c in enumerate(cols)))
    (folder / "history.csv").write_text("\n".join(lines) + "\n")
    if genotype:
        NAMED["TINY18"].save(folder / "genotype.json")
    return folder


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert 500 <= im.width <= 4000 and 250 <= im.height <= 4000, (path.name, im.size)
        return np.asarray(im.convert("RGB"))


def _blue_pixels(img: np.ndarray) -> int:
    return int((np.abs(img.astype(int) - BLUE).sum(-1) < 30).sum())


def test_search_run_of_many_rows(tmp_path):
    run = _run(tmp_path / "run", rows=120)
    names = [p.name for p in plot_run(run)]
    assert names == ["alpha.png", "beta.png", "val.png", "curves.png", "network.png"]
    for n in names:
        _png(run / n)
    # beta: one panel per cell 3..4; curves: four panels (loss, penalty, lr, time)
    assert _png(run / "curves.png").shape[0] > _png(run / "val.png").shape[0] * 2


def test_one_row_draws_visible_markers(tmp_path):
    run = _run(tmp_path / "run", rows=1, cells=3, per_cell=True, genotype=False)
    names = [p.name for p in plot_run(run)]
    assert names == ["alpha.png", "beta.png", "val.png", "curves.png"]
    for n in ("alpha.png", "beta.png", "curves.png"):
        assert _blue_pixels(_png(run / n)) > 40, n  # a marker, not an empty box
    assert _png(run / "alpha.png").shape[0] > 800  # --alpha-per-cell: a row of panels per cell
    # val.png: the PSNR point is under the red star of the best score
    img = _png(run / "val.png")
    red = (np.abs(img.astype(int) - (0xd6, 0x27, 0x28)).sum(-1) < 30).sum()
    assert red > 40


def test_visualize_command(tmp_path, capsys, monkeypatch):
    train = _run(tmp_path / "train", rows=1, kind="hdnas-train", genotype=False)
    assert main([str(train)]) == 0  # a retraining run: no alpha / beta
    assert capsys.readouterr().out.split() == [str(train / "val.png"), str(train / "curves.png")]
    monkeypatch.chdir(tmp_path)
    assert main(["tiny18"]) == 0 and capsys.readouterr().out.strip() == "tiny18.png"
    _png(tmp_path / "tiny18.png")
    assert main(["TINY18"]) == 2  # exists: refused without --overwrite
    assert "tiny18.png already exists (--overwrite replaces it)" in capsys.readouterr().err
    NAMED["BETA21"].save(tmp_path / "g.json")
    assert main([str(tmp_path / "g.json"), "--out", str(tmp_path / "net.svg")]) == 0
    assert (tmp_path / "net.svg").read_text().lstrip().startswith("<?xml")
    capsys.readouterr()
    for argv, message in (([str(tmp_path / "nope")], "no run folder, genotype file"),
                          ([str(train / "config.json")], "not a genotype"),
                          ([str(train), "--out", "x.png"], "--out is for a genotype")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    (train / "history.csv").write_text("step\n")
    with pytest.raises(PlotError, match="has no history yet"):
        plot_run(train)
    # alpha columns neither shared nor one set per cell of config.json: refused, nothing drawn
    run = _run(tmp_path / "odd", rows=1, cells=3, per_cell=True, genotype=False)
    doc = json.loads((run / "config.json").read_text())
    doc["resolved"]["cells"] = 5
    (run / "config.json").write_text(json.dumps(doc))
    with pytest.raises(PlotError, match="27 alpha columns do not fit 3 ops x 3 steps"):
        plot_run(run)
    assert not list(run.glob("*.png"))
