"""DARTS edges: the fused mixed op against DARTS' plain loop on every edge shape of one search pass.

    python -m bench.bench_darts_edges                      # DARTS' search: C 16, 8 cells, 32x32, batch 32
    python -m bench.bench_darts_edges --batch 64 --reps 9 --out bench/results/cpu_darts.md

The edges of DARTS' search network (``layers`` cells, reductions at a third and two thirds,
4 steps: 14 edges a cell, the 8 edges from a reduction cell's inputs at stride 2) grouped by
shape (channels, input size, stride), each shape once per backward kind:

* ``full``: forward and a backward that asks every gradient (a weight step; DARTS' first-order
  architecture step too, which calls ``loss.backward()``);
* ``arch-only``: forward and a backward that asks only the architecture weights' and the input's
  gradients (the second-order Hessian-vector product's passes), the candidates' weights not.

One process, 1 intra-op thread by default; the fused op (``MixedOp.from_module(plain)``,
recomputation on) and the plain one alternate (``bench.common.timeit``), medians over ``--reps``.
The total weighs each shape by its number of edges: the mixed ops' share of one pass, not a step
(no stem, preprocessing, classifier or optimizer).
"""
from __future__ import annotations

import argparse
import statistics
from collections import Counter

import torch

from bench import common


def edge_shapes(C: int, layers: int, size: int, steps: int = 4) -> Counter:
    """{(channels, input size, stride): number of edges} of DARTS' search network."""
    counts = Counter()
    c, res = C, size
    per_cell = steps * (steps + 3) // 2
    for i in range(layers):
        if i in (layers // 3, 2 * layers // 3):
            c *= 2
            counts[(c, res, 2)] += 2 * steps  # the edges from the cell's two inputs
            res = (res + 1) // 2
            counts[(c, res, 1)] += per_cell - 2 * steps
        else:
            counts[(c, res, 1)] += per_cell
    return counts


def _runner(op, x0, alpha, arch_only: bool):
    one = torch.ones((), requires_grad=True)  # x then needs its gradient, as inside a network

    def run():
        x = x0 * one
        y = op(x, torch.softmax(alpha, 0))
        if arch_only:
            torch.autograd.grad(y.sum(), [alpha, one])
        else:
            y.sum().backward()
    return run


def measure(C, layers, size, batch, reps, kinds=("full", "arch-only")):
    """Rows (channels, size, stride, edges, kind, plain ms, fused ms, ratio) and the weighted
    totals {kind: (plain ms, fused ms)}."""
    import hdnas.darts as hd
    rows, totals = [], {k: [0.0, 0.0] for k in kinds}
    for (c, s, st), n in sorted(edge_shapes(C, layers, size).items(), key=lambda kv: kv[0][2]):
        torch.manual_seed(0)
        plain = hd.PlainMixedOp(c, st)
        fused = hd.MixedOp.from_module(plain, "fused", True)
        x0 = torch.randn(batch, c, s, s)
        alpha = (1e-3 * torch.randn(len(plain._ops))).requires_grad_()
        for kind in kinds:
            arch = kind == "arch-only"
            t = common.timeit({"plain": _runner(plain, x0, alpha, arch),
                               "fused": _runner(fused, x0, alpha, arch)}, reps)
            p, f = (statistics.median(t[k]) * 1e3 for k in ("plain", "fused"))
            rows.append((c, f"{s}x{s}", st, n, kind, p, f, p / f))
            totals[kind][0] += n * p
            totals[kind][1] += n * f
    return rows, totals


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--C", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7, help="timed alternations (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="append the table to this Markdown file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    start = common.started()
    rows, totals = measure(a.C, a.layers, a.size, a.batch, a.reps)
    lines = [f"\n## DARTS edges, fused vs plain ({start})", "", common.machine_line(),
             f"C {a.C}, {a.layers} cells, {a.size}x{a.size}, batch {a.batch}, {a.threads} "
             f"thread(s), medians of {a.reps} alternations; ms per edge, forward + backward.", ""]
    lines += common.table(["channels", "size", "stride", "edges", "backward", "plain ms",
                           "fused ms", "x plain speed"], rows)
    lines += [""] + [f"* one pass's {sum(edge_shapes(a.C, a.layers, a.size).values())} edges, "
                     f"{k} backward: plain {p:.0f} ms, fused {f:.0f} ms, **{p / f:.2f}x**"
                     for k, (p, f) in totals.items()]
    common.emit(lines, a.out)


if __name__ == "__main__":
    main()
