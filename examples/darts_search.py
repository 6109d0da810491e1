"""A short DARTS search on random data, with DARTS' plain mixed ops and with hdnas.darts swapped in.

    OMP_WAIT_POLICY=PASSIVE python examples/darts_search.py               # small default
    python examples/darts_search.py --batch 64 --C 16 --layers 8 --steps 5  # DARTS' search shape

Each variant runs in its own process (so that its peak memory is its own) from the same seed:
first-order DARTS steps (architecture step on a validation batch, then the weight step). It
prints seconds per step, the process's peak resident memory (peak GPU memory on CUDA), the
largest difference between the two runs' architecture parameters and the derived genotypes.
In fp32 the two runs differ by round-off (fused and plain sums are ordered differently), which a
few DARTS steps amplify, so their genotypes may differ, as two fp32 runs of DARTS itself on two
machines may; ``--dtype float64`` removes the round-off, and the two runs then agree to 1e-8
(checked: the script exits 1 otherwise).

The swap is the two lines in ``run()``::

    import hdnas.darts
    hdnas.darts.patch(model)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def run(a) -> dict:
    from hdnas.darts.model_search import Network, make_architect, search_step

    device = torch.device(a.device)
    torch.manual_seed(2)
    dtype = getattr(torch, a.dtype)
    model = Network(a.C, 10, a.layers, weighting=a.weighting).to(device=device, dtype=dtype)
    if a.variant == "swapped":
        import hdnas.darts
        print(hdnas.darts.patch(model, backend=a.backend), file=sys.stderr)
    architect = make_architect(model, unrolled=a.unrolled)
    optimizer = torch.optim.SGD(model.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    g = torch.Generator().manual_seed(0)

    def batch():
        return (torch.randn(a.batch, 3, a.size, a.size, generator=g).to(device=device, dtype=dtype),
                torch.randint(0, 10, (a.batch,), generator=g).to(device))

    times = []
    for _ in range(a.steps):
        train, valid = batch(), batch()
        t0 = time.perf_counter()
        loss = search_step(model, architect, optimizer, train, valid, eta=0.025)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": a.variant, "sec_per_step": sum(times[1:] or times) / len(times[1:] or times),
            "peak_mb": peak, "loss": loss, "genotype": str(model.genotype()),
            "alphas": [v for p in model.arch_parameters() for v in p.detach().flatten().tolist()]}


def main():
    ap = argparse.ArgumentParser(description="short DARTS search, original vs hdnas.darts")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--C", type=int, default=16)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--weighting", default="softmax", choices=["softmax", "sigmoid", "gdas", "pcdarts"])
    ap.add_argument("--unrolled", action="store_true", help="second-order DARTS")
    ap.add_argument("--backend", default="fused")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="float64: no round-off, the two runs must agree")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        print("RESULT " + json.dumps(run(a)), flush=True)
        return
    results = []
    for variant in ("original", "swapped"):
        p = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                           capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            sys.exit(f"error: the {variant} run failed:\n{p.stderr[-2000:]}")
        r = json.loads(line[-1][7:])
        results.append(r)
        print(f"{variant:9s} {r['sec_per_step']:7.2f} s/step   peak memory {r['peak_mb']:8.0f} MB   "
              f"last train loss {r['loss']:.4f}")
    o, s = results
    print(f"swapped vs original: {o['sec_per_step'] / s['sec_per_step']:.2f}x speed, "
          f"{o['peak_mb'] / s['peak_mb']:.2f}x less peak memory")
    diff = max(abs(x - y) for x, y in zip(o["alphas"], s["alphas"]))
    print(f"largest architecture-parameter difference after {a.steps} steps: {diff:.2e} ({a.dtype})")
    print("same genotype:", o["genotype"] == s["genotype"],
          "" if a.dtype == "float64" else "(fp32: round-off may change it; --dtype float64 checks)")
    print(s["genotype"])
    if a.dtype == "float64" and (diff > 1e-8 or o["genotype"] != s["genotype"]):
        sys.exit("error: in fp64 the two runs should agree to 1e-8")


if __name__ == "__main__":
    main()
