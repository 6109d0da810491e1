"""An on-disk cache of decoded training images: decode once, then read patches from memory maps.

A folder (any layout ``hdnas.data.benchmark`` knows) at one scale is decoded once into

* ``hr.u8`` and ``lr.u8``: every image's uint8 HWC pixels, one after the other (read with
  ``numpy.memmap``, so only the pages a patch touches are read, and the OS may drop them again:
  a folder far larger than RAM works);
* ``index.npy``: int64 rows ``(hr_offset, H, W, lr_offset, h, w)`` per image;
* ``meta.json``: the names, the source files, and the images skipped as unreadable.

The cache folder sits under ``root`` (``HDNAS_CACHE_DIR``/data, default ``~/.cache/hdnas/data``)
and is named by the source folder and a hash of every source file's path, size and mtime (and
the scale and the format version): changing, adding or removing an image gives a new name, so
the cache is rebuilt, and the old one of that folder is deleted. A build writes into a temporary
folder and renames it into place when complete, so a killed build leaves no half cache (its
temporary folder is removed by the next build on the same machine). ``python -m
hdnas.data.cache FOLDER --scale 2`` builds one ahead of a long (distributed) run.

Every file of the build goes through the one atomic writer (``hdnas.safeio.write_atomic``) into
the build's own ``mkdtemp`` folder. An image beyond the pixel limit (``hdnas.io.images``:
``HDNAS_MAX_PIXELS``) is an unreadable image like any other: named in the error, or left out
under ``--skip-bad-images``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hdnas.cliargs import add_common, int_range, run
from hdnas.data.benchmark import BenchmarkError, BenchmarkSet
from hdnas.io.images import ImageError
from hdnas.safeio import read_json, write_atomic

__all__ = ["ImageCache", "cache_root", "cache_path", "build", "open_cache", "CACHE_VERSION"]

CACHE_VERSION = 1
log = logging.getLogger("hdnas")


def cache_root(root=None) -> Path:
    if root:
        return Path(root)
    base = os.environ.get("HDNAS_CACHE_DIR") or Path.home() / ".cache" / "hdnas"
    return Path(base) / "data"


def _sources(bench: BenchmarkSet) -> list:
    """Every source file with its size and mtime (ns): what the cache's name depends on."""
    rows = []
    for p in bench.pairs:
        row = [p.name]
        for f in (p.hr_path, p.lr_path):
            if f is None:
                row += [None, None, None]
            else:
                st = f.stat()
                row += [str(f.resolve()), st.st_size, st.st_mtime_ns]
        rows.append(row)
    return rows


def cache_path(folder, scale: int, root=None, skip_bad: bool = False) -> tuple[Path, list]:
    """(the cache folder for ``folder`` at ``scale``, its source list). Does not build it."""
    folder = Path(folder)
    bench = BenchmarkSet(folder, scale)
    sources = _sources(bench)
    key = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "scale": scale, "gray": bench.gray,
                                     "skip_bad": skip_bad, "sources": sources}).encode())
    return cache_root(root) / f"{_prefix(folder, scale, skip_bad)}-{key.hexdigest()[:16]}", sources


def _prefix(folder: Path, scale: int, skip_bad: bool) -> str:
    where = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in folder.resolve().name)[:40]
    return f"{slug}-x{scale}{'-skipbad' if skip_bad else ''}-{where}"


class _Decoded(torch.utils.data.Dataset):
    """The images of a folder, decoded (in DataLoader workers when asked); a bad image gives its
    error message instead of raising, so the build can name every bad image at once."""

    def __init__(self, bench: BenchmarkSet):
        self.bench = bench

    def __len__(self):
        return len(self.bench)

    def __getitem__(self, i):
        try:
            item = self.bench[i]
        except (ImageError, BenchmarkError) as e:
            return {"i": i, "error": str(e)}
        return {"i": i, "hr": item["hr"].permute(1, 2, 0).contiguous().numpy(),
                "lr": item["lr"].permute(1, 2, 0).contiguous().numpy()}


def _one_thread(_):
    torch.set_num_threads(1)


