"""Super-resolving image files: one file (``upscale_file``) and a list of them
(``upscale_files``), each written as ``OUT/<name>.png``.

The colour goes through the network (``hdnas.infer.tiling.upscale_tensor``: whole or in tiles);
grey, alpha and 16-bit images are read and written back in kind (``hdnas.io.images.read_image``
/ ``write_image``), the alpha channel upscaled with bicubic interpolation (clamped to the valid
range). An error about one file (unreadable, too small, output name taken) names it and the
other files are still processed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hdnas.infer.tiling import UpscaleError, upscale_tensor
from hdnas.io.images import ImageError, read_image, write_image
from hdnas.io.models import ModelFileError
from hdnas.model.network import DerivedNet

__all__ = ["bicubic_alpha", "upscale_file", "upscale_files"]


def bicubic_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """(H, W) float 0..255 -> (s H, s W), bicubic, clamped to 0..255."""
    t = torch.from_numpy(alpha)[None, None]
    up = F.interpolate(t, scale_factor=scale, mode="bicubic", align_corners=False)
    return up[0, 0].clamp(0, 255).numpy()


def upscale_file(model: DerivedNet, src: Path, dst: Path, device: torch.device, tile: int,
                 overlap: int | None, amp: str, progress: bool, fused: bool = True) -> Path:
    """Read ``src``, super-resolve it (``upscale_tensor``'s arguments), write ``dst``."""
    img = read_image(src)
    x = torch.from_numpy(img.rgb).permute(2, 0, 1)[None].to(device)
    try:
        y = upscale_tensor(model, x, tile, overlap, amp, progress, fused)
    except (UpscaleError, ModelFileError) as e:
        raise UpscaleError(f"{src}: {e}") from None
    rgb = y[0].permute(1, 2, 0).cpu().numpy()
    alpha = bicubic_alpha(img.alpha, model.scale) if img.alpha is not None else None
    return write_image(dst, rgb, alpha, img.grey, img.bits)


def upscale_files(model: DerivedNet, files, out, device: torch.device, tile: int = 0,
                  overlap: int | None = None, amp: str = "off", progress: bool = False,
                  fused: bool = True, log=None) -> int:
    """``upscale_file`` for each of ``files`` into ``out``/<stem>.png, with a progress bar on
    stderr if ``progress``; an error about one file goes to ``log`` (default: stderr, above the
    bar) as ``error: ...`` and the others are still processed. Returns how many failed."""
    log = log or (lambda m: tqdm.write(m, file=sys.stderr))
    out = Path(out)
    taken: dict[Path, Path] = {}
    failed = 0
    for src in tqdm(files, desc="upscale", unit="img", disable=not progress, file=sys.stderr):
        dst = out / f"{src.stem}.png"
        try:
            if dst in taken:
                raise UpscaleError(f"{src}: its output {dst} is already taken by {taken[dst]}")
            taken[dst] = src
            upscale_file(model, src, dst, device, tile, overlap, amp, progress, fused)
        except (UpscaleError, ImageError, ModelFileError) as e:
            failed += 1
            log(f"error: {e}")
    return failed
