"""CPU benchmark of the native backend against the reference (and the merged torch composition).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_native.py --batch 16 64 --out bench/results/cpu_native.md
    OMP_WAIT_POLICY=PASSIVE python bench/bench_native.py --isa portable avx2 avx512 --threads 1 2 \
        --batch 16 --no-step --out bench/results/cpu_isa.md

Measured side by side in one process, interleaved (ref, merged, native, ref, ...), best of
``--reps`` after a warm-up. ``--isa`` names the CPU kernel variants to measure (default: the one
the library picks, ``auto``): the primitive and mixed-op rows time each of them in the same
interleaved rounds as the reference (switched in-process with ``native_build.set_isa``), the
search-step rows run each in its own fresh process with ``HDNAS_NATIVE_ISA``. Every result
names the CPU model, its vector ISA and the kernel variant measured:

* the depthwise primitives alone (stage 1: 5 shared-input groups; stage 2: 3 groups), fwd+bwd;
* one DLSR mixed op (9 candidates, C=48) forward + backward;
* one whole search step of SuperNet(C=48), as hdnas.search's train_step does it: a weight step
  (forward, backward to the weights, Adam) then the architecture step of
  hdnas.architect.Architect (rule 'joint': L_train + L_val, here on the same batch, backward to
  alpha/beta, Adam), i.e. 3 forward and 2 backward passes. Each backend runs in a fresh process
  (at batch 64 two supernets do not fit in 23 GB together); rounds alternate the backends.

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

from hdnas import native_build  # noqa: E402
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


def with_isa(isa, f):
    """``f`` run with the CPU kernel variant ``isa`` (switched before every call)."""
    def g():
        native_build.set_isa(isa)
        return f()
    return g


def prim_case(N, C, H, shared, reps, isas):
    """{"torch": [s], "native[<isa>]": [s], ...}: the reference and each variant, interleaved."""
    ks, ds = ST1 if shared else ST2
    G = len(ks)
    x = torch.randn(N, C if shared else G * C, H, H, requires_grad=True)
    K = torch.randn(G, C, 7, 7, requires_grad=True)

    def run(f):
        def g():
            y = f(x, K, ks, ds, True, shared)
            torch.autograd.grad(y, (x, K), torch.ones_like(y))
        return g
    fns = {"torch": run(grouped_dw_ref)}
    fns.update({f"native[{i}]": with_isa(i, run(native.grouped_dw)) for i in isas})
    return timeit(fns, reps)


def mixed_case(N, C, H, reps, isas):
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
    fns = {n: run(n) for n in ("reference", "merged")}
    fns.update({f"native[{i}]": with_isa(i, run("native")) for i in isas})
    return timeit(fns, reps)


def step_case(N, C, H, reps, backend, scale=2):
    """Best time of one search step on ``backend`` (run alone in this process)."""
    from hdnas.architect import Architect
    from hdnas.network import SuperNet

    torch.manual_seed(0)
    lr_img = torch.rand(N, 3, H, H)
    hr_img = torch.rand(N, 3, H * scale, H * scale)
    net = SuperNet(C=C, backend=backend)
    wopt = torch.optim.Adam(net.weight_parameters(), lr=1e-4)
    arch = Architect(net, F.l1_loss, rule="joint")
    weights = net.weight_parameters()

    def g():  # as hdnas.search's train_step: weight step, then the joint architecture step
        wopt.zero_grad(set_to_none=True)
        F.l1_loss(net(lr_img), hr_img).backward(inputs=weights)
        wopt.step()
        arch.step((lr_img, hr_img), (lr_img, hr_img), eta=1e-4)
    return timeit({backend: g}, reps)[backend]


def step_isolated(N, C, H, reps, backend, threads, isa="auto"):
    """step_case in a fresh process (two N=64 supernets do not fit in memory together), with
    CPU kernel variant ``isa``: (best seconds, peak RSS in GiB)."""
    import json
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--_step", backend, str(N), str(C), str(H),
           str(reps), str(threads)]
    env = {**os.environ, "HDNAS_NATIVE_ISA": "" if isa == "auto" else isa}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return None, f"failed (rc {r.returncode}{', out of memory?' if r.returncode in (-9, 137) else ''})"
    d = json.loads(r.stdout.strip().splitlines()[-1])
    if backend == "native" and isa != "auto" and d["isa"] != isa:
        return None, f"ran the {d['isa']} kernels, not {isa}"
    return min(d["times"]), d["peak_rss_gib"]


def _step_child(args):
    import json
    import resource

    backend, N, C, H, reps, threads = args[0], *map(int, args[1:])
    torch.set_num_threads(threads)
    if backend == "native" and not native.available("cpu"):
        raise SystemExit(2)
    ts = step_case(N, C, H, reps, backend)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    isa = native_build.isa() if backend == "native" else None
    print(json.dumps({"times": ts, "peak_rss_gib": round(peak, 1), "isa": isa}))


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


def _vector_isa():
    """The CPU's widest vector ISA, from its feature flags (as /proc/cpuinfo names them)."""
    f = native_build.cpu_features()
    for name, flags in (("AVX-512 (F/BW/VL/DQ)", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
                        ("AVX2+FMA", {"avx2", "fma"}), ("AVX", {"avx"}), ("SSE2", {"sse2"}),
                        ("SVE", {"sve"}), ("NEON/ASIMD", {"asimd"})):
        if flags <= f:
            return name
    return f"unknown ({platform.machine()})"


def fmt(ts):
    return f"{min(ts) * 1e3:.0f}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_step":
        return _step_child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--channels", type=int, default=48)
    p.add_argument("--size", type=int, default=32, help="LR patch size")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--step-reps", type=int, default=2)
    p.add_argument("--step-rounds", type=int, default=1,
                   help="alternating rounds of fresh processes (reference, native) per step case")
    p.add_argument("--no-step", action="store_true")
    p.add_argument("--only-step", action="store_true", help="skip the primitive and mixed-op rows")
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                   help="torch intra-op thread counts to measure (each a separate table row set)")
    p.add_argument("--isa", nargs="+", default=["auto"],
                   help="CPU kernel variants to measure (portable, avx2, avx512, auto), each "
                        "against the reference in the same run")
    p.add_argument("--out", default=None, help="write the markdown here (appended)")
    a = p.parse_args(argv)
    if not native.available("cpu"):
        raise SystemExit(f"native kernels unavailable: {native.native_build.error('cpu')}")
    runs = native_build.isa_supported()
    isas = [runs[-1] if i == "auto" else i for i in a.isa]
    bad = [i for i in isas if i not in runs]
    if bad:
        raise SystemExit(f"this CPU cannot run the {', '.join(bad)} kernels (it runs: "
                         f"{', '.join(runs)})")
    isas = list(dict.fromkeys(isas))
    C, H = a.channels, a.size
    lines = [f"machine: {_cpu_name()} (vector ISA {_vector_isa()}; kernel variants it runs: "
             f"{', '.join(runs)}), {os.cpu_count()} cores, torch {torch.__version__}, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, C={C}, LR {H}x{H}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at start "
             f"{_load()}; times in ms, best of the interleaved repetitions "
             f"(reps {a.reps}, search step reps {a.step_reps}, one warm-up each)", ""]
    print(lines[0], flush=True)
    rows = []
    for nt, N in [(nt, N) for nt in a.threads for N in a.batch]:
        torch.set_num_threads(nt)
        for shared, label in () if a.only_step else (
                (True, "stage-1 grouped_dw (5 groups, shared x) fwd+bwd"),
                (False, "stage-2 grouped_dw (3 groups) fwd+bwd")):
            r = prim_case(N, C, H, shared, a.reps, isas)
            for i in isas:
                t = r[f"native[{i}]"]
                rows.append((nt, N, label, i, fmt(r["torch"]), "", fmt(t),
                             f"{min(r['torch']) / min(t):.2f}x"))
                print(rows[-1], flush=True)
        r = None if a.only_step else mixed_case(N, C, H, a.reps, isas)
        if r is not None:
            for i in isas:
                t = r[f"native[{i}]"]
                rows.append((nt, N, "DLSR mixed op (9 ops) fwd+bwd", i, fmt(r["reference"]),
                             fmt(r["merged"]), fmt(t), f"{min(r['reference']) / min(t):.2f}x"))
                print(rows[-1], flush=True)
        if not a.no_step:  # one backend at a time, alternating, each in a fresh process
            res = {"reference": [], **{f"native[{i}]": [] for i in isas}}
            mem = {}
            for _ in range(a.step_rounds):
                for b in res:
                    backend, isa = ("reference", "auto") if b == "reference" else ("native", b[7:-1])
                    t, m = step_isolated(N, C, H, a.step_reps, backend, nt, isa)
                    if t is not None:
                        res[b].append(t)
                    mem[b] = m
            tr = min(res["reference"]) if res["reference"] else None

            def cell(t, b):
                m = mem[b]
                return (f"{t * 1e3:.0f} (peak {m} GiB)" if t is not None else str(m))
            for i in isas:
                b = f"native[{i}]"
                tn = min(res[b]) if res[b] else None
                rows.append((nt, N, "SuperNet search step (weight step + joint arch step)", i,
                             cell(tr, "reference"), "", cell(tn, b),
                             f"{tr / tn:.2f}x" if tr and tn else "-"))
                print(rows[-1], flush=True)
    lines += ["| threads | batch | what | kernels | reference | merged (torch prims) | native | "
              "reference / native |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t} | {n} | {w} | {i} | {r} | {m or '-'} | {nv} | {x} |"
              for t, n, w, i, r, m, nv, x in rows]
    lines += ["", f"load average at end {_load()}", ""]
    md = "\n".join(lines)
    print(md)
    if a.out:
        with open(a.out, "a") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
