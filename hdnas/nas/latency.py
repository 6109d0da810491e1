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

A table is checked when it is written and when it is read (``check_table``): a JSON object with
``ops_ms`` an object of op name -> time, every time (``ops_ms``, ``fixed_ms``, ``parts_ms``) a
finite number > 0, ``channels`` / ``cells`` / ``scale`` integers in the genotype's bounds;
reading is bounded (``hdnas.safeio.read_json``: size, UTF-8, depth, no NaN/Infinity). A table that
fails is a ``LatencyTableError`` naming the file and the entry. ``measure_table`` refuses
``repeats`` < 1 and sizes beyond the image pixel limit.
"""
from __future__ import annotations

import datetime
import json
import math
import numbers
import platform
import random
import time
from pathlib import Path

import torch

from hdnas import machine
from hdnas.infer.run import pick_device
from hdnas.io.images import max_pixels
from hdnas.model.genotype import MAX_CELLS, MAX_CHANNELS, SCALES, Genotype
from hdnas.model.network import DerivedNet
from hdnas.model.space import DLSR_PRIMITIVES, check_op_set, get_op
from hdnas.safeio import read_json, write_atomic

__all__ = ["FORMAT", "LatencyTableError", "time_module", "measure_table", "load_table",
           "check_table", "save_table", "predict_ms", "random_genotype", "validate"]

#: a latency table is a few kB
MAX_TABLE_BYTES = 4 << 20

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
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
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
    device = pick_device(device)
    ops = check_op_set(ops)
    h, w = size
    _check_settings(channels, h, w, cells, scale, warmup, repeats)
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


def _check_settings(channels, h, w, cells, scale, warmup, repeats) -> None:
    for name, v, lo, hi in (("channels", channels, 4, MAX_CHANNELS), ("cells", cells, 2, MAX_CELLS),
                            ("warmup", warmup, 0, 10**6), ("repeats", repeats, 1, 10**6)):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {v!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if h * w > max_pixels():
        raise ValueError(f"size {w}x{h} is larger than the pixel limit {max_pixels():,} "
                         "(HDNAS_MAX_PIXELS)")


def _time_ms(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_table(t, source: str = "the latency table") -> dict:
    """``t`` if it is a well-formed latency table (module docstring), else LatencyTableError
    naming ``source`` and the entry at fault."""
    def bad(what):
        raise LatencyTableError(f"{source}: {what}; measure the table again with python -m "
                                "hdnas.latency")

    if not isinstance(t, dict) or t.get("format") != FORMAT or t.get("version") != VERSION:
        raise LatencyTableError(f"{source}: not a latency table (expected a JSON object of "
                                f"format {FORMAT!r} version {VERSION}; make one with python -m "
                                "hdnas.latency)")
    for key in ("ops_ms", "fixed_ms", "channels", "cells", "scale"):
        if key not in t:
            raise LatencyTableError(f"{source}: latency table misses {key!r}")
    ops = t["ops_ms"]
    if not isinstance(ops, dict) or not ops:
        bad("'ops_ms' is not an object of op name -> time in ms")
    for k, v in ops.items():
        if not _time_ms(v):
            bad(f"ops_ms[{k[:40]!r}] is {str(v)[:40]}, not a time in ms (a finite number > 0)")
    if not _time_ms(t["fixed_ms"]):
        bad(f"fixed_ms is {str(t['fixed_ms'])[:40]}, not a time in ms (a finite number > 0)")
    parts = t.get("parts_ms", {})
    if not isinstance(parts, dict) or not all(_time_ms(v) for v in parts.values()):
        bad("'parts_ms' is not an object of times in ms (finite numbers > 0)")
    for key, lo, hi in (("channels", 4, MAX_CHANNELS), ("cells", 2, MAX_CELLS)):
        v = t[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            bad(f"{key} is {str(v)[:40]}, not an integer in {lo}..{hi}")
    if t["scale"] not in SCALES or isinstance(t["scale"], bool):
        bad(f"scale is {str(t['scale'])[:40]}, not one of {SCALES}")
    lr = t.get("lr_size", [1, 1])
    if not (isinstance(lr, list) and len(lr) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in lr)):
        bad(f"lr_size is {str(lr)[:40]}, not [height, width]")
    return t


def load_table(path) -> dict:
    """A latency table file, read within bounds and checked (``check_table``)."""
    path = Path(path)
    t = read_json(path, "latency table", MAX_TABLE_BYTES, LatencyTableError)
    return check_table(t, str(path))


def save_table(table: dict, path, overwrite: bool = True) -> Path:
    """Check ``table`` and write it atomically (``overwrite=False`` refuses an existing file)."""
    check_table(table, f"the table for {path}")
    return write_atomic(path, json.dumps(table, indent=2, allow_nan=False) + "\n",
                        overwrite=overwrite)


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
    device = pick_device(device)
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
