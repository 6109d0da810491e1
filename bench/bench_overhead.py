"""Per-call Python overhead of the mixed-op backends at a tiny shape, where the arithmetic is
negligible: what the contract checks, the plan and the merged-weight construction cost per call.

    OMP_WAIT_POLICY=PASSIVE python -m bench.bench_overhead [--shape 1,4,8,8] [--calls 300]

Prints, per backend, the best-of-rounds time of one ``distill_step`` forward (no grad) and of
forward+backward, plus the cost of the contract checks alone. Compare two checkouts by running
this from each checkout's root (``python -m`` puts the checkout's hdnas first on the path),
alternately, on the same machine (bench/README.md).
"""
from __future__ import annotations

import argparse

import torch

from bench import common
from hdnas import machine
from hdnas.mixed import MixedOp, available_backends, get_backend
from hdnas.mixed.base import check_mixed_inputs
from hdnas.model.space import DLSR_PRIMITIVES


def _best(fn, calls, rounds):
    """Microseconds per call: the best of ``rounds`` rounds of ``calls`` calls, after a warm-up."""
    for _ in range(max(calls // 10, 5)):
        fn()

    def many():
        for _ in range(calls):
            fn()
    return min(common.timeit({"f": many}, rounds, warmup=0)["f"]) / calls * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1,4,8,8")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backends", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    N, C, H, W = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    m = MixedOp(C, DLSR_PRIMITIVES)
    x = torch.randn(N, C, H, W)
    w = torch.softmax(torch.randn(9), 0)
    c = torch.nn.Conv2d(C, C // 2, 1)
    names = args.backends.split(",") if args.backends else available_backends()
    print(f"# {machine.summary_line()}; N,C,H,W = {N},{C},{H},{W}")
    print("\n".join(common.table(["backend", "checks only (us)", "distill_step fwd (us)",
                                  "fwd+bwd (us)"], [])))
    xg = x.clone().requires_grad_(True)
    for name in names:
        b = get_backend(name)
        if b.unsupported_reason(DLSR_PRIMITIVES, x.device, x.dtype) is not None:
            continue

        def checks():
            check_mixed_inputs(x, w, m)
            if hasattr(b, "require"):
                b.require(m.op_names, x.device, x.dtype)
            else:
                why = b.unsupported_reason(m.op_names, x.device, x.dtype)
                assert why is None

        def fwd():
            with torch.no_grad():
                b.distill_step(x, w, m, c)

        def fwd_bwd():
            d, r = b.distill_step(xg, w, m, c)
            (d.sum() + r.sum()).backward()

        print(f"| {name} | {_best(checks, args.calls * 10, args.rounds):.1f} | "
              f"{_best(fwd, args.calls, args.rounds):.0f} | {_best(fwd_bwd, args.calls // 3, args.rounds):.0f} |")


if __name__ == "__main__":
    main()