def _remove_stale(root: Path, prefix: str, keep: Path) -> None:
    """Older caches of the same folder, and temporary folders of killed builds on this host."""
    host = socket.gethostname()
    for d in root.glob(f"{prefix}-*"):
        if d == keep or not d.is_dir():
            continue
        if ".tmp-" in d.name:
            owner = d.name.split(".tmp-", 1)[1].rsplit("-", 2)
            if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and _alive(int(owner[1])):
                continue  # a build in progress
            if len(owner) == 3 and owner[0] != host:
                continue  # another machine's build: not ours to judge
        shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build(folder, scale: int, root=None, skip_bad: bool = False, workers: int = 0,
          progress: bool | None = None) -> Path:
    """The cache folder of ``folder`` at ``scale``, built first if it is missing or stale.

    Unreadable images (and HR/LR pairs whose sizes disagree) are an error naming all of them;
    with ``skip_bad`` they are left out with a warning. ``progress``: a bar on stderr (default:
    when stderr is a terminal)."""
    folder = Path(folder)
    final, sources = cache_path(folder, scale, root, skip_bad)
    if (final / "meta.json").is_file():
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    prefix = _prefix(folder, scale, skip_bad)
    _remove_stale(root, prefix, keep=final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-",
                                dir=root))
    try:
        bench = BenchmarkSet(folder, scale, min_lr_size=1)
        # its own generator: building must not move the global RNG (the model's initial weights)
        loader = torch.utils.data.DataLoader(_Decoded(bench), batch_size=None, num_workers=workers,
                                             worker_init_fn=_one_thread if workers else None,
                                             generator=torch.Generator())
        index, names, files, bad = [], [], [], []
        offsets = [0, 0]
        if progress is None:
            progress = sys.stderr.isatty()

        def pixels(fh, fl):
            for item in tqdm(loader, total=len(bench), desc=f"caching {folder.name} x{scale}",
                             unit="img", disable=not progress, file=sys.stderr):
                p = bench.pairs[item["i"]]
                if "error" in item:
                    bad.append(item["error"])
                    continue
                hr, lr = item["hr"], item["lr"]
                if isinstance(hr, torch.Tensor):  # DataLoader converts numpy arrays
                    hr, lr = hr.numpy(), lr.numpy()
                index.append([offsets[0], *hr.shape[:2], offsets[1], *lr.shape[:2]])
                names.append(p.name)
                files.append(p.hr_path.name)
                fh.write(hr.tobytes())
                fl.write(lr.tobytes())
                offsets[0] += hr.nbytes
                offsets[1] += lr.nbytes

        write_atomic(tmp / "hr.u8", lambda fh: write_atomic(tmp / "lr.u8",
                                                            lambda fl: pixels(fh, fl)))
        if bad and not skip_bad:
            shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
            raise ImageError(f"{folder}: {len(bad)} of {len(bench)} images cannot be used:\n  "
                             f"{shown}\n(--skip-bad-images leaves them out with a warning)")
        if not names:
            raise BenchmarkError(f"{folder}: no usable images")
        buf = io.BytesIO()
        np.save(buf, np.asarray(index, dtype=np.int64).reshape(-1, 6))
        write_atomic(tmp / "index.npy", buf.getvalue())
        write_atomic(tmp / "meta.json", json.dumps(
            {"version": CACHE_VERSION, "folder": str(folder.resolve()), "scale": scale,
             "names": names, "files": files, "skipped": bad, "sources": sources}, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale(root, prefix, keep=final)
    return final


class ImageCache:
    """A built cache, read-only. ``hr(i)``/``lr(i)`` are uint8 HWC memory-mapped views. The
    maps are opened lazily in each process, so the object pickles cheaply into DataLoader
    workers (a pickled ``np.memmap`` would copy the whole file)."""

    def __init__(self, path):
        self.path = Path(path)
        meta = read_json(self.path / "meta.json", "image cache index", 1 << 30, BenchmarkError)
        if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
            raise BenchmarkError(f"{self.path}: not a cache of format {CACHE_VERSION}; delete it "
                                 "to rebuild")
        self.names, self.skipped, self.scale = meta["names"], meta["skipped"], meta["scale"]
        self.files = meta["files"]  # the HR file names, for messages
        self.folder = meta["folder"]
        self.index = np.load(self.path / "index.npy", allow_pickle=False)
        self._maps = None

    def __len__(self):
        return len(self.names)

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def _map(self):
        if self._maps is None:
            self._maps = tuple(np.memmap(self.path / f, dtype=np.uint8, mode="r")
                               for f in ("hr.u8", "lr.u8"))
        return self._maps

    def hr_size(self, i) -> tuple[int, int]:
        return int(self.index[i, 1]), int(self.index[i, 2])

    def lr_size(self, i) -> tuple[int, int]:
        return int(self.index[i, 4]), int(self.index[i, 5])

    def hr(self, i) -> np.ndarray:
        off, H, W = (int(v) for v in self.index[i, :3])
        return self._map()[0][off:off + H * W * 3].reshape(H, W, 3)

    def lr(self, i) -> np.ndarray:
        off, h, w = (int(v) for v in self.index[i, 3:])
        return self._map()[1][off:off + h * w * 3].reshape(h, w, 3)

    def nbytes(self) -> int:
        return int((self.index[:, 1] * self.index[:, 2] + self.index[:, 4] * self.index[:, 5]).sum() * 3)


def open_cache(folder, scale: int, root=None, skip_bad: bool = False, workers: int = 0,
               progress: bool | None = None) -> ImageCache:
    """Build the cache if needed, open it, and warn about images it left out."""
    cache = ImageCache(build(folder, scale, root, skip_bad, workers, progress))
    if cache.skipped:
        log.warning("%s: left out %d unreadable images (--skip-bad-images): %s", folder,
                    len(cache.skipped), "; ".join(cache.skipped[:5]))
    return cache


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hdnas.data.cache",
                                description="Build the decoded-image cache of training folders "
                                            "ahead of a run (the run builds it otherwise).")
    p.add_argument("folders", nargs="+")
    p.add_argument("--scale", type=int_range(2, 4), required=True)
    p.add_argument("--cache-dir", default="", help="default: $HDNAS_CACHE_DIR/data or "
                                                    "~/.cache/hdnas/data")
    p.add_argument("--workers", type=int_range(0, 256), default=min(8, os.cpu_count() or 1))
    p.add_argument("--skip-bad-images", action="store_true")
    add_common(p)
    args = p.parse_args(argv)

    def body() -> int:
        for folder in args.folders:
            c = open_cache(folder, args.scale, args.cache_dir or None, args.skip_bad_images,
                           args.workers, progress=True)
            print(f"{c.path}: {len(c)} images, {c.nbytes() / 2**30:.2f} GiB")
        return 0

    return run(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
