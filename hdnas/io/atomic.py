"""Atomic file writes: every file the package writes goes through ``write_atomic`` (the code is
in the base layer, ``hdnas.safeio``, so that the model's genotype files use it too): a file is
always whole or absent, even when the process is killed mid-write; its temporary file has an
unpredictable name and is never a planted path; a symbolic link at the target is replaced, never
written through; ``overwrite=False`` refuses an existing path; ``root`` refuses a target whose
folder resolves outside it.

``OutputDir`` is what a command writes through: the one folder (``--out``) all its files go
into, the consent to replace existing files (``--overwrite``), and its inputs, which are never
written over, with or without consent (compared by device and inode, so a symbolic or hard link
to an input is caught too)."""
from __future__ import annotations

import os
from pathlib import Path

from hdnas.safeio import (OutputExistsError, UnsafeWriteError, check_plain_name, inside,
                          write_atomic)

__all__ = ["write_atomic", "OutputDir", "UnsafeWriteError", "OutputExistsError", "write_file"]


def _file_id(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


class OutputDir:
    """The folder a command writes into; see the module docstring."""

    def __init__(self, root, overwrite: bool = False, inputs=()):
        self.root = Path(root)
        self.overwrite = overwrite
        self._inputs: dict[tuple[int, int], Path] = {}
        self.add_inputs(inputs)

    def add_inputs(self, paths) -> None:
        """Files never to write over (missing ones and None are ignored)."""
        for p in paths:
            if p is not None and (fid := _file_id(p)) is not None:
                self._inputs.setdefault(fid, Path(p))

    def is_input(self, path) -> Path | None:
        fid = _file_id(path)
        return self._inputs.get(fid) if fid is not None else None

    def path(self, *parts: str) -> Path:
        """``root/part/...``, each part a plain file name (``UnsafeWriteError`` otherwise)."""
        return self.root.joinpath(*(check_plain_name(p, "output name") for p in parts))

    def claim(self, path) -> Path:
        """Check, before any work, that ``path`` may be written: inside the folder, not an
        input, and new unless ``overwrite``."""
        path = Path(path)
        if not inside(path.parent, self.root):
            raise UnsafeWriteError(f"{path}: outside the output folder {self.root}; not written")
        src = self.is_input(path)
        if src is not None:
            raise UnsafeWriteError(f"{path} is the input {src}; an output never replaces an "
                                   "input (choose another output folder)")
        if not self.overwrite and os.path.lexists(path):
            raise OutputExistsError(f"{path} already exists (--overwrite replaces it)")
        return path

    def claim_all(self, paths) -> list[Path]:
        """``claim`` each path; one error listing every refused path."""
        paths, bad = list(paths), []
        for p in paths:
            try:
                self.claim(p)
            except UnsafeWriteError as e:
                bad.append(e)
        if bad:
            cls = OutputExistsError if all(isinstance(e, OutputExistsError) for e in bad) \
                else UnsafeWriteError
            shown = "; ".join(str(e) for e in bad[:5])
            raise cls(shown + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""))
        return paths

    def write(self, path, data) -> Path:
        """``claim`` then ``write_atomic`` (no-clobber unless ``overwrite``)."""
        path = self.claim(path)
        return write_atomic(path, data, overwrite=self.overwrite, root=self.root)


def write_file(path, data, out: OutputDir | None = None) -> Path:
    """Through ``out`` when given (a command's folder), else a plain atomic write."""
    return out.write(path, data) if out is not None else write_atomic(path, data)
