"""``history.csv``: one row per logged step of a run."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from hdnas.io.atomic import write_atomic

#: the validation columns every history ends with
VAL_COLUMNS = ["val_psnr", "val_ssim"]


class History:
    """One CSV row per logged step. On resume, rows past the checkpoint's step are dropped, so
    the history matches the state the run continues from."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        rows = [r for r in self.read() if int(r["step"]) <= step]
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, self.fields)
        w.writeheader()
        w.writerows(rows)
        write_atomic(self.path, lambda f: f.write(text.getvalue().encode()))

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
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))
