"""The obvious peer: ``torch.compile`` of the reference supernet (its forward; backward by
AOTAutograd), beside the eager reference and the fused backend (``--backend auto``), on one search weight step (forward, L1 loss, backward of
every weight and alpha/beta), same shapes, same process.

For each column: the time of the first call (for the compiled ones: compilation included), the
median step time after it, and the largest relative difference of the alpha gradient against the
eager reference in fp32 (same weights and batch). ``compiled+fused``: ``torch.compile`` around
the fused backend (its kernels are torch custom ops: the graph stays whole only if they trace
without breaks), to decide whether a ``--compile`` flag would pay.

``--whole-step``: what a ``--compile`` flag of ``python -m hdnas.search`` would buy (there is
none: BENCHMARKS.md, "compile peer"). Two searches of the engine (``hdnas.engine.search.Search``,
embedded data, ``--warmup 0``: every step has its architecture step), same seed and settings,
one eager and one whose steps call the supernet through ``torch.compile`` (``--compiler``; the
architecture step on a second graph without the weights' gradients, ``hdnas.nas.architect``),
their steps alternated in one process: the first step of each (for the compiled one: the
compilation), then the median of ``--reps`` whole steps (weight step + architecture step,
``--rule``) and of their two parts, the graph breaks Dynamo counted, and how far the compiled
run's alpha/beta are from the eager run's after the same steps.

    python -m bench.bench_compile                       # C 24, 3 cells, batch 4, LR 32x32
    python -m bench.bench_compile --channels 48 --cells 6 --out bench/results/cpu_compile.md
    python -m bench.bench_compile --whole-step --reps 10 --out bench/results/cpu_compile.md

``--profile-eager``: where an eager whole step spends its time (``torch.profiler``, self CPU
time of two steps): the share of the ops ``torch.compile`` can only call as they are (convs,
the native depthwise kernels, GEMMs, FFTs, pooling, resizing), against the elementwise ops,
copies and concatenations it could fuse.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import CLOCK, emit, machine_line, started, supernet_parser, table
from hdnas.engine.runtime import StepTimer
from hdnas.engine.search import Search, SearchConfig
from hdnas.mixed import dense, get_backend, resolve_backend
from hdnas.model.network import SuperNet
from hdnas.model.space import DLSR_PRIMITIVES


def step_fn(net, forward=None):
    """One weight step's arithmetic; ``forward``: the module to call (a compiled one)."""
    forward = net if forward is None else forward

    def step(x, y):
        net.zero_grad(set_to_none=True)
        loss = (forward(x) - y).abs().mean()
        loss.backward()
        return net.alphas.grad.detach().clone()
    return step


def measure(name, fn, x, y, reps, clock=time.perf_counter):
    t = clock()
    g = fn(x, y)
    first = clock() - t
    times = []
    for _ in range(reps):
        t = clock()
        fn(x, y)
        times.append(clock() - t)
    return {"name": name, "first": first, "step": statistics.median(times), "grad": g}


def _timed_step(search: Search) -> dict:
    """One whole search step: its time and its parts' (the engine's own timer, on its clock)."""
    timer = search.timer
    timer.reset()
    t = timer.clock()
    search.train_step()
    step = timer.clock() - t
    return {"step": step, "weight": timer.total["weight"], "arch": timer.total["arch"]}


def whole_step(a) -> list[str]:
    """``--whole-step``: an eager and a compiled search, steps alternated (module doc)."""
    runs, firsts, times, breaks = {}, {}, {}, 0
    for comp in (False, True):
        name = f"compiled ({a.compiler})" if comp else "eager"
        cfg = SearchConfig(channels=a.channels, cells=a.cells, batch=a.batch, patch=2 * a.lr_size,
                           steps=a.reps + 1, warmup=0, rule=a.rule, backend=a.backend,
                           threads=a.threads, val_every=0)
        out = Path(tempfile.mkdtemp(prefix="bench-compile-"))
        runs[name] = s = Search(cfg, out)
        if comp:  # the eager search's first step has timed the dense-conv routes of these
            # shapes: the compiled forward reads them (a route timed while tracing is a break)
            s.forward = s.architect.forward = torch.compile(s.model, backend=a.compiler,
                                                            dynamic=False)
        s.timer = StepTimer(s.device, clock=CLOCK[a.clock])
        s.start_data(0, cfg.steps)
        torch._dynamo.utils.counters.clear()
        t = time.perf_counter()  # wall time: inductor compiles in worker processes too
        firsts[name] = _timed_step(s) | {"step": time.perf_counter() - t}
        if comp:
            breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        times[name] = []
        print(f"{name}: first step {firsts[name]['step']:.1f} s", file=sys.stderr, flush=True)
    for _ in range(a.reps):
        for name, s in runs.items():
            times[name].append(_timed_step(s))
    eager, comp = runs.values()
    arch_diff = max(((x - y).abs().max() / y.abs().max()).item()
                    for x, y in zip(comp.model.arch_parameters(), eager.model.arch_parameters()))
    med = {n: {k: statistics.median(t[k] for t in ts) for k in ("step", "weight", "arch")}
           for n, ts in times.items()}
    base = med["eager"]["step"]
    rows = [[f"{n} {runs[n].backend.name}", f"{firsts[n]['step']:.1f} s", f"{m['step']:.3f} s",
             f"{m['weight']:.3f} s", f"{m['arch']:.3f} s", f"{base / m['step']:.2f}x"]
            for n, m in med.items()]
    saved = base - med[list(med)[1]]["step"]
    pays = (f"the compilation ({firsts[list(firsts)[1]]['step']:.0f} s, first step) is paid "
            f"back after ~{firsts[list(firsts)[1]]['step'] / saved:,.0f} steps" if saved > 0
            else "the compiled step is not faster: the compilation is never paid back")
    routes = sorted({r for r in dense.choices().values()}) or ["none timed"]
    clock = "CPU seconds of the process" if a.clock == "cpu" else "wall seconds"
    lines = [f"## torch.compile around the whole search step ({started()})", "", machine_line(
        f"{a.threads} thread(s)"), "",
        f"`python -m hdnas.search` steps (engine `Search`, embedded data, --warmup 0), C "
        f"{a.channels}, {a.cells} cells, x2, batch {a.batch}, LR {a.lr_size}x{a.lr_size}, fp32, "
        f"--rule {a.rule}, --backend {a.backend}; step = weight step + architecture step; median "
        f"of {a.reps} after the first, eager and compiled alternated, {clock}; dense-conv "
        f"route: {', '.join(routes)}:", ""]
    lines += table(["run", "first step", "step", "weight part", "arch part", "vs eager"], rows)
    lines += ["", f"Graph breaks in the compiled forward: {breaks}; {pays}; alpha/beta after "
              f"{a.reps + 1} steps, compiled vs eager: largest relative difference "
              f"{arch_diff:.1e}."]
    return lines


