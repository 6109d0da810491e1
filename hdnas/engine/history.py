"""``history.csv``: one row per logged step of a run; and appending safely to a run's files."""
from __future__ import annotations

import csv
import io
import os
import stat
from pathlib import Path

from hdnas.io.atomic import write_atomic

#: the validation columns every history ends with
VAL_COLUMNS = ["val_psnr", "val_ssim"]


def open_append(path: Path):
    """``path`` opened for appending text (created if absent): never through a symbolic link
    (``O_NOFOLLOW``), and only a regular file (not a FIFO or a device). The run's append-only
    files (``history.csv``, ``genotypes.jsonl``, ``log.txt``) are opened this way; a file the
    run rewrites goes through ``write_atomic``."""
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_NONBLOCK", 0))
    fd = os.open(path, flags, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.fdopen(fd, "a", newline="", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


class History:
    """One CSV row per logged step. On resume, rows past the checkpoint's step are dropped, so
    the history matches the state the run continues from (and so is a row that a kill cut
    short)."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        rows = [r for r in self.read() if self._step(r) is not None and self._step(r) <= step]
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, self.fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        write_atomic(self.path, lambda f: f.write(text.getvalue().encode()))

    @staticmethod
    def _step(row: dict) -> int | None:
        """The row's step; None for a row that is not whole (cut by a kill) or not a row."""
        if None in row or None in row.values():
            return None
        try:
            return int(row["step"])
        except (KeyError, ValueError):
            return None

    def append(self, row: dict) -> None:
        with open_append(self.path) as f:
            w = csv.DictWriter(f, self.fields)
            if f.tell() == 0:
                w.writeheader()
            w.writerow(row)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))
