"""The run folder of a search or a retraining: a new one, its ``config.json`` and log, and
reading one back to resume it (through the schema versions of ``hdnas.engine.schema``)."""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from hdnas.engine.errors import RunError
from hdnas.engine.schema import stamp, upgrade
from hdnas.io import checkpoint
from hdnas.io.atomic import write_atomic

log = logging.getLogger("hdnas")


def new_run_dir(out: str | None, prefix: str) -> Path:
    """A fresh run folder; refuses (``RunError``) to overwrite one that already holds a run."""
    path = Path(out) if out else Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (path / "checkpoint.pt").exists() or (path / "config.json").exists():
        raise RunError(f"{path} already holds a run; resume it with --resume {path} "
                       "or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def environment() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "cuda": torch.version.cuda,
            "threads": torch.get_num_threads()}


def save_config(run_dir: Path, kind: str, given: dict, resolved) -> None:
    """``config.json``: the schema version and kind, the options given, the resolved config
    and the environment."""
    resolved = dataclasses.asdict(resolved) if dataclasses.is_dataclass(resolved) else resolved
    write_json(run_dir / "config.json", stamp({"given": given, "resolved": resolved,
                                               "environment": environment()}, kind))


def read_run(run_dir: Path, kind: str) -> tuple[dict, dict]:
    """(resolved config, checkpoint state) of the run of ``kind`` in ``run_dir``, both in this
    schema version (older ones migrated)."""
    cfg_file, ckpt_file = run_dir / "config.json", run_dir / "checkpoint.pt"
    if not ckpt_file.is_file() or not cfg_file.is_file():
        raise RunError(f"{run_dir} holds no run to resume (config.json and checkpoint.pt are "
                       "needed)")
    config = upgrade(json.loads(cfg_file.read_text()), kind, cfg_file)
    return config["resolved"], upgrade(checkpoint.load(ckpt_file), kind, ckpt_file)


def setup_logging(run_dir: Path, quiet: bool = False) -> None:
    """The ``hdnas`` logger writes to ``run_dir/log.txt`` and, unless ``quiet``, stderr."""
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
