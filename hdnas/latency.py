"""``python -m hdnas.latency``: measure a latency table for latency-aware search
(``hdnas.nas.latency`` holds the measurement, the table format and the prediction)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hdnas.model.cell import MIN_LR_SIZE
from hdnas.model.space import DLSR_PRIMITIVES
from hdnas.nas.latency import measure_table, validate


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WxH, e.g. 640x360, got {text!r}") from None
    if min(w, h) < MIN_LR_SIZE:
        raise argparse.ArgumentTypeError(f"size {text}: the network needs at least "
                                         f"{MIN_LR_SIZE}x{MIN_LR_SIZE}")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hdnas.latency",
                                description="Measure the latency table for latency-aware search.")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--channels", type=int, default=48)
    p.add_argument("--size", type=_size, default=(360, 640), help="LR size WxH (default 640x360, "
                                                                   "a 1280x720 output at x2)")
    p.add_argument("--cells", type=int, default=6)
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--ops", nargs="+", default=list(DLSR_PRIMITIVES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--validate", type=int, default=0, metavar="N",
                   help="also measure N random derived networks against the prediction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the JSON table to write")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but this torch has no CUDA device", file=sys.stderr)
        return 2
    try:
        table = measure_table(args.device, args.channels, args.size, args.ops, args.cells,
                              args.scale, args.warmup, args.repeats,
                              log=lambda m: print(m, file=sys.stderr))
        if args.validate:
            table["validation"] = validate(table, args.validate, args.seed, args.device,
                                           args.warmup, args.repeats)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {out}")
    if args.validate:
        v = table["validation"]
        print(f"prediction vs measurement over {v['n']} random genotypes: mean |rel. error| "
              f"{v['mean_abs_rel_error']:.1%}, max {v['max_abs_rel_error']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
