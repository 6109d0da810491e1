"""CPU benchmark of the native backend against the reference (and the merged torch composition).

    OMP_WAIT_POLICY=PASSIVE python -m bench.bench_native --batch 16 64 \
        --out bench/results/cpu_native.md
    OMP_WAIT_POLICY=PASSIVE python -m bench.bench_native --isa portable avx2 avx512 --threads 1 2 \
        --batch 16 --no-step --out bench/results/cpu_isa.md

Measured side by side in one process, interleaved (ref, merged, native, ref, ...), best of
``--reps`` after a warm-up. ``--isa`` names the CPU kernel variants to measure (default: the one
the library picks, ``auto``): the primitive and mixed-op rows time each of them in the same
interleaved rounds as the reference (switched in-process with ``native_build.set_isa``), the
search-step rows run each in its own fresh process with ``HDNAS_NATIVE_ISA``. Every result
names the CPU model, its vector ISA and the kernel variant measured:

* the depthwise primitives alone (stage 1: 5 shared-input groups; stage 2: 3 groups), fwd+bwd;
* one DLSR mixed op (9 candidates, C=48) forward + backward;
* the search step of SuperNet(C=48) as hdnas.search's train_step does it, per update rule
  (``--rules``; joint, darts1, darts2): the weight step (forward, backward to the weights, Adam)
  and the architecture step of hdnas.nas.architect.Architect (joint: L_train + L_val; darts1:
  L_val; darts2: the unrolled hypergradient), timed separately, on distinct train and arch
  batches, with the peak RSS of the process. Each backend runs in a fresh process (at batch 64
  two supernets do not fit in 23 GB together); rounds alternate the backends.

Timings are wall-clock on whatever machine runs this; the markdown records it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import common  # noqa: E402
from bench.common import CLOCK  # noqa: E402
from hdnas import native_build  # noqa: E402
from hdnas.engine import allocator  # noqa: E402
from hdnas.mixed import MixedOp, get_backend  # noqa: E402
from hdnas.mixed import dense, native  # noqa: E402
from hdnas.mixed.primitives import grouped_dw_ref  # noqa: E402
from hdnas.model.space import DLSR_PRIMITIVES  # noqa: E402

ST1 = ((3, 5, 7, 3, 5), (1, 1, 1, 2, 2))
ST2 = ((3, 5, 7), (1, 1, 1))


ROOT = Path(__file__).resolve().parents[1]
#: the clock of every timing (bench.common.CLOCK): set by --clock, passed to the step subprocesses
_clock = time.perf_counter
_malloc = {"mode": "tuned"}  # hdnas.engine.allocator setting of the search-step processes


def set_clock(name: str) -> None:
    global _clock
    _clock = CLOCK[name]


def timeit(fns: dict, reps: int) -> dict:
    """Interleaved timing: {name: [seconds]} on the clock chosen by ``set_clock``."""
    return common.timeit(fns, reps, clock=_clock)


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


RULES = ("joint", "darts1", "darts2")


def step_case(N, C, H, reps, backend, rules=RULES, scale=2):
    """Seconds of the weight step and of the architecture step of one search step on
    ``backend`` (run alone in this process), per update rule, as hdnas.search's train_step
    does them: the weight step (forward, backward to the weights, Adam) and
    ``Architect.step`` (joint: L_train + L_val, backward to alpha/beta, Adam; darts1: L_val;
    darts2: the unrolled hypergradient, i.e. 4 forward and backward passes), on distinct train
    and arch batches. Returns {rule: {"weight": [s], "arch": [s], "peak_rss_gib": peak so far}}."""
    import resource

    from hdnas.nas.architect import Architect
    from hdnas.model.network import SuperNet

    torch.manual_seed(0)
    train = (torch.rand(N, 3, H, H), torch.rand(N, 3, H * scale, H * scale))
    val = (torch.rand(N, 3, H, H), torch.rand(N, 3, H * scale, H * scale))
    net = SuperNet(C=C, backend=get_backend(backend))
    wopt = torch.optim.Adam(net.weight_parameters(), lr=1e-4)
    weights = net.weight_parameters()

    def weight_step():
        wopt.zero_grad(set_to_none=True)
        F.l1_loss(net(train[0]), train[1]).backward(inputs=weights)
        wopt.step()
    out = {}
    for rule in rules:
        arch = Architect(net, F.l1_loss, rule=rule)
        ts = timeit({"weight": weight_step,
                     "arch": lambda: arch.step(train, val, eta=1e-4)}, reps)
        ts["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
        out[rule] = ts
    return out


def step_isolated(N, C, H, reps, backend, threads, isa="auto", rules=RULES):
    """step_case in a fresh process (two N=64 supernets do not fit in memory together), with
    CPU kernel variant ``isa``: ({rule: {"weight": best s, "arch": best s, "peak_rss_gib"}},
    None) or (None, why it failed)."""
    import json
    import subprocess

    cmd = [sys.executable, "-m", "bench.bench_native", "--_step", backend, str(N), str(C), str(H),
           str(reps), str(threads), ",".join(rules)]
    env = {**os.environ, "HDNAS_NATIVE_ISA": "" if isa == "auto" else isa,
           "HDNAS_BENCH_CLOCK": "cpu" if _clock is time.process_time else "wall",
           "HDNAS_MALLOC": _malloc["mode"]}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        return None, f"failed (rc {r.returncode}{', out of memory?' if r.returncode in (-9, 137) else ''})"
    d = json.loads(r.stdout.strip().splitlines()[-1])
    if d.get("dense"):
        print(f"  {backend}[{isa}]: merged dense conv route(s) chosen: {', '.join(d['dense'])}",
              flush=True)
    if backend == "native" and isa != "auto" and d["isa"] != isa:
        return None, f"ran the {d['isa']} kernels, not {isa}"
    return {rule: {"weight": min(v["weight"]), "arch": min(v["arch"]),
                   "peak_rss_gib": v["peak_rss_gib"]} for rule, v in d["rules"].items()}, None


def _step_child(args):
    import json

    backend, (N, C, H, reps, threads), rules = args[0], map(int, args[1:6]), args[6].split(",")
    torch.set_num_threads(threads)
    set_clock(os.environ.get("HDNAS_BENCH_CLOCK", "wall"))
    allocator.tune()  # as the search command does (a no-op under HDNAS_MALLOC=default)
    if backend == "native" and not native.available("cpu"):
        raise SystemExit(2)
    res = step_case(N, C, H, reps, backend, rules)
    isa = native_build.isa() if backend == "native" else None
    routes = sorted({v for v in dense.choices().values()})
    print(json.dumps({"rules": res, "isa": isa, "dense": routes}))


def step_rows(nt, N, C, H, a, isas):
    """Search-step rows: weight step, architecture step, their sum and peak RSS per rule, each
    backend (and kernel variant) in its own fresh process; rounds alternate the processes."""
    procs = ["reference", *(["merged"] if a.step_merged else []), *(f"native[{i}]" for i in isas)]
    res = {b: [] for b in procs}
    fail = {}
    for _ in range(a.step_rounds):
        for b in procs:
            backend, isa = (b, "auto") if not b.startswith("native") else ("native", b[7:-1])
            r, why = step_isolated(N, C, H, a.step_reps, backend, nt, isa, a.rules)
            print(b, r or why, flush=True)
            if r is None:
                fail[b] = why
            else:
                res[b].append(r)

    def best(b, rule, part):
        if not res[b]:
            return None
        if part == "peak_rss_gib":
            return max(r[rule][part] for r in res[b])
        if part == "step":
            return min(r[rule]["weight"] + r[rule]["arch"] for r in res[b])
        return min(r[rule][part] for r in res[b])

    def cell(b, rule, part):
        v = best(b, rule, part)
        if v is None:
            return fail.get(b, "-")
        return f"{v:.2f} GiB" if part == "peak_rss_gib" else f"{v * 1e3:.0f}"
    rows = []
    for rule in a.rules:
        for part, label in (("weight", "weight step"), ("arch", "architecture step"),
                            ("step", "whole step (weight + arch)"),
                            ("peak_rss_gib", "peak RSS of the process")):
            for i in isas:
                b = f"native[{i}]"
                r, n = best("reference", rule, part), best(b, rule, part)
                ratio = "-" if not (r and n) else (f"{n / r:.2f}x of ref" if part == "peak_rss_gib"
                                                   else f"{r / n:.2f}x")
                rows.append((nt, N, f"search step, {rule}: {label}", i, cell("reference", rule, part),
                             cell("merged", rule, part) if a.step_merged else "",
                             cell(b, rule, part), ratio))
                print(rows[-1], flush=True)
    return rows


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
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES,
                   help="update rules of the search-step rows")
    p.add_argument("--step-merged", action="store_true",
                   help="also time the search step on the merged (torch primitives) backend")
    p.add_argument("--only-step", action="store_true", help="skip the primitive and mixed-op rows")
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                   help="torch intra-op thread counts to measure (each a separate table row set)")
    p.add_argument("--isa", nargs="+", default=["auto"],
                   help="CPU kernel variants to measure (portable, avx2, avx512, auto), each "
                        "against the reference in the same run")
    p.add_argument("--clock", choices=CLOCK, default="wall",
                   help="wall: elapsed time; cpu: CPU time of the process (all threads), "
                        "for 1-thread runs on a machine shared with other jobs")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="search-step processes (every backend alike): tuned = hdnas.engine.allocator's "
                        "setting, which the search command uses; default = glibc's default, "
                        "whose page faults cost large-batch steps seconds of system time")
    p.add_argument("--dense", choices=("auto", "direct", "fft"), default=None,
                   help="HDNAS_DENSE_CONV for every process: the merged dense conv's route "
                        "(default: the environment's, else auto = timed per shape)")
    p.add_argument("--out", default=None, help="write the markdown here (appended)")
    a = p.parse_args(argv)
    if a.dense:
        os.environ["HDNAS_DENSE_CONV"] = a.dense
    set_clock(a.clock)
    _malloc["mode"] = a.malloc
    if not native.available("cpu"):
        raise SystemExit(f"native kernels unavailable: {native_build.error('cpu')}")
    runs = native_build.isa_supported()
    isas = [runs[-1] if i == "auto" else i for i in a.isa]
    bad = [i for i in isas if i not in runs]
    if bad:
        raise SystemExit(f"this CPU cannot run the {', '.join(bad)} kernels (it runs: "
                         f"{', '.join(runs)})")
    isas = list(dict.fromkeys(isas))
    C, H = a.channels, a.size
    lines = [f"{common.machine_line('kernel variants it runs: ' + ', '.join(runs))}, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, C={C}, LR {H}x{H}; "
             f"{common.started()}; times in ms ({a.clock} clock), best of the interleaved "
             f"repetitions (reps {a.reps}, search step reps {a.step_reps}, one warm-up each); search-step "
             f"processes with the {a.malloc} malloc setting; merged dense conv route "
             f"{os.environ.get('HDNAS_DENSE_CONV', 'auto')}", ""]
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
        if not a.no_step:
            rows += step_rows(nt, N, C, H, a, isas)
    lines += common.table(["threads", "batch", "what", "kernels", "reference",
                           "merged (torch prims)", "native", "reference / native"],
                          [(t, n, w, i, r, m or "-", nv, x) for t, n, w, i, r, m, nv, x in rows])
    common.emit(lines, a.out)


if __name__ == "__main__":
    main()
