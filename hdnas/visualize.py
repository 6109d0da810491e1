"""``python -m hdnas.visualize RUN_DIR``: redraw every picture of a run folder (alpha.png,
beta.png, val.png, curves.png, network.png: ``hdnas.engine.plots``);
``python -m hdnas.visualize genotype.json [--out FILE]`` (or a released name: BETA21, PARA_LOSS,
TINY18): draw that network (PNG, or SVG / PDF by the suffix of ``--out``).

A run folder that cannot be drawn (no or a malformed ``config.json`` / ``history.csv``), a
genotype that is not one, or an ``--out`` that exists without ``--overwrite`` is
``error: ...`` naming the file, exit status 2 (``--debug``: the traceback)."""
from __future__ import annotations

import argparse
import sys

from hdnas.cliargs import add_common, run
from hdnas.engine.plots import draw_source


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hdnas.visualize",
                                description="Redraw the pictures of a run folder, or draw a "
                                            "genotype (a genotype.json or a released name).")
    p.add_argument("source", metavar="RUN_DIR|GENOTYPE",
                   help="a run folder of hdnas.search / hdnas.train, a genotype JSON file, or "
                        "BETA21 / PARA_LOSS / TINY18")
    p.add_argument("--out", help="the drawing of a genotype (default: the genotype file's name "
                                 "with .png, or <name>.png here); .png, .svg or .pdf")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_common(p)
    args = p.parse_args(argv)

    def body() -> int:
        for path in draw_source(args.source, args.out, args.overwrite):
            print(path)
        return 0

    return run(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
