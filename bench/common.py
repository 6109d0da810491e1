"""What the benchmark scripts share: the line naming the machine a result ran on (from
``hdnas.machine``), the command line of a SuperNet-step benchmark, Markdown tables, the
interleaved timing loop, and printing / appending a result. Scripts that use it run as
``python -m bench.NAME`` from the repository root."""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from hdnas import machine

#: "wall" (time.perf_counter) or "cpu" (time.process_time: the CPU seconds of this process, all
#: its threads: on a machine shared with other jobs, the 1-thread cost without the time spent
#: waiting for a core)
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def machine_line(note: str = "") -> str:
    """'machine: CPU (vector ISA ...; note), N cores, torch V'."""
    isa = machine.vector_isa() + (f"; {note}" if note else "")
    return (f"machine: {machine.cpu_model()} (vector ISA {isa}), {os.cpu_count()} cores, "
            f"torch {torch.__version__}")


def started() -> str:
    """'<UTC date and time>; load average at start <1/5/15 min>'."""
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at start "
            f"{machine.load_average()}")


def supernet_parser(doc: str, channels: int = 24, cells: int = 3,
                    batch: int = 4) -> argparse.ArgumentParser:
    """The command line of a benchmark of SuperNet steps (described by the first line of
    ``doc``): --channels, --cells, --batch, and --out (append the result's Markdown there)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--channels", type=int, default=channels)
    p.add_argument("--cells", type=int, default=cells)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--out", help="append the table to this Markdown file")
    return p


def recompute_values(text: str) -> tuple:
    """A ``--recompute`` comma list (true, false, auto) as ``hdnas.darts.MixedOp`` values."""
    out = []
    for v in text.split(","):
        v = v.strip().lower()
        if v not in ("true", "false", "auto"):
            raise SystemExit(f"--recompute: true, false or auto, not {v!r}")
        out.append({"true": True, "false": False, "auto": "auto"}[v])
    return tuple(out)


def timeit(fns: dict, reps: int, warmup: int = 1, clock=time.perf_counter,
           prepare: dict | None = None) -> dict:
    """Interleaved timing (a, b, c, a, b, c, ...): {name: [seconds of each repetition]} after
    ``warmup`` untimed rounds. ``prepare``: {name: callable} run untimed before each call of
    that name (e.g. switching a shared network's mode)."""
    prepare = prepare or {}

    def call(name, f):
        if name in prepare:
            prepare[name]()
        t = clock()
        f()
        return clock() - t

    for _ in range(warmup):
        for k, f in fns.items():
            call(k, f)
    out = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            out[k].append(call(k, f))
    return out


def cell(v, nd: int = 3) -> str:
    """A table cell: '-' for nothing, lists joined, floats to ``nd`` significant digits."""
    if v is None or v == []:
        return "-"
    if isinstance(v, list):
        return "; ".join(map(str, v))
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.{nd}g}"
    return str(v)


def table(header, rows) -> list[str]:
    """A Markdown table (lines): the header, the rule, one line per row (cells by ``cell``)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return out


def emit(lines: list[str], out: str | None = None) -> str:
    """Ends a result with the load average, prints it and appends it to ``out`` (if given)."""
    md = "\n".join([*lines, "", f"load average at end {machine.load_average()}", ""])
    print(md)
    if out:
        with open(out, "a") as f:
            f.write(md + "\n")
    return md
