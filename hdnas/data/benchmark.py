"""Benchmark sets: HR/LR pairs from the common folder layouts, LR made by MATLAB bicubic when
a set ships HR only.

Layouts recognised (checked in this order) for a folder F and scale s:

1. ``F/NAME_SRF_s_HR.png`` + ``F/NAME_SRF_s_LR.png`` (the FALSR / Huang et al. pairs). If a name
   has no ``SRF_s`` files, its HR is taken from the smallest other ``SRF_k_HR`` and the LR is
   made by our resize (this is how x3/x4 are scored from the shipped x2 pairs).
2. ``F/HR/NAME.png`` + ``F/LR_bicubic/Xs/NAMExs.png`` (EDSR's benchmark layout).
3. ``F`` named ``*_HR`` (e.g. ``DIV2K_valid_HR``) with the sibling ``*_LR_bicubic/Xs``, or ``F``
   containing exactly one ``*_HR`` folder (a DIV2K root).
4. HR images directly in ``F``.

Missing LR folders mean LR is made from HR (``imresize_uint8``, MATLAB-exact). HR is always
cropped to a multiple of s (modcrop); a given LR must then be exactly HR/s, otherwise it is an
error (no silent cropping of mismatched pairs). Grey images follow ``load_rgb``'s ``gray`` mode.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from hdnas.data.imresize import imresize_uint8
from hdnas.io.images import IMAGE_EXTENSIONS, ImageError, load_rgb
from hdnas.model.cell import MIN_LR_SIZE  # re-exported: the default smallest LR side of a set

__all__ = ["BenchmarkError", "BenchmarkSet", "Pair", "find_pairs", "modcrop", "MIN_LR_SIZE"]

_SRF = re.compile(r"^(?P<name>.+)_SRF_(?P<s>\d+)_(?P<kind>HR|LR)$", re.IGNORECASE)


class BenchmarkError(ValueError):
    """An unusable benchmark folder or pair: empty, unknown layout, sizes that disagree."""


@dataclass(frozen=True)
class Pair:
    name: str
    hr_path: Path
    lr_path: Path | None  # None: LR is made from HR by our resize


def modcrop(img: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop (..., H, W) at the bottom/right to a multiple of ``scale`` (MATLAB ``modcrop``)."""
    H, W = img.shape[-2:]
    return img[..., : H - H % scale, : W - W % scale]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _srf_pairs(files: list[Path], scale: int) -> list[Pair]:
    table: dict[str, dict[tuple[int, str], Path]] = {}
    for f in files:
        m = _SRF.match(f.stem)
        if m:
            table.setdefault(m["name"], {})[(int(m["s"]), m["kind"].upper())] = f
    pairs = []
    for name, entries in sorted(table.items()):
        hr = entries.get((scale, "HR"))
        lr = entries.get((scale, "LR")) if hr is not None else None
        if hr is None:
            others = sorted(k for k, kind in entries if kind == "HR")
            if not others:
                raise BenchmarkError(f"{name}: only LR files {sorted(p.name for p in entries.values())}"
                                     " and no *_SRF_*_HR image")
            hr = entries[(others[0], "HR")]
        pairs.append(Pair(name, hr, lr))
    return pairs


def _lr_for(hr: Path, lr_dir: Path, scale: int) -> Path:
    for stem in (f"{hr.stem}x{scale}", hr.stem, f"{hr.stem}_x{scale}"):
        for ext in (hr.suffix, ".png"):
            p = lr_dir / f"{stem}{ext}"
            if p.is_file():
                return p
    raise BenchmarkError(f"{lr_dir} has no LR image for {hr.name} "
                         f"(looked for {hr.stem}x{scale}{hr.suffix} and {hr.name})")


