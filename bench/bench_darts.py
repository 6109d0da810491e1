"""DARTS benchmark: the DARTS mixed op and the whole DARTS search step, original vs swapped.

    OMP_WAIT_POLICY=PASSIVE python -m bench.bench_darts                  # CPU defaults below
    python -m bench.bench_darts --what step --backends reference,native --steps 3

Each configuration runs in a fresh process (so its peak RSS is its own): the original per-op loop
('reference', DARTS' code) and the swapped op per backend (merged, native, triton where it serves
the device; ``recompute`` on and off). Shapes default to DARTS' search: batch 64, C 16, 8 cells,
32x32 (the mixed op alone: C 16 at 32x32, stride 1 and 2). Reported per configuration:

* ``sec``: median seconds per iteration (mixed op: forward + backward; step: one first-order DARTS
  search step = architecture step on a validation batch + weight step), after one warm-up;
  ``user_sec`` / ``sys_sec``: the process's CPU time per iteration (less sensitive than wall time
  to other jobs on a shared machine; sys is mostly page faults of fresh allocations);
* ``peak_rss_mb``: the process's peak resident set (``ru_maxrss``), ``delta_mb``: that minus the
  resident set just before the timed iterations (model, data and libraries already loaded);
  on CUDA the peak allocated GPU memory instead;
* ``saved_mb`` (mixed op only): bytes of the distinct tensors autograd keeps for backward after
  one forward (``saved_tensors_hooks``; parameters not counted).

``--markdown FILE`` appends a table with the CPU model, vector ISA, torch version, date and load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench import common
from hdnas.testing.memory import saved_bytes


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def child(cfg: dict) -> dict:
    import hdnas.darts as hd
    from hdnas.darts.model_search import Network, make_architect, search_step

    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    B, C, S = cfg["batch"], cfg["C"], cfg["size"]
    swapped = cfg["backend"] != "reference"
    if cfg["what"] == "op":
        op = hd.PlainMixedOp(C, cfg["stride"]).to(device)
        if swapped:
            op = hd.MixedOp.from_module(op, cfg["backend"], cfg["recompute"])
        x = torch.randn(B, C, S, S, device=device, requires_grad=True)
        alpha = (1e-3 * torch.randn(len(op._ops), device=device)).requires_grad_()

        def run():
            y = op(x, torch.softmax(alpha, 0))
            y.sum().backward()

        res = {"saved_mb": saved_bytes(lambda: op(x, torch.softmax(alpha, 0))) / 2**20}
    else:
        model = Network(C, 10, cfg["layers"]).to(device)
        if swapped:
            hd.patch(model, backend=cfg["backend"], recompute=cfg["recompute"])
        arch = make_architect(model)
        opt = torch.optim.SGD(model.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
        data = [(torch.randn(B, 3, S, S, device=device), torch.randint(0, 10, (B,), device=device))
                for _ in range(2)]

        def run():
            search_step(model, arch, opt, data[0], data[1], 0.025)

        res = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _rss_mb()
    times = []
    for i in range(cfg["iters"] + 1):
        if i == 1:
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = _peak_mb(device)
    n = cfg["iters"]
    res.update(sec=statistics.median(times[1:]), peak_rss_mb=peak,
               user_sec=(ru1.ru_utime - ru0.ru_utime) / n, sys_sec=(ru1.ru_stime - ru0.ru_stime) / n,
               delta_mb=peak - (0 if device.type == "cuda" else base))
    return res


def machine_info() -> dict:
    from hdnas import machine
    return machine.describe()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", default="op,step", help="op, step or op,step")
    ap.add_argument("--backends", default=None,
                    help="comma list (default: reference,merged,native; plus triton on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--C", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (after 1 warm-up)")
    ap.add_argument("--no-recompute-too", action="store_true",
                    help="measure only recompute=True for the swapped backends")
    ap.add_argument("--markdown", default=None, help="append a Markdown table to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
        return
    backends = (a.backends.split(",") if a.backends else
                ["reference", "merged", "native"] + (["triton"] if a.device == "cuda" else []))
    rows = []
    for what in a.what.split(","):
        for stride in ((1, 2) if what == "op" else (None,)):
            for be in backends:
                for rec in ((None,) if be == "reference" else
                            ((True,) if a.no_recompute_too else (True, False))):
                    cfg = dict(what=what, stride=stride, backend=be, recompute=rec, device=a.device,
                               batch=a.batch, C=a.C, layers=a.layers, size=a.size, iters=a.iters)
                    p = subprocess.run([sys.executable, "-m", "bench.bench_darts", "--child",
                                        json.dumps(cfg)], capture_output=True, text=True)
                    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                    if p.returncode or not line:
                        res = {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
                    else:
                        res = json.loads(line[-1][7:])
                    row = {**cfg, **res}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if a.markdown:
        write_markdown(a.markdown, rows, machine_info(), a)


def write_markdown(path, rows_in, info, a):
    def ref_of(r):
        return next((q for q in rows_in if q["what"] == r["what"] and q["stride"] == r["stride"]
                     and q["backend"] == "reference" and "sec" in q), None)

    lines = [f"\n## {info['date']}: {info['cpu']} (vector ISA {info['vector_isa']}), "
             f"{info['cores']} cores, torch {info['torch']}, {info['threads']} threads, load "
             f"average {info['load_average']} at the end",
             "", f"batch {a.batch}, C {a.C}, {a.size}x{a.size}, step: {a.layers} cells, first "
             f"order; median of {a.iters} iterations after 1 warm-up; fresh process each.", ""]
    rows = []
    for r in rows_in:
        head = [r["what"], r["stride"] or "", r["backend"]]
        if "sec" not in r:
            rows.append(head + [r["recompute"], f"error: {r['error']}", "", "", "", "", "", ""])
            continue
        ref = ref_of(r)
        sp = f"{ref['sec'] / r['sec']:.2f}" if ref else ""
        mem = f"{ref['delta_mb'] / r['delta_mb']:.2f}" if ref and r["delta_mb"] > 0 else ""
        saved = f"{r['saved_mb']:.1f}" if "saved_mb" in r else ""
        cpu = (f"{r['user_sec']:.2f}+{r['sys_sec']:.2f}" if "user_sec" in r else "")
        rows.append(head + ["" if r["recompute"] is None else r["recompute"], f"{r['sec']:.3f}", sp,
                            cpu, f"{r['peak_rss_mb']:.0f}", f"{r['delta_mb']:.0f}", mem, saved])
    lines += common.table(["what", "stride", "backend", "recompute", "sec", "x ref speed",
                           "user+sys sec", "peak RSS MB", "delta MB", "ref delta / delta",
                           "saved MB"], rows)
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
