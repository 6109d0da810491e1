"""DARTS benchmark: the DARTS mixed op and the whole DARTS search step, original vs swapped.

    python -m bench.bench_darts                                   # the table of BENCHMARKS.md
    python -m bench.bench_darts --what op --backends reference,merged,native
    python -m bench.bench_darts --what step --models darts --orders 2 --batches 32 --rounds 1

Each measurement runs in a fresh process (so its peak RSS is its own), with 1 intra-op thread by
default (``--threads``); ``--rounds`` alternates the original and the swapped configurations
(original, swapped, original, swapped, ...) so that both see the same machine. Step models:

* ``darts``: DARTS' own search code as quark0/darts writes it (``hdnas.testing.darts_reference``:
  its Network, alphas as plain tensors, ``new()``, and its Architect), first order
  (``--orders 1``) or second order (``2``: the unrolled model from ``new()`` and the
  finite-difference Hessian-vector product), one ``train_search`` step: the architecture step
  on a validation batch, then the weight step (gradient clipping, SGD with momentum);
* ``gdas`` / ``pcdarts``: the DARTS-layout ``hdnas.darts.model_search.Network`` with GDAS'
  hard Gumbel-softmax (only the sampled candidate of an edge runs) or PC-DARTS' partial channels
  (K 4, edge normalisation), first order.

The swapped configuration is the original plus ``hdnas.darts.patch(model)`` with its defaults
(backend 'fused': native on a CPU; ``recompute="auto"``: ``--recompute``; hdnas' caching CPU
allocator installed: ``--cpu-cache``). Shapes default to DARTS' search: C 16, 8 cells, 32x32,
batches 32 and 64 (the mixed op alone: C 16 at 32x32, stride 1 and 2, batch 64). Reported:

* ``sec``: seconds per iteration (mixed op: forward + backward; step: as above) after one
  warm-up, median over the ``--iters`` (default 3) iterations of the process; ``user_sec`` /
  ``sys_sec``: the process's CPU time per iteration;
* ``peak_rss_mb``: the process's peak resident set (``ru_maxrss``); ``delta_mb``: that minus the
  resident set just before the first iteration (model, data and libraries loaded): the memory
  the step itself takes, over the warm-up and every timed iteration (glibc's heap grows over
  the first steps: 1.7 GB after one second-order step, 2.5 GB after four, patched, without
  the caching allocator); on CUDA the peak allocated GPU memory instead;
* ``saved_mb`` (mixed op only): bytes of the distinct tensors autograd keeps for backward after
  one forward (``saved_tensors_hooks``; parameters not counted).

``--cpu-cache``: ``patch`` (default: the swapped configurations with hdnas' caching CPU allocator,
as ``patch`` installs it; the original without), ``off`` (``patch(..., cpu_cache=False)``: both on
glibc's malloc), ``original-too`` (also the original with the allocator: what it alone gives the
plain loop; ratios stay against the original on malloc).

``--malloc tuned``: every child, original and swapped alike, first calls
``hdnas.engine.allocator.tune()`` (glibc keeps freed memory for reuse: no heap trimming, no
mmap; what ``hdnas.search`` does), so the step pays no page faults for memory it freed.

``--malloc coalesce``: every child, original and swapped alike, runs with glibc's per-thread
cache and fast bins of small chunks off (``GLIBC_TUNABLES=glibc.malloc.tcache_count=0:
glibc.malloc.mxfast=0``): a freed small chunk merges with its free neighbours at once instead of
sitting, still marked in use, between large freed blocks, so the heap's freed tensor memory
coalesces and is reused rather than the heap growing (what ``docs/darts.md`` recommends for
the second-order step).

``--live-memory``: the children run with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` (every block of
64 KiB or more is its own mapping, returned to the system when freed), so the peak RSS follows
the peak of live memory rather than the heap's high-water mark; times of such a run are not
comparable (page faults). ``--markdown FILE`` appends a table with the CPU model, vector ISA, torch version, date and load;
ratios are against the original of the same round.
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
from hdnas.darts.patch import GLIBC_MEMORY_TUNABLES
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


def _darts_original(C, layers, device):
    """DARTS' own Network and Architect (quark0/darts, CPU-runnable port) on ``device``."""
    from hdnas.testing import darts_reference as ref

    model = ref.Network(C, 10, layers, torch.nn.CrossEntropyLoss()).to(device)
    model.alphas_normal = model.alphas_normal.detach().to(device).requires_grad_()
    model.alphas_reduce = model.alphas_reduce.detach().to(device).requires_grad_()
    model._arch_parameters = [model.alphas_normal, model.alphas_reduce]
    return model, ref.Architect(model)


