"""Files in and out, for inputs nobody vouches for: the one atomic writer, a bounded JSON reader,
plain file names. Base layer: imports only the standard library, so every layer (the genotype in
``hdnas.model`` included) writes and reads through the same code.

Writing (``write_atomic``): the bytes go to a temporary file created in the target's folder
with ``tempfile.mkstemp`` (``O_CREAT | O_EXCL``, an unpredictable name, so a file or symbolic link
planted at a temp-looking path is never opened), are flushed to disk, then the file is renamed
over the target (``os.replace``): the target is always whole or absent. A symbolic link at the
target path is never written *through*: the rename replaces the link itself and its target is
left untouched; without ``overwrite`` an existing path, a dangling link included, is refused
(the no-clobber rename is a hard link, atomic against a racing writer). With ``root`` the
target's folder, with every symbolic link in it resolved, must lie inside ``root`` (resolved
too): a planted link to a folder elsewhere is refused before anything is created. Files get the
permissions of a plain ``open()`` (0666 less the umask), not mkstemp's 0600.

Reading (``read_json``): a regular file of at most ``max_bytes`` (default 16 MiB), UTF-8 text,
JSON no deeper than the parser's recursion limit, numbers finite (``NaN``, ``Infinity`` and
overflowing literals such as ``1e999`` are refused); every failure is one exception whose
message names the file.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

__all__ = ["UnsafeWriteError", "OutputExistsError", "JSONFileError", "MAX_JSON_BYTES",
           "write_atomic", "inside", "read_json", "plain_name", "check_plain_name", "env_int"]

MAX_JSON_BYTES = 16 * 2**20


class UnsafeWriteError(ValueError):
    """A write that would land outside its folder, or over a path it may not replace."""


class OutputExistsError(UnsafeWriteError):
    """The output path exists and the caller did not consent to replacing it."""


class JSONFileError(ValueError):
    """A JSON file that cannot be used: missing, too large, binary, invalid, too deep, or
    holding a non-finite number. The message names the file."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def inside(path, root) -> bool:
    """True if ``path`` (its symbolic links resolved, missing parts kept as given) is ``root``
    (resolved) or lies under it."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, data, *, overwrite: bool = True, root=None) -> Path:
    """Write ``data`` (bytes, str as UTF-8, or a callable ``data(f)`` writing to a binary file)
    to ``path`` atomically; see the module docstring for the guarantees. ``overwrite=False``:
    ``OutputExistsError`` if ``path`` exists. ``root``: ``UnsafeWriteError`` unless the file's
    folder lies inside it."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise UnsafeWriteError(f"{path}: not a file name")
    if root is not None and not inside(path.parent, root):
        raise UnsafeWriteError(f"{path}: outside the output folder {root} (a symbolic link in "
                               "the path leads elsewhere?); not written")
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(f"{path} already exists (--overwrite replaces it)")
    if os.path.isdir(path) and not os.path.islink(path):
        raise UnsafeWriteError(f"{path} is a folder; not replaced")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _link_no_clobber(tmp: str, path: Path) -> None:
    """Rename ``tmp`` to ``path`` unless ``path`` exists (atomically where hard links work)."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise OutputExistsError(f"{path} already exists (--overwrite replaces it)") from None
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(path):
            raise OutputExistsError(f"{path} already exists (--overwrite replaces it)") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


# --------------------------------------------------------------------------- reading
def _refuse_constant(text: str):
    raise ValueError(f"the number {text} (only finite numbers are allowed)")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text} overflows (only finite numbers are allowed)")
    return v


def read_json(path, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES,
              error: type[Exception] = JSONFileError):
    """The JSON value in ``path``, read within bounds (module docstring); ``error(message)``
    names the file and ``what`` it should be."""
    path = Path(path)
    try:
        if not path.exists():
            raise error(f"{what} {path} does not exist")
        if not path.is_file():
            raise error(f"{path}: not a regular file (expected a {what})")
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if len(raw) > max_bytes:
        raise error(f"{path}: larger than {max_bytes:,} bytes; not a {what}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text (a binary file?); expected a {what}") from None
    if "\x00" in text:
        raise error(f"{path}: holds NUL bytes (a binary file?); expected a {what}")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply; not a {what}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}); expected a {what}") from None
    except ValueError as e:  # our refusals, integers beyond Python's digit limit
        raise error(f"{path}: {e}; not a usable {what}") from None


# --------------------------------------------------------------------------- names
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME = 100


def plain_name(name, default: str = "model") -> str:
    """``name`` made a plain file name: characters other than letters, digits and ``._+-``
    become ``_``, leading/trailing dots, dashes and underscores go, at most 100 characters;
    ``default`` if nothing is left (``..``, ``/``, an empty name)."""
    s = _UNSAFE.sub("_", str(name)).strip("._-")[:MAX_NAME].strip("._-")
    return s or default


def check_plain_name(name: str, what: str = "name") -> str:
    """``name`` if it is already a plain file name (``plain_name(name) == name``), else
    ``UnsafeWriteError`` naming it."""
    if not isinstance(name, str) or not name or plain_name(name, "") != name:
        raise UnsafeWriteError(f"{what} {name!r} is not a plain file name (letters, digits and "
                               f"._+- only, no path, at most {MAX_NAME} characters)")
    return name


def env_int(name: str, default: int, lo: int = 1) -> int:
    """The integer in environment variable ``name`` (``default`` when unset or empty);
    ValueError naming the variable when it is not an integer >= ``lo``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None
    if v < lo:
        raise ValueError(f"{name}={v} must be >= {lo}")
    return v
