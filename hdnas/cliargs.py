"""Command-line building blocks shared by every command (base layer: standard library only).

* argparse types that refuse what a command cannot use, at parse time (``error: argument
  --x: ...``, exit status 2): ``int_range(lo, hi)`` and ``finite_float(lo, hi)`` (NaN and
  infinities are refused by every float option; bounds are inclusive unless ``lo_open`` /
  ``hi_open``).
* ``add_common(parser)``: ``--debug`` (show the traceback instead of ``error: ...``) and, with
  ``overwrite=True``, ``--overwrite`` (replace existing output files).
* ``run(body, debug)``: calls ``body()`` and turns a bad input (``ValueError``: malformed or
  hostile files, refused writes; ``OSError``: unreadable or unwritable paths;
  ``RecursionError``; ``MemoryError``) into ``error: MESSAGE`` on stderr and exit status 2;
  with ``--debug`` it re-raises.
"""
from __future__ import annotations

import argparse
import math
import sys

__all__ = ["int_range", "finite_float", "add_common", "run", "BAD_INPUT"]

#: exit status of a bad input (README)
BAD_INPUT = 2


def _bounds(lo, hi, lo_open=False, hi_open=False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts)


def int_range(lo: int | None = None, hi: int | None = None):
    """An argparse type: an integer within [lo, hi] (either bound may be None)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: must be {_bounds(lo, hi)}")
        return v
    parse.__name__ = "integer"
    return parse


def finite_float(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False):
    """An argparse type: a finite float within the bounds (NaN and infinities refused)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if ((lo is not None and (v <= lo if lo_open else v < lo))
                or (hi is not None and (v >= hi if hi_open else v > hi))):
            raise argparse.ArgumentTypeError(
                f"{v:g} is out of range: must be {_bounds(lo, hi, lo_open, hi_open)}")
        return v
    parse.__name__ = "number"
    return parse


def add_common(parser: argparse.ArgumentParser, overwrite: bool = False,
               threads: bool = False) -> None:
    """``--debug``; with ``overwrite`` ``--overwrite``; with ``threads`` ``--threads N`` (0: the
    default; ``command`` applies it)."""
    if threads:
        parser.add_argument("--threads", type=int_range(0, 4096), default=0,
                            help="CPU threads (0: torch's default)")
    if overwrite:
        parser.add_argument("--overwrite", action="store_true",
                            help="replace output files that already exist (never the inputs)")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback instead of 'error: ...'")


def command(build_parser, body, argv=None, threads=None) -> int:
    """A command's ``main``: parse ``argv`` with ``build_parser()``, call ``threads(n)`` with
    ``--threads`` when given and not 0 (the caller's way to set its thread count), then
    ``body(args)`` through ``run`` (``--debug`` re-raises)."""
    args = build_parser().parse_args(argv)

    def body_of():
        if threads is not None and getattr(args, "threads", 0):
            threads(args.threads)
        return body(args)
    return run(body_of, args.debug)


def run(body, debug: bool = False) -> int:
    """``body()``'s exit status, or BAD_INPUT with ``error: ...`` on stderr for a bad input."""
    try:
        return body()
    except (ValueError, OSError, RecursionError, MemoryError) as e:
        if debug:
            raise
        msg = str(e) or type(e).__name__
        if isinstance(e, RecursionError):
            msg = f"input nested too deeply ({msg})"
        elif isinstance(e, MemoryError):
            msg = f"out of memory ({msg})"
        print(f"error: {msg}", file=sys.stderr)
        return BAD_INPUT
