"""``python -m hdnas.visualize RUN_DIR``: redraw a run's pictures (``hdnas.engine.plots``)."""
from __future__ import annotations

import argparse
import sys

from hdnas.engine.plots import plot_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hdnas.visualize", description="Redraw the pictures of a run folder.")
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    try:
        for path in plot_run(args.run_dir):
            print(path)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
