"""``python -m hdnas.latency``: measure a latency table for latency-aware search
(``hdnas.nas.latency`` holds the measurement, the table format and the prediction).

Every number is checked at parse time (``--channels`` 4..1024, ``--repeats`` >= 1, ...); the
table is checked before it is written (finite times > 0) and replaces an existing ``--out`` only
with ``--overwrite``. Bad input: ``error: ...``, exit status 2 (``--debug``: the traceback)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hdnas.cliargs import add_common, int_range, command
from hdnas.io.atomic import OutputDir
from hdnas.io.images import max_pixels
from hdnas.model.cell import MIN_LR_SIZE
from hdnas.model.genotype import MAX_CELLS, MAX_CHANNELS
from hdnas.model.space import DLSR_PRIMITIVES
from hdnas.nas.latency import measure_table, save_table, validate


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WxH, e.g. 640x360, got {text!r}") from None
    if min(w, h) < MIN_LR_SIZE:
        raise argparse.ArgumentTypeError(f"size {text}: the network needs at least "
                                         f"{MIN_LR_SIZE}x{MIN_LR_SIZE}")
    if w * h > max_pixels():
        raise argparse.ArgumentTypeError(f"size {text}: more than {max_pixels():,} pixels "
                                         "(HDNAS_MAX_PIXELS)")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hdnas.latency",
                                description="Measure the latency table for latency-aware search.")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--channels", type=int_range(4, MAX_CHANNELS), default=48)
    p.add_argument("--size", type=_size, default=(360, 640), help="LR size WxH (default 640x360, "
                                                                   "a 1280x720 output at x2)")
    p.add_argument("--cells", type=int_range(2, MAX_CELLS), default=6)
    p.add_argument("--scale", type=int_range(2, 4), default=2)
    p.add_argument("--ops", nargs="+", default=list(DLSR_PRIMITIVES))
    p.add_argument("--warmup", type=int_range(0, 10**6), default=2)
    p.add_argument("--repeats", type=int_range(1, 10**6), default=5)
    p.add_argument("--validate", type=int_range(0, 10**4), default=0, metavar="N",
                   help="also measure N random derived networks against the prediction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the JSON table to write")
    add_common(p, overwrite=True, threads=True)
    return p


def main(argv=None) -> int:
    return command(build_parser, _main, argv, torch.set_num_threads)


def _main(args) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but this torch has no CUDA device", file=sys.stderr)
        return 2
    OutputDir(Path(args.out).parent, args.overwrite).claim(args.out)  # before measuring
    table = measure_table(args.device, args.channels, args.size, args.ops, args.cells,
                          args.scale, args.warmup, args.repeats,
                          log=lambda m: print(m, file=sys.stderr))
    if args.validate:
        table["validation"] = validate(table, args.validate, args.seed, args.device,
                                       args.warmup, args.repeats)
    out = save_table(table, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    if args.validate:
        v = table["validation"]
        print(f"prediction vs measurement over {v['n']} random genotypes: mean |rel. error| "
              f"{v['mean_abs_rel_error']:.1%}, max {v['max_abs_rel_error']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
