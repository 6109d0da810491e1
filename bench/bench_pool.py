"""The 3x3 max pool (padding 1) of DARTS' mixed op, by route: PyTorch on NCHW, PyTorch on a
channels-last copy (what the fused op does where the primitives have no pool), the native kernel.

    python -m bench.bench_pool                        # batch 32 and 64, stride 1 and 2
    python -m bench.bench_pool --batch 64 --out bench/results/cpu_darts.md

Shapes as in DARTS' search network: stride 1 on (N, 16, 32, 32), stride 2 on (N, 32, 32, 32)
(the first reduction cell). Each route as the fused op runs it, from an NCHW x to an NCHW
output and back: the channels-last route includes its copies (x to channels-last, the output to
NCHW, and their gradients). Forward, and forward + backward, interleaved in one process
(nchw, channels-last, native, nchw, ...), the minimum of ``--reps`` after a warm-up, 1 thread by
default; ratios against the channels-last route of the same row.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench import common


def routes(native_ok: bool) -> dict:
    """name -> pool(x, stride), each from NCHW to NCHW."""
    out = {"nchw": lambda x, s: F.max_pool2d(x, 3, s, 1),
           "channels-last": lambda x, s: F.max_pool2d(
               x.contiguous(memory_format=torch.channels_last), 3, s, 1).contiguous()}
    if native_ok:
        out["native"] = lambda x, s: torch.ops.hdnas_native.max_pool3x3(x, s)
    return out


def measure(batch: int, stride: int, reps: int, native_ok: bool, C: int = 16, size: int = 32):
    """{route: (forward seconds, forward + backward seconds)}, minima over ``reps``."""
    torch.manual_seed(0)
    x = torch.randn(batch, C * stride, size, size, requires_grad=True)
    fns = routes(native_ok)
    g = torch.randn_like(fns["nchw"](x, stride))

    def fwd(f):
        return lambda: f(x.detach(), stride)

    def both(f):
        return lambda: f(x, stride).backward(g)

    t_f = common.timeit({k: fwd(f) for k, f in fns.items()}, reps)
    t_b = common.timeit({k: both(f) for k, f in fns.items()}, reps)
    return {k: (min(t_f[k]), min(t_b[k])) for k in fns}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--stride", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument("--C", type=int, default=16, help="channels at stride 1 (2C at stride 2)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="append the table to this Markdown file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from hdnas.mixed import native
    native_ok = native.available("cpu")
    rows = []
    for b in a.batch:
        for s in a.stride:
            res = measure(b, s, a.reps, native_ok, a.C, a.size)
            base = res["channels-last"]
            for k, (tf, tb) in res.items():
                rows.append([b, s, k, tf * 1e3, base[0] / tf, tb * 1e3, base[1] / tb])
    lines = [f"### 3x3 max pool routes ({common.started()})", "",
             common.machine_line(f"{a.threads} thread(s)")
             + ("" if native_ok else "; native kernels unavailable"), "",
             *common.table(["batch", "stride", "route", "fwd ms", "x channels-last",
                            "fwd+bwd ms", "x channels-last"], rows)]
    common.emit(lines, a.out)
    return rows


if __name__ == "__main__":
    main()
