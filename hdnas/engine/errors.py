"""The error of a run that cannot start or resume as asked."""
from __future__ import annotations


class RunError(ValueError):
    """A run that cannot start or resume: its folder already holds a run, holds none to resume,
    or its device is not there. ``python -m hdnas.search`` / ``hdnas.train`` stop with
    ``error: MESSAGE`` and exit status 1 (other ``ValueError``s: status 2). A ``ValueError`` so
    that ``Dist.on_main`` raises rank 0's on every rank."""
