"""What a training loop runs on: the device, mixed precision, step timing, the LR schedule step."""
from __future__ import annotations

import contextlib
import math
import os
import re
import time
import warnings
from collections import defaultdict

import torch

from hdnas.engine.errors import RunError


#: the device types a run can use (``--device``), besides ``auto``
DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device_name(name: str) -> None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; anything else is a ``ValueError``
    naming ``--device``. Whether the device is there is ``pick_device``'s question."""
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ValueError(f"{name!r} is not a device hdnas runs on (auto, cpu, cuda, cuda:N, "
                         "mps)")


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; otherwise the named device, which
    must be there (``RunError``)."""
    try:
        check_device_name(name)
    except ValueError as e:
        raise RunError(f"--device {e}") from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RunError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                           "CUDA GPUs")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"--device {name}: this torch ({torch.__version__}) sees no MPS device")
    return dev


AMP_MODES = ("off", "bf16", "fp16")
_AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(mode: str) -> None:
    if mode not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {mode!r}")


class Amp:
    """Mixed precision for one loop. ``autocast()`` wraps forward passes and losses (parameters,
    alpha/beta and all gradients stay fp32: autocast only lowers the precision of the op
    inputs); ``scaler()`` makes a gradient scaler, active for fp16 only (bf16 has fp32's
    exponent range, so its gradients need no scaling)."""

    def __init__(self, mode: str, device: torch.device):
        check_amp(mode)
        self.mode, self.device_type, self.dtype = mode, device.type, _AMP_DTYPES[mode]
        if self.dtype is not None:
            # torch disables an autocast it cannot do (with a warning) instead of failing
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.autocast(self.device_type, dtype=self.dtype):
                    ok = (torch.is_autocast_enabled(self.device_type)
                          and torch.get_autocast_dtype(self.device_type) == self.dtype)
            if not ok:
                raise ValueError(f"--amp {mode}: this torch ({torch.__version__}) cannot autocast "
                                 f"to {self.dtype} on {self.device_type}; use --amp off or "
                                 "another device")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler: pass-through (``scale`` returns the loss, ``step`` steps the
        optimizer) unless the mode is fp16."""
        return torch.amp.GradScaler(self.device_type, enabled=self.mode == "fp16")


def step_schedule(sched) -> None:
    """``sched.step()``, without torch's warning that it ran before the optimizer's first step:
    with fp16 the gradient scaler skips the first steps while it finds its scale, and the
    schedule counts steps, skipped or not."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"),
                                UserWarning)
        sched.step()


class StepTimer:
    """Wall time per step and per named part of a step, over the steps since the last
    ``reset``. ``mean(part)`` averages over the steps in which ``part`` ran (its parts entered
    several times in one step add up); NaN if none did. On CUDA each reading synchronises the
    device, so the times are those of the work, not of its launch."""

    def __init__(self, device: torch.device, clock=time.perf_counter):
        self.clock, self.sync = clock, device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.total, self.steps, self._seen = defaultdict(float), defaultdict(int), set()

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return self.clock()

    @contextlib.contextmanager
    def part(self, name: str):
        t = self.now()
        try:
            yield
        finally:
            self.total[name] += self.now() - t
            self._seen.add(name)

    def end_step(self) -> None:
        for name in self._seen:
            self.steps[name] += 1
        self._seen.clear()

    def mean(self, name: str) -> float:
        return self.total[name] / self.steps[name] if self.steps[name] else math.nan


def passive_openmp_warning() -> str | None:
    """Why ``OMP_WAIT_POLICY=PASSIVE`` slows this process down, when it does."""
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE" \
            and torch.get_num_threads() > 1:
        return (f"OMP_WAIT_POLICY=PASSIVE with {torch.get_num_threads()} threads: OpenMP threads "
                "sleep between the many small parallel regions of a step (measured: a 2-thread "
                "CPU step 2.5x slower); unset it, or run 1 thread")
    return None
