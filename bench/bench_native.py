"""CPU benchmark of the native backend against the reference (and the merged torch composition).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_native.py --batch 16 64 --out bench/results/cpu_native.md

Measured side by side in one process, interleaved (ref, merged, native, ref, ...), best of
``--reps`` after a warm-up:

* the depthwise primitives alone (stage 1: 5 shared-input groups; stage 2: 3 groups), fwd+bwd;
* one DLSR mixed op (9 candidates, C=48) forward + backward;
* one whole search step of SuperNet(C=48): a weight step (forward, backward, Adam) then the
  architecture step of hdnas.architect.Architect (rule 'joint': L_train + L_val on the batch,
  backward to alpha/beta, Adam), i.e. 3 forward+backward passes.

Timings are wall-clock on whatever machine runs this; the markdown records it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hdnas.mixed import MixedOp, get_backend  # noqa: E402
from hdnas.mixed import native  # noqa: E402
from hdnas.mixed.primitives import grouped_dw_ref  # noqa: E402
from hdnas.space import DLSR_PRIMITIVES  # noqa: E402

ST1 = ((3, 5, 7, 3, 5), (1, 1, 1, 2, 2))
ST2 = ((3, 5, 7), (1, 1, 1))


def timeit(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Interleaved timing: {name: [seconds]}."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    out = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t)
    return out


def prim_case(N, C, H, shared, reps):
    ks, ds = ST1 if shared else ST2
    G = len(ks)
    x = torch.randn(N, C if shared else G * C, H, H, requires_grad=True)
    K = torch.randn(G, C, 7, 7, requires_grad=True)

    def run(f):
        def g():
            y = f(x, K, ks, ds, True, shared)
            torch.autograd.grad(y, (x, K), torch.ones_like(y))
        return g
    return timeit({"torch": run(grouped_dw_ref), "native": run(native.grouped_dw)}, reps)


def mixed_case(N, C, H, reps):
    torch.manual_seed(0)
    m = MixedOp(C, DLSR_PRIMITIVES)
    x = torch.randn(N, C, H, H, requires_grad=True)
    w = F.softmax(torch.randn(len(DLSR_PRIMITIVES)), 0).requires_grad_(True)

    def run(name):
        b = get_backend(name)

        def g():
            y = b.mixed_op(x, w, m)
            torch.autograd.grad(y, [x, w, *m.parameters()], torch.ones_like(y))
        return g
    return timeit({n: run(n) for n in ("reference", "merged", "native")}, reps)


def step_case(N, C, H, reps, scale=2):
    from hdnas.architect import Architect
    from hdnas.network import SuperNet

    torch.manual_seed(0)
    lr_img = torch.rand(N, 3, H, H)
    hr_img = torch.rand(N, 3, H * scale, H * scale)
    nets = {n: SuperNet(C=C, backend=n) for n in ("reference", "native")}
    nets["native"].load_state_dict(nets["reference"].state_dict())
    fns = {}
    for name, net in nets.items():
        wopt = torch.optim.Adam(net.weight_parameters(), lr=1e-4)
        arch = Architect(net, F.l1_loss, rule="joint")

        def g(net=net, wopt=wopt, arch=arch):
            wopt.zero_grad(set_to_none=True)
            F.l1_loss(net(lr_img), hr_img).backward()
            wopt.step()
            arch.step((lr_img, hr_img), (lr_img, hr_img), eta=1e-4)
        fns[name] = g
    return timeit(fns, reps)


def _load():
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(ts):
    return f"{min(ts) * 1e3:.0f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--channels", type=int, default=48)
    p.add_argument("--size", type=int, default=32, help="LR patch size")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--step-reps", type=int, default=2)
    p.add_argument("--no-step", action="store_true")
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                   help="torch intra-op thread counts to measure (each a separate table row set)")
    p.add_argument("--out", default=None, help="write the markdown here (appended)")
    a = p.parse_args(argv)
    if not native.available("cpu"):
        raise SystemExit(f"native kernels unavailable: {native.native_build.error('cpu')}")
    C, H = a.channels, a.size
    lines = [f"machine: {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, C={C}, LR {H}x{H}; "
             f"load average at start {_load()}; times in ms, best of the interleaved repetitions "
             f"(reps {a.reps}, search step reps {a.step_reps}, one warm-up each)", ""]
    print(lines[0], flush=True)
    rows = []
    for nt, N in [(nt, N) for nt in a.threads for N in a.batch]:
        torch.set_num_threads(nt)
        for shared, label in ((True, "stage-1 grouped_dw (5 groups, shared x) fwd+bwd"),
                              (False, "stage-2 grouped_dw (3 groups) fwd+bwd")):
            r = prim_case(N, C, H, shared, a.reps)
            rows.append((nt, N, label, fmt(r["torch"]), "", fmt(r["native"]),
                         f"{min(r['torch']) / min(r['native']):.2f}x"))
            print(rows[-1], flush=True)
        r = mixed_case(N, C, H, a.reps)
        rows.append((nt, N, "DLSR mixed op (9 ops) fwd+bwd", fmt(r["reference"]), fmt(r["merged"]),
                     fmt(r["native"]), f"{min(r['reference']) / min(r['native']):.2f}x"))
        print(rows[-1], flush=True)
        if not a.no_step:
            r = step_case(N, C, H, a.step_reps)
            rows.append((nt, N, "SuperNet search step (weight + joint arch step)", fmt(r["reference"]),
                         "", fmt(r["native"]), f"{min(r['reference']) / min(r['native']):.2f}x"))
            print(rows[-1], flush=True)
    lines += ["| threads | batch | what | reference | merged (torch prims) | native | reference / native |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {t} | {n} | {w} | {r} | {m or '-'} | {nv} | {x} |" for t, n, w, r, m, nv, x in rows]
    lines += ["", f"load average at end {_load()}", ""]
    md = "\n".join(lines)
    print(md)
    if a.out:
        with open(a.out, "a") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
