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

One process, 1 intra-op thread by default; the fused op (``MixedOp.from_module(plain)``, one
column per ``--recompute`` value: ``true`` recomputes in backward, ``false`` keeps the
intermediates, ``auto``, patch's default, picks by the plane size) and the plain one alternate
(``bench.common.timeit``), medians over ``--reps``.
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


def measure(C, layers, size, batch, reps, kinds=("full", "arch-only"), recompute=(True,)):
    """Rows (channels, size, stride, edges, kind, plain ms, then per ``recompute`` value: fused
    ms, ratio) and the weighted totals {kind: [plain ms, fused ms per recompute value...]}."""
    import hdnas.darts as hd
    rows, totals = [], {k: [0.0] * (1 + len(recompute)) for k in kinds}
    for (c, s, st), n in sorted(edge_shapes(C, layers, size).items(), key=lambda kv: kv[0][2]):
        torch.manual_seed(0)
        plain = hd.PlainMixedOp(c, st)
        fused = [hd.MixedOp.from_module(plain, "fused", r) for r in recompute]
        x0 = torch.randn(batch, c, s, s)
        alpha = (1e-3 * torch.randn(len(plain._ops))).requires_grad_()
        for kind in kinds:
            arch = kind == "arch-only"
            fns = {"plain": _runner(plain, x0, alpha, arch)}
            fns.update({f"fused{i}": _runner(op, x0, alpha, arch) for i, op in enumerate(fused)})
            t = common.timeit(fns, reps)
            ms = [statistics.median(t[k]) * 1e3 for k in fns]
            row = [c, f"{s}x{s}", st, n, kind, ms[0]]
            for f in ms[1:]:
                row += [f, ms[0] / f]
            rows.append(tuple(row))
            for i, v in enumerate(ms):
                totals[kind][i] += n * v
    return rows, totals



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--C", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7, help="timed alternations (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recompute", default="true,false,auto",
                    help="the fused op's recompute values, one column each (true, false, auto)")
    ap.add_argument("--out", help="append the table to this Markdown file")
    a = ap.parse_args(argv)
    recs = common.recompute_values(a.recompute)
    torch.set_num_threads(a.threads)
    start = common.started()
    rows, totals = measure(a.C, a.layers, a.size, a.batch, a.reps, recompute=recs)
    lines = [f"\n## DARTS edges, fused vs plain ({start})", "", common.machine_line(),
             f"C {a.C}, {a.layers} cells, {a.size}x{a.size}, batch {a.batch}, {a.threads} "
             f"thread(s), medians of {a.reps} alternations; ms per edge, forward + backward.", ""]
    head = ["channels", "size", "stride", "edges", "backward", "plain ms"]
    for r in recs:
        head += [f"fused ms, recompute={r}", "x plain speed"]
    lines += common.table(head, rows)
    n = sum(edge_shapes(a.C, a.layers, a.size).values())
    lines += [""] + [f"* one pass's {n} edges, {k} backward: plain {v[0]:.0f} ms; "
                     + "; ".join(f"fused (recompute={r}) {f:.0f} ms, **{v[0] / f:.2f}x**"
                                 for r, f in zip(recs, v[1:]))
                     for k, v in totals.items()]
    common.emit(lines, a.out)


if __name__ == "__main__":
    main()
