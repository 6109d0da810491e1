"""Run folders shared by search and train: layout, config, log, CSV history, device choice."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import platform
import sys
import time
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
    ``save`` and ``result``, and hold ``cfg`` (steps, log_every, ckpt_every), ``step``,
    ``history``."""

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

    def save(self) -> None:
        """The whole state (``state_dict``), atomically."""
        checkpoint.save_atomic(self.state_dict(), self.run_dir / "checkpoint.pt")

    def run(self, stop_after: int | None = None, quiet: bool = False):
        """Run to ``cfg.steps``. ``stop_after`` stops early without a final checkpoint: tests use
        it as a kill between checkpoints."""
        cfg = self.cfg
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=quiet, desc=self.name, unit="step")
        t0, n0 = time.perf_counter(), self.step
        while self.step < end:
            out = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss_train']:.3f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                sec = (time.perf_counter() - t0) / max(1, self.step - n0)
                self.history.append(self.log_row(out, sec))
                log.info("step %d/%d loss %.4f %.2fs/step %s", self.step, cfg.steps,
                         out["loss_train"], sec, self.describe(out))
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        return self.result()


def add_config_arguments(p: argparse.ArgumentParser, cfg_cls) -> None:
    """One flag per config field (``--field-name``); None means 'not given'."""
    d = cfg_cls()
    for f in dataclasses.fields(cfg_cls):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(default, list):
            typ = type(default[0]) if default else str
            p.add_argument(flag, nargs="+", type=typ, default=None, help=f"default {default}")
        else:
            typ = type(default) if default is not None else float  # None: optional number
            p.add_argument(flag, type=typ, default=None, help=f"default {default!r}")


def cli_main(argv, loop_cls, cfg_cls, presets: dict, prog: str, doc: str,
             add_arguments=None, adjust_config=None) -> int:
    """The shared command line of search and train: new run or ``--resume RUN_DIR``."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--preset", choices=sorted(presets), help="start from these settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar or console log")
    if add_arguments:
        add_arguments(p)
    add_config_arguments(p, cfg_cls)
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
