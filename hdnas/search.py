"""``python -m hdnas.search``: the DLSR bilevel search, then the derived genotype.

Alternates weight steps on the train split and architecture steps on the arch split (after a
warm-up), logs alpha/beta, writes the genotype, and checkpoints atomically so ``--resume``
continues a killed run exactly where its last checkpoint left it.
"""
from __future__ import annotations

import argparse
import sys

from hdnas.engine.cli import cli_main
from hdnas.engine.search import PRESETS, Search, SearchConfig
from hdnas.mixed import available_backends


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fused", action="store_true",
                   help="use the fastest fused backend available (what the default 'auto' does)")
    p.epilog = ("backends: " + ", ".join(available_backends()) + ", auto (the default: the "
                "fastest backend proven exact on this device; 'reference' is the plain loop), "
                "fused.")


def adjust_args(args) -> None:
    """``--fused``: ``--backend fused``."""
    if args.fused:
        if args.backend not in (None, "fused"):
            raise ValueError(f"--fused and --backend {args.backend}: give one of them")
        args.backend = "fused"


def main(argv=None) -> int:
    return cli_main(argv, Search, SearchConfig, PRESETS, "python -m hdnas.search", __doc__,
                    add_arguments, adjust_args)


if __name__ == "__main__":
    sys.exit(main())