def _dir_pairs(hr_dir: Path, lr_dir: Path | None, scale: int) -> list[Pair]:
    files = _images(hr_dir)
    if not files:
        raise BenchmarkError(f"HR folder {hr_dir} contains no images "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if lr_dir is not None and not lr_dir.is_dir():
        lr_dir = None
    return [Pair(f.stem, f, _lr_for(f, lr_dir, scale) if lr_dir else None) for f in files]


def find_pairs(folder, scale: int) -> tuple[str, list[Pair]]:
    """(layout name, pairs) for a benchmark folder at one scale; see the module docstring."""
    folder = Path(folder)
    if not folder.exists():
        raise BenchmarkError(f"benchmark folder {folder} does not exist")
    if not folder.is_dir():
        raise BenchmarkError(f"{folder} is not a folder")
    if not isinstance(scale, int) or scale < 1:
        raise BenchmarkError(f"scale must be a positive integer, got {scale!r}")
    files = _images(folder)
    if any(_SRF.match(f.stem) for f in files):
        return "srf", _srf_pairs(files, scale)
    if (folder / "HR").is_dir():
        return "edsr", _dir_pairs(folder / "HR", folder / "LR_bicubic" / f"X{scale}", scale)
    if folder.name.upper().endswith("_HR"):
        lr = folder.parent / (folder.name[:-3] + "_LR_bicubic") / f"X{scale}"
        return "div2k", _dir_pairs(folder, lr, scale)
    subs = sorted(d for d in folder.iterdir() if d.is_dir() and d.name.upper().endswith("_HR"))
    if len(subs) == 1:
        return find_pairs(subs[0], scale)
    if len(subs) > 1:
        raise BenchmarkError(f"{folder} holds several HR folders ({', '.join(d.name for d in subs)});"
                             " pass one of them")
    if files:
        return "hr-only", [Pair(f.stem, f, None) for f in files]
    raise BenchmarkError(f"benchmark folder {folder} contains no images and no known layout "
                         "(NAME_SRF_s_HR/LR pairs, HR/ + LR_bicubic/Xs/, *_HR/ + *_LR_bicubic/Xs/)")


class BenchmarkSet:
    """Pairs of uint8 CHW tensors (``lr``, ``hr``) of one folder at one scale, loaded lazily.

    ``min_lr_size``: smallest accepted LR side (default: what the network's ESA needs)."""

    def __init__(self, folder, scale: int, gray: str = "replicate",
                 min_lr_size: int = MIN_LR_SIZE, make_lr: bool = False):
        self.folder, self.scale, self.gray = Path(folder), int(scale), gray
        self.min_lr_size = min_lr_size
        self.layout, self.pairs = find_pairs(folder, self.scale)
        if make_lr:  # ignore shipped LR images, always make LR by our resize
            self.pairs = [Pair(p.name, p.hr_path, None) for p in self.pairs]
        self.name = self.folder.name

    def __len__(self):
        return len(self.pairs)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, i: int) -> dict:
        p = self.pairs[i]
        s = self.scale
        hr_full = load_rgb(p.hr_path, as_tensor=True, gray=self.gray)
        hr = modcrop(hr_full, s)
        H, W = hr.shape[-2:]
        if min(H, W) < s * self.min_lr_size:
            raise BenchmarkError(f"{p.hr_path}: HR {hr_full.shape[-1]}x{hr_full.shape[-2]} is smaller "
                                 f"than scale x patch = {s} x {self.min_lr_size} = "
                                 f"{s * self.min_lr_size} px")
        if p.lr_path is None:
            lr = imresize_uint8(hr, 1 / s)
        else:
            lr = load_rgb(p.lr_path, as_tensor=True, gray=self.gray)
            if lr.shape[0] != hr.shape[0]:
                raise BenchmarkError(f"{p.lr_path}: {lr.shape[0]} channels, but its HR "
                                     f"{p.hr_path.name} has {hr.shape[0]}")
            if (lr.shape[-2] * s, lr.shape[-1] * s) != (H, W):
                raise BenchmarkError(
                    f"HR/LR sizes disagree at x{s}: {p.hr_path.name} is {hr_full.shape[-1]}x"
                    f"{hr_full.shape[-2]} (modcrop {W}x{H}), so LR should be {W // s}x{H // s}, "
                    f"but {p.lr_path.name} is {lr.shape[-1]}x{lr.shape[-2]}")
        return {"name": p.name, "hr": hr, "lr": lr, "lr_made": p.lr_path is None,
                "hr_path": p.hr_path, "lr_path": p.lr_path}


__all__ += ["ImageError"]
