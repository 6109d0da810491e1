"""Super-resolving image files: one file (``upscale_file``) and a list of them
(``upscale_files``), each written as ``OUT/<name>.png``.

The colour goes through the network (``hdnas.infer.tiling.upscale_tensor``: whole or in tiles);
grey, alpha and 16-bit images are read and written back in kind (``hdnas.io.images.read_image``
/ ``write_image``), the alpha channel upscaled with bicubic interpolation (clamped to the valid
range). An error about one file (unreadable, too small, output name taken) names it and the
other files are still processed.

Outputs go through the command's ``OutputDir`` (``hdnas.io.atomic``). ``check_outputs`` runs
before any image: ``--out`` may not be a folder given as input (a second run would upscale the
results again), no output may be an input file (even with ``--overwrite``), and an existing
output is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hdnas.infer.tiling import UpscaleError, upscale_tensor
from hdnas.io.atomic import OutputDir, UnsafeWriteError
from hdnas.io.images import ImageError, read_image, write_image
from hdnas.io.models import ModelFileError
from hdnas.model.network import DerivedNet

__all__ = ["bicubic_alpha", "upscale_file", "upscale_files", "output_path", "check_outputs"]


def _outdir(out) -> OutputDir:
    return out if isinstance(out, OutputDir) else OutputDir(out, overwrite=True)


def output_path(out: OutputDir, src: Path) -> Path:
    """``OUT/<stem>.png`` (a file's stem holds no path separator; the writer checks that the
    result lies in OUT all the same)."""
    return out.root / f"{src.stem}.png"


def check_outputs(inputs, files, out: OutputDir) -> None:
    """Before any work (module docstring): UnsafeWriteError / OutputExistsError naming the
    paths."""
    root = out.root.resolve()
    for item in inputs:
        if Path(item).is_dir() and Path(item).resolve() == root:
            raise UnsafeWriteError(f"--out {out.root} is the input folder {item}: the results "
                                   "would replace or join the inputs; choose another folder")
    out.add_inputs(files)
    seen = set()
    targets = []
    for src in files:
        dst = output_path(out, src)
        if dst not in seen:
            seen.add(dst)
            targets.append(dst)
    out.claim_all(targets)


def bicubic_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """(H, W) float 0..255 -> (s H, s W), bicubic, clamped to 0..255."""
    t = torch.from_numpy(alpha)[None, None]
    up = F.interpolate(t, scale_factor=scale, mode="bicubic", align_corners=False)
    return up[0, 0].clamp(0, 255).numpy()


def upscale_file(model: DerivedNet, src: Path, dst: Path, device: torch.device, tile: int,
                 overlap: int | None, amp: str, progress: bool, fused: bool = True,
                 out: OutputDir | None = None) -> Path:
    """Read ``src``, super-resolve it (``upscale_tensor``'s arguments), write ``dst`` (through
    ``out`` when given)."""
    img = read_image(src)
    x = torch.from_numpy(img.rgb).permute(2, 0, 1)[None].to(device)
    try:
        y = upscale_tensor(model, x, tile, overlap, amp, progress, fused)
    except (UpscaleError, ModelFileError) as e:
        raise UpscaleError(f"{src}: {e}") from None
    rgb = y[0].permute(1, 2, 0).cpu().numpy()
    if not np.isfinite(rgb).all():
        raise UpscaleError(f"{src}: the network's output is not finite (NaN or infinity); "
                           "not written")
    alpha = bicubic_alpha(img.alpha, model.scale) if img.alpha is not None else None
    return write_image(dst, rgb, alpha, img.grey, img.bits, out)


def upscale_files(model: DerivedNet, files, out, device: torch.device, tile: int = 0,
                  overlap: int | None = None, amp: str = "off", progress: bool = False,
                  fused: bool = True, log=None) -> int:
    """``upscale_file`` for each of ``files`` into ``out`` (an ``OutputDir``, or a folder: then
    existing files are replaced) as <stem>.png, with a progress bar on stderr if ``progress``;
    an error about one file goes to ``log`` (default: stderr, above the bar) as ``error: ...``
    and the others are still processed. Returns how many failed."""
    log = log or (lambda m: tqdm.write(m, file=sys.stderr))
    out = _outdir(out)
    out.add_inputs(files)
    taken: dict[Path, Path] = {}
    failed = 0
    for src in tqdm(files, desc="upscale", unit="img", disable=not progress, file=sys.stderr):
        dst = output_path(out, src)
        try:
            if dst in taken:
                raise UpscaleError(f"{src}: its output {dst} is already taken by {taken[dst]}")
            taken[dst] = src
            upscale_file(model, src, dst, device, tile, overlap, amp, progress, fused, out)
        except (UpscaleError, ImageError, ModelFileError, UnsafeWriteError) as e:
            failed += 1
            log(f"error: {e}")
    return failed
