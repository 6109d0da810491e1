"""The errors of a run, and the exit status each one gives (``hdnas.engine.cli``)."""
from __future__ import annotations

#: exit statuses of ``python -m hdnas.search`` / ``hdnas.train``
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED = 0, 1, 2, 3


class RunError(ValueError):
    """A run that cannot start or resume as asked: its ``--out`` folder already holds a run or
    someone else's files, is a file or cannot be written; ``--resume`` finds no run, a damaged or
    foreign checkpoint, or a config.json that does not parse; an option given with ``--resume``
    conflicts with the run's; the device is not there. ``python -m hdnas.search`` /
    ``hdnas.train`` stop with ``error: MESSAGE`` and exit status 2, as for any other bad input
    (``ValueError``). A ``ValueError`` so that ``Dist.on_main`` raises rank 0's on every rank."""


class DivergedError(RuntimeError):
    """A run whose loss, gradients or weights stopped being finite numbers. The run stops
    without saving that state (its last checkpoint stays the last good one): ``error: MESSAGE``
    and exit status 3."""

    def __init__(self, what: str, step: int):
        super().__init__(f"{what} at step {step}: the run diverged and stops (a smaller --lr "
                         "or --grad-clip may help)")
        self.step = step
