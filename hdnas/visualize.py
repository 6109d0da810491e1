"""``python -m hdnas.visualize RUN_DIR``: redraw a run's pictures (``hdnas.engine.plots``).

A run folder that cannot be drawn (no or a malformed ``config.json`` / ``history.csv``) is
``error: ...`` naming the file, exit status 2 (``--debug``: the traceback)."""
from __future__ import annotations

import argparse
import sys

from hdnas.cliargs import add_common, run
from hdnas.engine.plots import plot_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hdnas.visualize",
                                description="Redraw the pictures of a run folder.")
    p.add_argument("run_dir")
    add_common(p)
    args = p.parse_args(argv)

    def body() -> int:
        for path in plot_run(args.run_dir):
            print(path)
        return 0

    return run(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
