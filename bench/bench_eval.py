"""CPU benchmark: evaluation (inference) of a derived network, stock PyTorch ("torch", NCHW)
against its depthwise convs on the native kernels (``DerivedNet.set_depthwise("native")``),
against stock PyTorch in channels-last memory format and against ``hdnas.infer.fused``'s fused
oneDNN path (hdnas.evaluate's --backend choices).

    OMP_WAIT_POLICY=PASSIVE python -m bench.bench_eval --threads 1 2 --out bench/results/cpu_step.md

The network is the released beta21 architecture at x2 (randomly initialised: the timing does not
depend on the weights). Inputs: one 256x256 LR image and the first ``--images`` LR images of
each of ../shared/data/Set5 and Set14 (``$HDNAS_SHARED/data`` if set; skipped if missing);
``--four-sets`` adds random inputs of B100's and Urban100's LR sizes and projects a whole
four-set evaluation (219 images) per mode. All modes run in the same process, interleaved,
best of ``--reps`` after one warm-up, under ``torch.no_grad`` as hdnas.evaluate does.
"Equal numbers" is checked on every input: the largest difference of the SR outputs (0..255
scale) and the share of 8-bit pixels that differ after rounding.
"""
from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.common import CLOCK  # noqa: E402
from hdnas import native_build  # noqa: E402
from hdnas.infer.fused import FusedInference  # noqa: E402
from hdnas.mixed import native  # noqa: E402
from hdnas.model.genotype import BETA21  # noqa: E402
from hdnas.model.network import DerivedNet  # noqa: E402
from hdnas.testing.shared import shared_dir  # noqa: E402

SHARED = shared_dir() / "data"


# LR sizes (x2) standing in for the two large standard sets that ../shared does not hold: every
# B100 image is 481x321 (or 321x481) HR; Urban100's HR images average about 1024x760 pixels.
PROXIES = {"B100": ((240, 160), 100), "Urban100": ((512, 380), 100)}


def _random_lr(w: int, h: int) -> torch.Tensor:
    """A smooth-ish random LR image (8x8-pixel blocks), 0..255 like an 8-bit one."""
    base = torch.rand(1, 3, max(1, h // 8), max(1, w // 8)) * 255
    return torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear")


def inputs(n_images: int, proxies: bool = False):
    """(label, LR tensor, how many images of a four-set evaluation it stands for)."""
    from hdnas.io.images import load_rgb

    torch.manual_seed(0)
    out = [("random 256x256", _random_lr(256, 256), 0)]
    if proxies:
        out += [(f"random {w}x{h} ({s}-sized)", _random_lr(w, h), n)
                for s, ((w, h), n) in PROXIES.items()]
    for s in ("Set5", "Set14"):
        files = sorted((SHARED / s).glob("*_LR.png"))[:n_images]
        for f in files:
            lr = load_rgb(f, as_tensor=True, gray="replicate").float()[None]
            out.append((f"{s} {f.name.split('_SRF')[0]} {lr.shape[-1]}x{lr.shape[-2]}", lr, 1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--images", type=int, default=2, help="LR images per set")
    p.add_argument("--clock", choices=CLOCK, default="wall",
                   help="wall: elapsed time; cpu: CPU time of the process (1-thread runs on a "
                        "shared machine)")
    p.add_argument("--four-sets", action="store_true",
                   help="also time random inputs of B100's and Urban100's LR sizes and project "
                        "the time of evaluating all four standard sets at x2 (219 images): the "
                        "Set5/Set14 images measured (all of them: --images is raised to 14), "
                        "B100 and Urban100 as 100 images each of their proxy size")
    p.add_argument("--out", default=None, help="append the markdown here")
    a = p.parse_args(argv)
    if a.four_sets:
        a.images = max(a.images, 14)
    clock = CLOCK[a.clock]
    if not native.available("cpu"):
        raise SystemExit(f"native kernels unavailable: {native_build.error('cpu')}")
    net = DerivedNet(BETA21).eval()
    head = (f"{common.machine_line('kernel variant ' + native_build.isa())}; "
            f"{common.started()}; beta21 x2 (C=48), batch 1, ms ({a.clock} clock), best of "
            f"{a.reps} interleaved reps")
    print(head, flush=True)
    netcl = copy.deepcopy(net).set_depthwise("torch").to(memory_format=torch.channels_last)
    fused = FusedInference(copy.deepcopy(net).set_depthwise("torch"))
    modes = {  # name: (network, depthwise mode or None, input memory format, column title)
        "torch": (net, "torch", torch.contiguous_format, "torch (NCHW)"),
        "native": (net, "native", torch.contiguous_format, "native depthwise (NCHW)"),
        "channels_last": (netcl, "torch", torch.channels_last, "torch channels_last"),
        "fused": (fused, None, torch.contiguous_format, "fused (oneDNN epilogues, NHWC)")}
    others = [m for m in modes if m != "torch"]
    rows, totals, projected = [], {}, {}
    for nt in a.threads:
        torch.set_num_threads(nt)
        for name, x, count in inputs(a.images, a.four_sets):
            ys = {}

            def runner(mode, m, xi):
                def run():
                    ys[mode] = m(xi)
                return run

            def switch(m, dw):
                return lambda: m.set_depthwise(dw)

            fns = {mode: runner(mode, m, x.contiguous(memory_format=fmt))
                   for mode, (m, _, fmt, _) in modes.items()}
            prepare = {mode: switch(m, dw) for mode, (m, dw, _, _) in modes.items() if dw}
            with torch.no_grad():
                res = common.timeit(fns, a.reps, clock=clock, prepare=prepare)
            best = {m: min(v) for m, v in res.items()}
            for m, t in best.items():
                totals[(nt, m)] = totals.get((nt, m), 0.0) + t
                projected[(nt, m)] = projected.get((nt, m), 0.0) + count * t
            cells = []
            for m in others:
                diff = (ys["torch"] - ys[m]).abs().max().item()
                q0, q1 = (y.clamp(0, 255).round() for y in (ys["torch"], ys[m]))
                cells.append(f"{best['torch'] / best[m]:.2f}x ({diff:.2g}, "
                             f"{100 * (q0 != q1).float().mean().item():.3f} %)")
            rows.append(f"| {nt} | {name} | " + " | ".join(f"{best[m] * 1e3:.0f}" for m in modes)
                        + f" | {' | '.join(cells)} |")
            print(rows[-1], flush=True)
        tt = totals[(nt, "torch")]
        rows.append(f"| {nt} | **all of the above** | "
                    + " | ".join(f"{totals[(nt, m)] * 1e3:.0f}" for m in modes) + " | "
                    + " | ".join(f"**{tt / totals[(nt, m)]:.2f}x**" for m in others) + " |")
        if a.four_sets:
            pt = projected[(nt, "torch")]
            rows.append(f"| {nt} | four sets x2 (Set5/Set14 measured, 100 + 100 proxies), "
                        "projected, **minutes** | "
                        + " | ".join(f"{projected[(nt, m)] / 60:.1f}" for m in modes) + " | "
                        + " | ".join(f"**{pt / projected[(nt, m)]:.2f}x**" for m in others)
                        + " |")
    titles = [modes[m][3] for m in modes]
    ratio_titles = [f"torch / {m}" + (" (max abs diff on 0..255, 8-bit pixels that differ)"
                                      if i == 0 else " (same)") for i, m in enumerate(others)]
    header = common.table(["threads", "input (LR)", *titles, *ratio_titles], [])
    common.emit([head, "", *header, *rows], a.out)


if __name__ == "__main__":
    main()