def _step_runner(cfg, device, swapped):
    """One ``train_search`` step of the configured model (see the module docstring)."""
    import hdnas.darts as hd
    from hdnas.darts.model_search import Network, make_architect, search_step

    B, C, S = cfg["batch"], cfg["C"], cfg["size"]
    data = [(torch.randn(B, 3, S, S, device=device), torch.randint(0, 10, (B,), device=device))
            for _ in range(2)]
    if cfg["model"] == "darts":
        model, arch = _darts_original(C, cfg["layers"], device)
        if swapped:
            hd.patch(model, backend=cfg["backend"], recompute=cfg["recompute"],
                     cpu_cache=cfg.get("cpu_cache", True))
        opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
        unrolled = cfg["order"] == 2

        def run():  # DARTS' train_search.py, one step
            arch.step(*data[0], *data[1], 0.025, opt, unrolled=unrolled)
            arch.unrolled_models.clear()  # (the port keeps them for its tests)
            opt.zero_grad()
            loss = model._loss(*data[0])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
        return run
    model = Network(C, 10, cfg["layers"], weighting=cfg["model"]).to(device)
    if swapped:
        hd.patch(model, backend=cfg["backend"], recompute=cfg["recompute"],
                 cpu_cache=cfg.get("cpu_cache", True))
    arch = make_architect(model, unrolled=cfg["order"] == 2)
    opt = torch.optim.SGD(model.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    return lambda: search_step(model, arch, opt, data[0], data[1], 0.025)


def child(cfg: dict) -> dict:
    import hdnas.darts as hd

    if cfg.get("malloc") == "tuned":
        from hdnas.engine import allocator
        allocator.tune()
    if cfg.get("cpu_cache") and cfg["device"] == "cpu":
        from hdnas.mixed import cpu_cache
        cpu_cache.enable()
    torch.set_num_threads(cfg["threads"])
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
        run = _step_runner(cfg, device, swapped)
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


def _configs(a):
    """Every measurement, in run order: per case, ``rounds`` x (original, swapped ones)."""
    if a.backends:
        backends = a.backends.split(",")
    else:
        backends = ["reference", "fused"]
    for what in a.what.split(","):
        if what == "op":
            cases = [dict(what="op", model="", order=None, stride=st, batch=a.op_batch)
                     for st in (1, 2)]
        else:
            cases = [dict(what="step", model=m, order=o, stride=None, batch=b)
                     for b in (int(v) for v in a.batches.split(","))
                     for m in a.models.split(",")
                     for o in ((int(v) for v in a.orders.split(",")) if m == "darts" else (1,))]
        recs = list(common.recompute_values(getattr(a, "recompute", "auto")))
        if a.no_recompute_too and False not in recs:
            recs.append(False)
        cache = getattr(a, "cpu_cache", "patch")
        for case in cases:
            for rnd in range(a.rounds):
                for be in backends:
                    if be == "reference":
                        variants = [(None, False)]
                        if cache == "original-too":
                            variants.append((None, True))
                    else:
                        variants = [(r, cache != "off") for r in recs]
                    for rec, cached in variants:
                        yield dict(case, backend=be, recompute=rec, round=rnd, device=a.device,
                                   C=a.C, layers=a.layers, size=a.size, iters=a.iters,
                                   threads=a.threads, malloc=getattr(a, "malloc", "default"),
                                   cpu_cache=cached)



def child_env(live_memory: bool, malloc: str = "default") -> dict:
    """The children's environment: this one, plus glibc's 64 KiB mmap threshold for
    ``--live-memory`` and its small-chunk caches off for ``--malloc coalesce`` (appended to any
    ``GLIBC_TUNABLES`` already set)."""
    env = dict(os.environ)
    if live_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if malloc == "coalesce":
        env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), GLIBC_MEMORY_TUNABLES) if t)
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", default="op,step", help="op, step or op,step")
    ap.add_argument("--models", default="darts,gdas,pcdarts", help="step models (see above)")
    ap.add_argument("--orders", default="1,2", help="DARTS orders for the darts model")
    ap.add_argument("--batches", default="32,64", help="step batch sizes")
    ap.add_argument("--op-batch", type=int, default=64, help="batch of the mixed op alone")
    ap.add_argument("--backends", default=None,
                    help="comma list (default: reference,fused; e.g. reference,merged,native)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--C", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (after 1 warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of original and swapped")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of each process")
    ap.add_argument("--recompute", default="auto",
                    help="the swapped backends' recompute: comma list of auto, true, false")
    ap.add_argument("--no-recompute-too", action="store_true",
                    help="also measure the swapped backends with recompute=False")
    ap.add_argument("--cpu-cache", choices=("patch", "off", "original-too"), default="patch",
                    help="hdnas' caching CPU allocator: as patch() installs it (swapped only), "
                         "off, or for the original too (extra rows)")
    ap.add_argument("--live-memory", action="store_true",
                    help="children with MALLOC_MMAP_THRESHOLD_=65536 (glibc): peak RSS ~ peak live "
                         "memory; times not comparable")
    ap.add_argument("--malloc", choices=("default", "tuned", "coalesce"), default="default",
                    help="tuned: every child (original and swapped) first calls "
                         "hdnas.engine.allocator.tune() (glibc: no heap trimming, no mmap); "
                         "coalesce: every child runs with GLIBC_TUNABLES="
                         + GLIBC_MEMORY_TUNABLES + " (glibc's small-chunk caches off)")
    ap.add_argument("--markdown", default=None, help="append a Markdown table to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
        return
    rows = []
    env = child_env(a.live_memory, a.malloc)
    for cfg in _configs(a):
        p = subprocess.run([sys.executable, "-m", "bench.bench_darts", "--child", json.dumps(cfg)],
                           capture_output=True, text=True, env=env)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            res = {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            res = json.loads(line[-1][7:])
        rows.append({**cfg, **res})
        print(json.dumps(rows[-1]), flush=True)
    if a.markdown:
        write_markdown(a.markdown, rows, machine_info(), a)


_CASE = ("what", "model", "order", "stride", "batch", "round")


def write_markdown(path, rows_in, info, a):
    def ref_of(r):
        return next((q for q in rows_in if all(q[k] == r[k] for k in _CASE)
                     and q["backend"] == "reference" and not q.get("cpu_cache") and "sec" in q),
                    None)

    lines = [f"\n## {info['date']}: {info['cpu']} (vector ISA {info['vector_isa']}), "
             f"{info['cores']} cores, torch {info['torch']}, {a.threads} thread(s) per process, "
             f"load average {info['load_average']} at the end",
             "", f"C {a.C}, {a.size}x{a.size}, step: {a.layers} cells; {a.iters} timed "
             f"iteration(s) after 1 warm-up, fresh process each, original and swapped "
             f"alternating for {a.rounds} round(s)."
             + (" **Live-memory run** (`--live-memory`: MALLOC_MMAP_THRESHOLD_=65536, peak RSS "
                "~ peak live memory; times not comparable)." if a.live_memory else "")
             + (" **Tuned allocator** (`--malloc tuned`: every process, original and swapped, "
                "called `hdnas.engine.allocator.tune()` first)." if a.malloc == "tuned" else "")
             + (" **glibc's small-chunk caches off** (`--malloc coalesce`: every process, "
                f"original and swapped, ran with `GLIBC_TUNABLES={GLIBC_MEMORY_TUNABLES}`)."
                if a.malloc == "coalesce" else ""),
             ""]
    rows = []
    for r in rows_in:
        head = [r["what"], r["model"], r["order"] or "", r["stride"] or "", r["batch"],
                r["backend"], "" if r["recompute"] is None else r["recompute"],
                "yes" if r.get("cpu_cache") else "no", r["round"] + 1]
        if "sec" not in r:
            rows.append(head + [f"error: {r['error']}", "", "", "", "", "", ""])
            continue
        ref = ref_of(r)
        sp = f"{ref['sec'] / r['sec']:.2f}" if ref else ""
        mem = f"{r['delta_mb'] / ref['delta_mb']:.2f}" if ref and ref["delta_mb"] > 0 else ""
        saved = f"{r['saved_mb']:.1f}" if "saved_mb" in r else ""
        cpu = f"{r['user_sec']:.2f}+{r['sys_sec']:.2f}"
        rows.append(head + [f"{r['sec']:.3f}", sp, cpu, f"{r['peak_rss_mb']:.0f}",
                            f"{r['delta_mb']:.0f}", mem, saved])
    lines += common.table(["what", "model", "order", "stride", "batch", "backend", "recompute",
                           "CPU cache", "round", "sec", "x original speed", "user+sys sec",
                           "peak RSS MB", "delta MB", "delta / original's", "saved MB"], rows)
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
