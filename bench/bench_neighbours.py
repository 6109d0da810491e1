"""A search step beside busy neighbours: ``python -m hdnas.search`` quiet, beside one and beside two
single-core CPU hogs (``while True: pass`` processes), for

* ``today``: the command as it was before the thread governor (the reference backend and torch's
  default thread count, fixed: ``--backend reference --threads <CPUs>``),
* ``reference``: the plain loop with the governor (``--backend reference``),
* ``default``: the command's defaults (``--backend auto``, the governor),
* ``fixed``: the fast backend at a fixed full thread count (``--threads <CPUs>``), to show what
  the governor buys.

Each cell is the median seconds of the timed steps (``sec_per_step`` of ``history.csv``, logged
every step; the first step is not timed), each run in a fresh process; a run that exceeds
``--timeout`` is reported as '>T'. The thread count the governor chose is read from the run
log. ``OMP_WAIT_POLICY`` is left unset in the runs (the command's own default).

    python -m bench.bench_neighbours                       # C 24, 3 cells, batch 4, 4 steps
    python -m bench.bench_neighbours --channels 48 --cells 6 --out bench/results/cpu_neighbours.md
"""
from __future__ import annotations

import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit, machine_line, started, supernet_parser, table

HOG = "while True: pass"


def run_search(extra: list[str], args, tmp: Path, tag: str) -> tuple[float | None, str]:
    out = tmp / tag
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    cmd = [sys.executable, "-m", "hdnas.search", "--channels", str(args.channels), "--cells",
           str(args.cells), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--log-every", "1", "--ckpt-every", str(args.steps),
           "--val-every", "0", "--quiet", "--out", str(out), *extra]
    try:
        subprocess.run(cmd, env=env, timeout=args.timeout, check=True, capture_output=True)
    except subprocess.TimeoutExpired:
        return None, "-"
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{e.stderr.decode()[-2000:]}")
    rows = list(csv.DictReader((out / "history.csv").open()))
    secs = [float(r["sec_per_step"]) for r in rows[1:]] or [float(rows[0]["sec_per_step"])]
    log = (out / "log.txt").read_text()
    m = re.findall(r"threads: (?:(\d+) thread\(s\)|\d+ -> (\d+))", log)
    chosen = "/".join(a or b for a, b in m) or "?"
    return statistics.median(secs), chosen


def main(argv=None) -> int:
    p = supernet_parser(__doc__)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--hogs", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["today", "reference", "default", "fixed"])
    args = p.parse_args(argv)
    cpus = len(os.sched_getaffinity(0))
    variants = {"today": ["--backend", "reference", "--threads", str(cpus)],
                "reference": ["--backend", "reference"],
                "default": [],
                "fixed": ["--threads", str(cpus)]}
    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for n in args.hogs:
            hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n)]
            try:
                time.sleep(1.0)
                for v in args.variants:
                    sec, chosen = run_search(variants[v], args, tmp, f"{v}-{n}")
                    results[(v, n)] = (sec, chosen)
                    print(f"{n} hog(s) {v:9s} {sec if sec is not None else '>timeout'} s/step "
                          f"(threads {chosen})", file=sys.stderr, flush=True)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
    rows = []
    for v in args.variants:
        row = [f"`{v}`"]
        for n in args.hogs:
            sec, chosen = results[(v, n)]
            row.append(f"{sec:.2f} s ({chosen} thr)" if sec is not None else f">{args.timeout:.0f} s")
        quiet = results[(v, args.hogs[0])][0]
        one = results.get((v, 1), (None,))[0]
        row.append(f"{one / quiet:.2f}x" if quiet and one else "-")
        rows.append(row)
    lines = [f"## A search step beside busy neighbours ({started()})", "",
             machine_line(), "",
             f"`python -m hdnas.search --channels {args.channels} --cells {args.cells} --batch "
             f"{args.batch}`, median seconds per step over steps 2..{args.steps} (a fresh process "
             "per cell; the governor's thread choice in parentheses, changes as a/b):", ""]
    lines += table(["variant"] + [f"{n} hog(s)" for n in args.hogs] + ["1 hog / quiet"], rows)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