#: op names (substrings) that inductor calls as external kernels: it cannot fuse or speed them
EXTERN_OPS = ("conv", "dw_", "bmm", "mm", "fft", "matmul", "max_pool", "upsample")


def profile_eager(a) -> list[str]:
    """``--profile-eager``: the share of an eager whole step in ``EXTERN_OPS`` (module doc)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = SearchConfig(channels=a.channels, cells=a.cells, batch=a.batch, patch=2 * a.lr_size,
                       steps=6, warmup=0, rule=a.rule, backend=a.backend, threads=a.threads,
                       val_every=0)
    s = Search(cfg, Path(tempfile.mkdtemp(prefix="bench-compile-")))
    s.start_data(0, cfg.steps)
    for _ in range(2):
        s.train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            s.train_step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    extern = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in EXTERN_OPS))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    return [f"## Where an eager search step spends its time ({started()})", "",
            machine_line(f"{a.threads} thread(s)"), "",
            f"C {a.channels}, {a.cells} cells, batch {a.batch}, LR {a.lr_size}x{a.lr_size}, "
            f"--rule {a.rule}, --backend {s.backend.name}, two whole steps, self CPU time "
            f"(torch.profiler): {100 * extern / total:.0f} % in ops torch.compile calls as they "
            f"are ({', '.join(EXTERN_OPS)}); the largest: " + ", ".join(
                f"{e.key} {100 * e.self_cpu_time_total / total:.0f} %" for e in top) + "."]


def main(argv=None) -> int:
    p = supernet_parser(__doc__)
    p.add_argument("--lr-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], help="columns to leave out")
    p.add_argument("--whole-step", action="store_true",
                   help="the search's whole step, eager vs compiled (module doc)")
    p.add_argument("--profile-eager", action="store_true",
                   help="where an eager whole step spends its time (module doc)")
    p.add_argument("--rule", default="joint", help="--whole-step: the update rule")
    p.add_argument("--backend", default="auto", help="--whole-step: the search's --backend")
    p.add_argument("--compiler", default="inductor",
                   help="--whole-step: torch.compile's backend (aot_eager: a quick dry run)")
    p.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                   help="cpu: the process's CPU seconds (a shared machine; 1 thread)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.whole_step or a.profile_eager:
        emit(whole_step(a) if a.whole_step else profile_eager(a), a.out)
        return 0
    torch.manual_seed(0)
    ref = SuperNet(a.channels, a.cells, 2, DLSR_PRIMITIVES, backend=get_backend("reference"))
    fast_backend = resolve_backend("auto", "cpu", torch.float32, DLSR_PRIMITIVES)
    fast = SuperNet(a.channels, a.cells, 2, DLSR_PRIMITIVES, backend=fast_backend)
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(a.batch, 3, a.lr_size, a.lr_size)
    y = torch.rand(a.batch, 3, 2 * a.lr_size, 2 * a.lr_size)
    cols = {"eager reference": step_fn(ref),
            f"eager {fast_backend.name} (--backend auto)": step_fn(fast)}
    if "compiled" not in a.skip:
        cols["compiled reference"] = step_fn(ref, torch.compile(ref))
    if "compiled+fused" not in a.skip:
        cols[f"compiled {fast_backend.name}"] = step_fn(fast, torch.compile(fast))
    results = []
    for name, fn in cols.items():
        try:
            r = measure(name, fn, x, y, a.reps, CLOCK[a.clock])
        except Exception as e:  # noqa: BLE001  (a compile failure is a result too)
            results.append({"name": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            print(f"{name}: failed: {e}", file=sys.stderr)
            continue
        results.append(r)
        print(f"{name}: first {r['first']:.1f} s, step {r['step']:.3f} s", file=sys.stderr,
              flush=True)
    base = results[0]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["name"], "-", "-", "-", r["error"]])
            continue
        err = ((r["grad"] - base["grad"]).abs().max() / base["grad"].abs().max()).item()
        rows.append([r["name"], f"{r['first']:.1f} s", f"{r['step']:.3f} s",
                     f"{base['step'] / r['step']:.2f}x", f"{err:.1e}"])
    lines = [f"## torch.compile vs eager vs fused, one search weight step ({started()})", "",
             machine_line(f"{a.threads} thread(s)"), "",
             f"SuperNet C {a.channels}, {a.cells} cells, x2, batch {a.batch}, LR {a.lr_size}x"
             f"{a.lr_size}, fp32; step = forward + L1 + backward; median of {a.reps} after the "
             "first call:", ""]
    lines += table(["column", "first call (compile)", "step", "vs eager reference",
                    "alpha-grad rel. diff"], rows)
    emit(lines, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
