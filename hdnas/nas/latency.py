"""Latency tables for latency-aware search: measured op and fixed-part latencies on a device.

    python -m hdnas.latency --device cpu --channels 48 --size 640x360 --out latency_cpu.json
    python -m hdnas.latency --device cpu --channels 48 --size 160x96 --validate 10 --out t.json

The table holds, in milliseconds for one image of LR size ``--size`` (W x H, batch 1,
``torch.no_grad``, eval mode, float32), the minimum over ``--repeats`` timed runs after
``--warmup`` runs of

* ``ops_ms``: every candidate op of ``--ops`` (default: the DLSR set) at ``--channels``, alone on a
  (1, C, H, W) input;
* ``fixed_ms``: the derived network of ``--cells`` cells at ``--scale`` whose searchable ops are
  all ``skip_connect`` (identity), i.e. everything but the searchable ops: head conv, each cell's
  distillation convs, residual adds and activations, 3x3 conv, concat, 1x1 fuse and ESA, the
  cell-input 1x1 convs, global concat, LR conv and upsampler; ``parts_ms`` breaks it down (for
  reading only: parts timed alone do not add up exactly to the whole);

plus the device, its name, torch/Python versions, thread count and date. The minimum is used
because other processes only ever add time. A derived network's predicted latency is
``fixed_ms + sum over cells and steps of ops_ms[op]`` (``predict_ms``); ``hdnas.nas.losses.
LatencyPenalty`` is its expectation under softmax(alpha). ``--validate N`` measures N random
genotypes' derived networks and reports predicted vs measured (mean and max relative error).
"""
from __future__ import annotations

import datetime
import json
import math
import platform
import random
import time
from pathlib import Path

import torch

from hdnas import machine
from hdnas.model.genotype import Genotype
from hdnas.model.network import DerivedNet
from hdnas.model.space import DLSR_PRIMITIVES, check_op_set, get_op

__all__ = ["FORMAT", "LatencyTableError", "time_module", "measure_table", "load_table",
           "predict_ms", "random_genotype", "validate"]

FORMAT = "hdnas-latency"
VERSION = 1


class LatencyTableError(ValueError):
    """A latency table that is malformed or does not fit the search it is used for."""


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_module(module: torch.nn.Module, x: torch.Tensor, warmup: int = 2,
                repeats: int = 5) -> float:
    """Minimum wall time in ms of ``module(x)`` over ``repeats`` runs after ``warmup`` runs."""
    module.eval()
    for _ in range(warmup):
        module(x)
    _sync(x.device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        module(x)
        _sync(x.device)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _chain_inputs(cells: int):
    return [[i - 1, i] for i in range(1, cells - 1)]


def fixed_genotype(C: int, cells: int, scale: int) -> Genotype:
    return Genotype([["skip_connect"] * 3], _chain_inputs(cells), channels=C, scale=scale,
                    num_cells=cells, name="fixed-part")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return machine.cpu_model()


def measure_table(device="cpu", channels: int = 48, size=(360, 640), ops=DLSR_PRIMITIVES,
                  cells: int = 6, scale: int = 2, warmup: int = 2, repeats: int = 5,
                  log=None) -> dict:
    """The latency table (see the module docstring); ``size`` is the LR (H, W)."""
    device = torch.device(device)
    ops = check_op_set(ops)
    h, w = size
    torch.manual_seed(0)
    feat = torch.randn(1, channels, h, w, device=device)
    table = {"format": FORMAT, "version": VERSION, "device": device.type,
             "device_name": device_name(device), "cpu_isa": machine.vector_isa(),
             "torch": torch.__version__, "python": platform.python_version(),
             "threads": torch.get_num_threads(),
             "date": datetime.datetime.now().isoformat(timespec="seconds"),
             "load_avg": machine.load_average(),
             "channels": channels, "lr_size": [h, w], "cells": cells, "scale": scale,
             "warmup": warmup, "repeats": repeats, "stat": "min", "ops_ms": {}}
    for name in ops:
        table["ops_ms"][name] = time_module(get_op(name).build(channels).to(device), feat,
                                            warmup, repeats)
        if log:
            log(f"{name:>14}: {table['ops_ms'][name]:.3f} ms")
    net = DerivedNet(fixed_genotype(channels, cells, scale)).to(device)
    x = torch.rand(1, 3, h, w, device=device) * 255
    table["fixed_ms"] = time_module(net, x, warmup, repeats)
    cell = net.B1
    table["parts_ms"] = {
        "fea_conv": time_module(net.fea_conv, x, warmup, repeats),
        "cell_fixed (one cell with skip ops, ESA included)": time_module(cell, feat, warmup,
                                                                         repeats),
        "esa": time_module(cell.esa, feat, warmup, repeats),
        "upsampler": time_module(net.upsampler, feat, warmup, repeats),
    }
    if log:
        log(f"{'fixed part':>14}: {table['fixed_ms']:.3f} ms")
    return table


def load_table(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LatencyTableError(f"latency table {path} does not exist")
    try:
        t = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LatencyTableError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(t, dict) or t.get("format") != FORMAT or t.get("version") != VERSION:
        raise LatencyTableError(f"{path}: not a latency table (expected format {FORMAT!r} "
                                f"version {VERSION}; make one with python -m hdnas.latency)")
    for key in ("ops_ms", "fixed_ms", "channels", "cells", "scale"):
        if key not in t:
            raise LatencyTableError(f"{path}: latency table misses {key!r}")
    return t


def predict_ms(table: dict, genotype: Genotype) -> float:
    """The table's latency of a derived network: the fixed part plus each cell's three ops."""
    missing = sorted({n for i in range(genotype.num_cells) for n in genotype.ops_of_cell(i)}
                     - set(table["ops_ms"]))
    if missing:
        raise LatencyTableError(f"the latency table has no entry for {missing}")
    return table["fixed_ms"] + sum(table["ops_ms"][n] for i in range(genotype.num_cells)
                                   for n in genotype.ops_of_cell(i))


def random_genotype(rng: random.Random, ops, C: int, cells: int, scale: int) -> Genotype:
    """Uniform ops per cell and step (one row per cell) and uniform predecessor pairs."""
    rows = [[rng.choice(ops) for _ in range(3)] for _ in range(cells)]
    inputs = [rng.sample(range(c - 1), 2) for c in range(3, cells + 1)]
    return Genotype(rows, inputs, channels=C, scale=scale, num_cells=cells)


def validate(table: dict, n: int = 10, seed: int = 0, device="cpu", warmup: int = 2,
             repeats: int = 5) -> dict:
    """Predicted vs measured latency of ``n`` random derived networks at the table's size."""
    device = torch.device(device)
    rng = random.Random(seed)
    h, w = table["lr_size"]
    x = torch.rand(1, 3, h, w, device=device) * 255
    rows = []
    for _ in range(n):
        g = random_genotype(rng, sorted(table["ops_ms"]), table["channels"], table["cells"],
                            table["scale"])
        measured = time_module(DerivedNet(g).to(device), x, warmup, repeats)
        predicted = predict_ms(table, g)
        rows.append({"cell_ops": [list(r) for r in g.cell_ops], "inputs": [list(p) for p in g.inputs],
                     "predicted_ms": predicted, "measured_ms": measured,
                     "rel_error": (predicted - measured) / measured})
    errs = [abs(r["rel_error"]) for r in rows]
    return {"n": n, "seed": seed, "mean_abs_rel_error": sum(errs) / n,
            "max_abs_rel_error": max(errs), "rows": rows}
