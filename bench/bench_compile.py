"""The obvious peer: ``torch.compile`` of the reference supernet (its forward; backward by
AOTAutograd), beside the eager reference and the fused backend (``--backend auto``), on one search weight step (forward, L1 loss, backward of
every weight and alpha/beta), same shapes, same process.

For each column: the time of the first call (for the compiled ones: compilation included), the
median step time after it, and the largest relative difference of the alpha gradient against the
eager reference in fp32 (same weights and batch). ``compiled+fused``: ``torch.compile`` around
the fused backend (its kernels are torch custom ops: the graph stays whole only if they trace
without breaks), to decide whether a ``--compile`` flag would pay.

    python -m bench.bench_compile                       # C 24, 3 cells, batch 4, LR 32x32
    python -m bench.bench_compile --channels 48 --cells 6 --out bench/results/cpu_compile.md
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from bench.common import emit, machine_line, started, supernet_parser, table
from hdnas.mixed import get_backend, resolve_backend
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


def measure(name, fn, x, y, reps):
    t = time.perf_counter()
    g = fn(x, y)
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x, y)
        times.append(time.perf_counter() - t)
    return {"name": name, "first": first, "step": statistics.median(times), "grad": g}


def main(argv=None) -> int:
    p = supernet_parser(__doc__)
    p.add_argument("--lr-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], help="columns to leave out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
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
            r = measure(name, fn, x, y, a.reps)
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
