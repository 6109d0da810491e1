"""Run folders shared by search and train: layout, config, log, CSV history, device choice."""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import platform
import re
import sys
import time
import typing
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from hdnas import checkpoint

log = logging.getLogger("hdnas")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: this torch ({torch.__version__}) sees no CUDA GPU")
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


def new_run_dir(out: str | None, prefix: str) -> Path:
    """A fresh run folder; refuses to overwrite one that already holds a run."""
    path = Path(out) if out else Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (path / "checkpoint.pt").exists() or (path / "config.json").exists():
        raise SystemExit(f"error: {path} already holds a run; resume it with --resume {path} "
                         "or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def environment() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "cuda": torch.version.cuda,
            "threads": torch.get_num_threads()}


def save_config(run_dir: Path, given: dict, resolved) -> None:
    resolved = dataclasses.asdict(resolved) if dataclasses.is_dataclass(resolved) else resolved
    write_json(run_dir / "config.json", {"given": given, "resolved": resolved,
                                          "environment": environment()})


def setup_logging(run_dir: Path, quiet: bool = False) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    fh = logging.FileHandler(run_dir / "log.txt")
    fh.setFormatter(fmt)
    log.addHandler(fh)
    if not quiet:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        log.addHandler(sh)
    log.propagate = False


class History:
    """One CSV row per logged step. On resume, rows past the checkpoint's step are dropped, so
    the history matches the state the run continues from."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        with self.path.open() as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            if new:
                w.writeheader()
            w.writerow(row)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open() as f:
            return list(csv.DictReader(f))


class Loop:
    """The step loop shared by search and train: progress bar, CSV history, log lines and
    periodic atomic checkpoints. Subclasses give ``train_step``, ``log_row``, ``describe``,
    ``state_dict`` and ``result``, and hold ``cfg`` (steps, log_every, ckpt_every, amp),
    ``step``, ``history``. ``timer`` times every step (part "step"); a ``train_step`` may time
    its own parts with ``self.timer.part(name)``. ``log_row`` gets the timer when the logged
    interval ends: its means are over the steps since the previous logged row."""

    name = "run"

    def __init__(self, cfg, run_dir: Path):
        """Thread count, device, seeds and the data generator, the same way for every loop."""
        self.cfg, self.run_dir = cfg, run_dir
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.amp = Amp(cfg.amp, self.device)
        self.timer = StepTimer(self.device)

    def save(self) -> None:
        """The whole state (``state_dict``), atomically."""
        checkpoint.save_atomic(self.state_dict(), self.run_dir / "checkpoint.pt")

    def run(self, stop_after: int | None = None, quiet: bool = False):
        """Run to ``cfg.steps``. ``stop_after`` stops early without a final checkpoint: tests use
        it as a kill between checkpoints."""
        cfg = self.cfg
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=quiet, desc=self.name, unit="step")
        timer = self.timer
        timer.reset()
        while self.step < end:
            with timer.part("step"):
                out = self.train_step()
            timer.end_step()
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss_train']:.3f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.history.append(self.log_row(out, timer))
                parts = ", ".join(f"{k} {timer.mean(k):.3f}s" for k in sorted(timer.steps)
                                  if k != "step")
                log.info("step %d/%d loss %.4f %.3fs/step%s %s", self.step, cfg.steps,
                         out["loss_train"], timer.mean("step"), f" ({parts})" if parts else "",
                         self.describe(out))
                timer.reset()
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        return self.result()


def _scalar_type(hint):
    """``int`` for ``int``, ``int | None`` and ``Optional[int]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_arguments(p: argparse.ArgumentParser, cfg_cls, helps: dict | None = None) -> None:
    """One flag per config field (``--field-name``), typed by the field's annotation; None
    means 'not given'. ``helps``: extra help text per field name."""
    d, hints, helps = cfg_cls(), typing.get_type_hints(cfg_cls), helps or {}
    for f in dataclasses.fields(cfg_cls):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        text = " ".join(filter(None, [helps.get(f.name), f"(default {default!r})"]))
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, list):
            typ = type(default[0]) if default else str
            p.add_argument(flag, nargs="+", type=typ, default=None, help=text)
        else:
            p.add_argument(flag, type=_scalar_type(hints[f.name]), default=None, help=text)


FIELD_HELP = {  # fields whose name and default do not say enough
    "amp": f"mixed precision, one of {', '.join(AMP_MODES)}: forward passes and losses under "
           "torch.autocast in bf16, or in fp16 with gradient scaling; parameters, alpha/beta "
           "and gradients stay fp32",
    "warmup": "weight-only steps before the architecture updates; unset: --warmup-fraction "
              "of --steps",
    "warmup_fraction": "the warm-up's share of --steps when --warmup is not given",
}


def cli_main(argv, loop_cls, cfg_cls, presets: dict, prog: str, doc: str,
             add_arguments=None, adjust_config=None) -> int:
    """The shared command line of search and train: new run or ``--resume RUN_DIR``."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--preset", choices=sorted(presets),
                   help="start from these settings (each one's differences from the release: "
                        "docs/presets.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or console log")
    if add_arguments:
        add_arguments(p)
    add_config_arguments(p, cfg_cls, FIELD_HELP)
    args = p.parse_args(argv)
    try:
        if args.resume:
            run_dir = Path(args.resume)
            cfg_file = run_dir / "config.json"
            if not (run_dir / "checkpoint.pt").is_file() or not cfg_file.is_file():
                raise SystemExit(f"error: {run_dir} holds no run to resume (config.json and "
                                 "checkpoint.pt are needed)")
            cfg = cfg_cls(**json.loads(cfg_file.read_text())["resolved"])
            setup_logging(run_dir, args.quiet)
            loop = loop_cls(cfg, run_dir)
            loop.load_state_dict(checkpoint.load(run_dir / "checkpoint.pt"))
            loop.history.truncate_after(loop.step)
            log.info("resumed %s at step %d", run_dir, loop.step)
        else:
            given = {k: v for k, v in vars(args).items() if v not in (None, False)}
            cfg = cfg_cls(**presets.get(args.preset, {}))
            for f in dataclasses.fields(cfg_cls):
                if getattr(args, f.name) is not None:
                    setattr(cfg, f.name, getattr(args, f.name))
            if adjust_config:
                adjust_config(cfg, args)
            cfg.validate()
            run_dir = new_run_dir(cfg.out, loop_cls.name)
            cfg.out = str(run_dir)
            setup_logging(run_dir, args.quiet)
            loop = loop_cls(cfg, run_dir)
            save_config(run_dir, given, cfg)
            log.info("run folder %s", run_dir)
        log.info("%s", loop.summary())
        result = loop.run(quiet=args.quiet)
    except ValueError as e:  # DataError, SearchSpaceError, GenotypeError, bad settings
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(loop.finish(result))
    return 0
