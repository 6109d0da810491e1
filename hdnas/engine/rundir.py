"""The run folder of a search or a retraining: a new one (``prepare_out``: new, empty, or
refused), its ``config.json`` and log, its two checkpoints, reading it back to resume it (through
the schema versions of ``hdnas.engine.schema``), and removing what a failed start wrote.

A run writes only into a folder that is new or empty when it starts (or that holds the run being
resumed), and only its own files, each through ``hdnas.io.atomic.write_atomic`` or, for the
append-only ones, ``hdnas.engine.history.open_append``. It keeps two checkpoints:
``checkpoint.pt`` (the last) and ``checkpoint.prev.pt`` (the one before); a resume whose last one
is missing or unreadable continues from the previous one, with a warning naming both.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from hdnas.engine.errors import RunError
from hdnas.engine.history import open_append
from hdnas.engine.schema import stamp, upgrade
from hdnas.io import checkpoint
from hdnas.io.atomic import write_atomic
from hdnas.safeio import read_json

log = logging.getLogger("hdnas")

CONFIG, CKPT, PREV, DAMAGED = ("config.json", "checkpoint.pt", "checkpoint.prev.pt",
                               "checkpoint.damaged.pt")
#: files that make a folder a run folder
RUN_MARKERS = (CONFIG, CKPT, PREV)


def _listing(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def prepare_out(out: str | None, prefix: str) -> tuple[Path, list[Path]]:
    """The folder of a new run: ``out`` (or ``runs/<prefix>-<time>``), which must not exist
    (it is made), or be an empty folder this process can write into. Anything else is a
    ``RunError`` naming the folder and what is in it. Returns the folder and the folders made
    for it (outermost first), which ``discard_start`` removes again."""
    path = Path(out) if out else Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.is_symlink() and not path.exists():
        raise RunError(f"--out {path} is a dangling symbolic link; choose a new or empty folder")
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file, not a folder; choose a new or empty folder")
    created = []
    if path.is_dir():
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise RunError(f"cannot read --out {path}: {e.strerror}") from None
        if any(n in RUN_MARKERS for n in names):
            raise RunError(f"{path} already holds a run; resume it with --resume {path} or "
                           "choose another --out")
        if names:
            raise RunError(f"--out {path} is not empty and holds no run ({_listing(names)}); "
                           "a run writes only into a new or empty folder: choose another --out")
    else:
        missing = [path, *[p for p in path.parents if not p.exists()]]
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise RunError(f"cannot create the run folder --out {path}: {e.strerror}") from None
        created = missing[::-1]
    try:  # can this process write there? (a permission bit says less: root, ACLs, read-only)
        fd, probe = tempfile.mkstemp(prefix=".hdnas-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        discard_start(path, created)
        raise RunError(f"cannot write into --out {path}: {e.strerror}") from None
    return path, created


def discard_start(run_dir: Path, created: list[Path]) -> None:
    """Remove what a start that failed before its first checkpoint wrote: the files of
    ``run_dir`` (empty when the start began, so all of them are the run's) and the folders made
    for it, so that the same command can be run again."""
    close_logging()
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        entries = []
    for p in entries:
        if p.is_symlink() or p.is_file():
            try:
                p.unlink()
            except OSError:
                pass
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            break


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
    write_json(run_dir / CONFIG, stamp({"given": given, "resolved": resolved,
                                        "environment": environment()}, kind))


def record_resume(run_dir: Path, doc: dict, step: int, changed: dict, resolved) -> None:
    """Rewrite ``config.json`` (``doc`` as read) after a resume that changed settings: the new
    resolved config, and under ``resumes`` the step and the options changed."""
    doc = dict(doc, resolved=dataclasses.asdict(resolved))
    doc["resumes"] = list(doc.get("resumes", [])) + [{"step": step, "changed": changed}]
    write_json(run_dir / CONFIG, doc)


def save_checkpoint(state: dict, run_dir: Path) -> None:
    """``checkpoint.pt``, the last one moving to ``checkpoint.prev.pt`` first (a kill between
    the two leaves the previous one, which a resume falls back to)."""
    last = run_dir / CKPT
    if last.is_file() and not last.is_symlink():
        os.replace(last, run_dir / PREV)
    checkpoint.save_atomic(state, last)


def _read_config(path: Path, kind: str) -> dict:
    # bounded, UTF-8, finite numbers: a config.json edited or damaged is refused, named
    doc = read_json(path, "run config", error=RunError)
    if not isinstance(doc, dict):
        raise RunError(f"{path} is not a run's config (a JSON {type(doc).__name__}, not an "
                       "object)")
    doc = upgrade(doc, kind, path)
    if not isinstance(doc.get("resolved"), dict):
        raise RunError(f"{path} is not a run's config (no 'resolved' settings)")
    return doc


def _read_checkpoint(run_dir: Path, kind: str) -> tuple[dict, Path, list[str]]:
    """(state, the file it came from, warnings): the last checkpoint, or the previous one when
    the last is missing or unreadable (``set_aside_damaged`` then moves it out of the
    rotation)."""
    problems = {}
    for path in (run_dir / CKPT, run_dir / PREV):
        if not path.is_file():
            problems[path] = "missing"
            continue
        try:
            state = checkpoint.load(path)
        except (checkpoint.CheckpointError, OSError) as e:
            problems[path] = str(e).removeprefix(f"{path}: ")
            continue
        if not isinstance(state, dict):
            raise RunError(f"{path} is not a checkpoint of a run (it holds a "
                           f"{type(state).__name__})")
        state = upgrade(state, kind, path)
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise RunError(f"{path} is not a checkpoint of a run (step {step!r})")
        warnings = []
        if path.name == PREV:
            last = run_dir / CKPT
            warnings.append(f"{last} is {problems[last]}; resuming from the previous "
                            f"checkpoint {path} (step {step})"
                            + (f"; {last.name} is kept as {DAMAGED}" if last.is_file() else ""))
        return state, path, warnings
    raise RunError(f"{run_dir} holds no readable checkpoint to resume: " + "; ".join(
        f"{p.name} {why}" for p, why in problems.items()))


def set_aside_damaged(run_dir: Path) -> None:
    """A resume from checkpoint.prev.pt: the damaged checkpoint.pt becomes
    checkpoint.damaged.pt (kept for inspection), so the next checkpoint does not rotate it over
    the good previous one."""
    last = run_dir / CKPT
    if last.is_file() or last.is_symlink():
        os.replace(last, run_dir / DAMAGED)


def read_run(run_dir: Path, kind: str) -> tuple[dict, dict, str, list[str]]:
    """(config.json as read, checkpoint state, the checkpoint's path, warnings) of the run of
    ``kind`` in ``run_dir``, both files in this schema version (older ones migrated). A folder
    without a run, a config that does not parse and a checkpoint of another kind are
    ``RunError``s / ``SchemaError``s."""
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise RunError(f"--resume {run_dir} {what}: no run to resume")
    cfg_file = run_dir / CONFIG
    if not cfg_file.is_file():
        raise RunError(f"{run_dir} holds no run to resume (no {CONFIG})")
    if not (run_dir / CKPT).is_file() and not (run_dir / PREV).is_file():
        raise RunError(f"{run_dir} holds no run to resume: it has a {CONFIG} but no checkpoint "
                       "(the run stopped before its first one); start again with another --out")
    doc = _read_config(cfg_file, kind)
    state, path, warnings = _read_checkpoint(run_dir, kind)
    return doc, state, str(path), warnings


def log_to_file(message: str) -> None:
    """``message`` into the run's log file only (the console gets it otherwise)."""
    for h in log.handlers:
        if isinstance(h, _AppendHandler):
            h.handle(log.makeRecord(log.name, logging.ERROR, "", 0, message, None, None))


def close_logging() -> None:
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


class _AppendHandler(logging.StreamHandler):
    """A log file opened with ``open_append`` (no symbolic link followed)."""

    def __init__(self, path: Path):
        super().__init__(open_append(path))

    def close(self):
        try:
            self.stream.close()
        finally:
            super().close()


def setup_logging(run_dir: Path, quiet: bool = False) -> None:
    """The ``hdnas`` logger writes to ``run_dir/log.txt`` and, unless ``quiet``, stderr."""
    log.setLevel(logging.INFO)
    close_logging()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    fh = _AppendHandler(run_dir / "log.txt")
    fh.setFormatter(fmt)
    log.addHandler(fh)
    if not quiet:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        log.addHandler(sh)
    log.propagate = False
