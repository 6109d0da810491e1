"""Atomic file writes: every file the package writes goes through ``write_atomic``, so a file is
always whole or absent, even when the process is killed mid-write."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path, write) -> Path:
    """``write(f)`` into a temporary file beside ``path``, flushed to disk, then renamed over
    ``path``: the file is always whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
