"""How many CPU threads a run uses, chosen from the cores this process may use and how busy the
other processes keep them, and re-checked while it runs.

Why: a search step is many small parallel regions; OpenMP's threads spin-wait at each for a
core. Beside a busy neighbour one of them does not get its core, and every region waits for it:
with one single-thread process busy on a 2-core machine a 2-thread search step was measured 45x
slower than the same step with one thread. With as many threads as there are free cores the
spinning costs nothing, so the quiet case keeps OpenMP's defaults (``OMP_WAIT_POLICY=PASSIVE``
would cost a quiet machine 2.5x instead).

Policy (``--threads 0``, the default): threads = usable CPUs (the affinity mask, bounded by a
cgroup CPU quota) minus the cores other processes keep busy (rounded: a neighbour at 60 % of a
core takes it), at least 1. Other processes' load is the machine's busy time (``/proc/stat``)
less this process's own (``/proc/self/stat``), over the last interval; it is measured before
the run and again every ``interval`` seconds, and the thread count follows it. ``--threads N``
fixes N; ``--deterministic`` fixes the usable-CPU count (thread counts change the order of
some reductions, so a run that must be reproducible does not follow the load). Every decision
is logged with its reason."""
from __future__ import annotations

import logging
import math
import os
import time

import torch

log = logging.getLogger("hdnas")

#: a neighbour counts as holding a core from this share of one on (0.6 of a core: it takes it)
BUSY_THRESHOLD = 0.5
#: seconds between load measurements during a run
INTERVAL = 5.0


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, bounded by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _machine_busy() -> float | None:
    """Seconds of CPU time all processes used so far (``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    steal = v[7] if len(v) > 7 else 0  # time a hypervisor gave to another guest
    return (sum(v[:8]) - idle - steal) / os.sysconf("SC_CLK_TCK")


def _own_busy() -> float:
    t = os.times()
    return t.user + t.system


def choose(usable: int, others: float, threshold: float = BUSY_THRESHOLD) -> int:
    """Threads for ``usable`` CPUs when other processes keep ``others`` cores busy."""
    taken = math.floor(others + (1 - threshold)) if others > 0 else 0
    return max(1, min(usable, usable - taken))


class ThreadGovernor:
    """Sets torch's intra-op thread count for a run (module docstring) and keeps it in step with
    the load of other processes: ``check()`` between steps costs two small file reads every
    ``interval`` seconds."""

    def __init__(self, requested: int = 0, deterministic: bool = False,
                 interval: float = INTERVAL, clock=time.monotonic):
        self.usable = usable_cpus()
        self.adaptive = requested == 0 and not deterministic and _machine_busy() is not None
        self.interval, self.clock = interval, clock
        if requested:
            self.threads, why = requested, f"--threads {requested}"
        elif deterministic:
            self.threads, why = self.usable, "--deterministic: all usable CPUs, not following the load"
        elif not self.adaptive:
            self.threads, why = self.usable, "no /proc/stat to measure the load"
        else:
            others = self.measure(0.3)
            self.threads = choose(self.usable, others)
            why = f"other processes keep {others:.1f} of them busy"
        torch.set_num_threads(self.threads)
        #: the decision and why (the run log prints it after the run's summary)
        self.reason = f"{self.threads} thread(s) of {self.usable} usable CPU(s): {why}"
        self._mark()

    def _mark(self):
        self._t, self._busy, self._own = self.clock(), _machine_busy(), _own_busy()

    def others_since_mark(self) -> float:
        """Cores other processes kept busy since the last mark."""
        t, busy, own = self.clock(), _machine_busy(), _own_busy()
        dt = t - self._t
        if dt <= 0 or busy is None or self._busy is None:
            return 0.0
        return max(0.0, ((busy - self._busy) - (own - self._own)) / dt)

    def measure(self, seconds: float) -> float:
        self._mark()
        time.sleep(seconds)
        return self.others_since_mark()

    def check(self) -> int:
        """Between steps: follow the load (every ``interval`` seconds); returns the threads."""
        if not self.adaptive or self.clock() - self._t < self.interval:
            return self.threads
        others = self.others_since_mark()
        want = choose(self.usable, others)
        if want != self.threads:
            log.info("threads: %d -> %d of %d usable CPU(s): other processes kept %.1f of them "
                     "busy over the last %.0f s", self.threads, want, self.usable, others,
                     self.clock() - self._t)
            self.threads = want
            torch.set_num_threads(want)
        self._mark()
        return self.threads
