"""Image I/O with Pillow: 8-bit RGB in, clear errors naming the file for anything else.

Choices for unusual images (why: benchmark sets contain some, and silent conversions change the
scores):

* 8-bit grey ('L'): replicated to three equal channels by default (``gray='replicate'``), as
  EDSR's loader does; this is the convention under which the released tiny checkpoint scores
  Set14 33.269 (Set14 has one grey image). ``gray='keep'`` returns one channel (MATLAB scripts
  score a grey image on its own values, as the published bicubic rows do); ``gray='error'``
  refuses it.
* RGBA / LA / palette images: accepted only when fully opaque (the alpha channel is then
  dropped); any transparency is an error, because there is no right background to composite on.
* Palette ('P') without transparency: converted to RGB (lossless).
* 16-bit, 32-bit, float, bilevel, CMYK and other modes: an error naming the file and its mode.
* Unreadable, corrupt or truncated files: an error naming the file (Pillow's message appended).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "ImageError", "load_rgb", "save_rgb", "to_hwc_uint8"]

IMAGE_EXTENSIONS = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".ppm", ".webp"})
GRAY_MODES = ("replicate", "keep", "error")


class ImageError(ValueError):
    """An image file that cannot be used: unreadable, corrupt, or of an unsupported kind."""


def _opaque(im: Image.Image, path) -> Image.Image:
    alpha = np.asarray(im.getchannel("A"))
    if alpha.min() < 255:
        raise ImageError(f"{path}: image has transparency (mode {im.mode}, "
                         f"{(alpha < 255).mean():.1%} of pixels not opaque); save it as RGB")
    return im.convert("RGB" if im.mode == "RGBA" else "L")


def load_rgb(path, as_tensor: bool = False, gray: str = "replicate"):
    """Read an image as uint8 RGB: HWC numpy (default) or CHW torch tensor (``as_tensor``).

    With ``gray='keep'`` a grey image comes back with one channel (H, W, 1) / (1, H, W)."""
    if gray not in GRAY_MODES:
        raise ValueError(f"gray must be one of {GRAY_MODES}, got {gray!r}")
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated files fail here
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            if im.mode in ("RGBA", "LA"):
                im = _opaque(im, path)
            if im.mode == "L":
                if gray == "error":
                    raise ImageError(f"{path}: grey image (mode L); an RGB image is required")
                arr = np.asarray(im)[..., None]
                if gray == "replicate":
                    arr = np.repeat(arr, 3, axis=2)
            elif im.mode == "RGB":
                arr = np.asarray(im)
            else:
                raise ImageError(f"{path}: unsupported image mode {im.mode!r} "
                                 "(only 8-bit RGB or grey images are supported)")
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    arr = np.array(arr, dtype=np.uint8, order="C")  # a writable copy
    if min(arr.shape[:2]) < 1:
        raise ImageError(f"{path}: empty image {arr.shape[1]}x{arr.shape[0]}")
    if as_tensor:
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return arr


def to_hwc_uint8(img) -> np.ndarray:
    """A CHW tensor / HWC array in 0..255 (float values are rounded and clamped) -> HWC uint8."""
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3:
            raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(img.shape)}")
        if t.is_floating_point():
            t = (t.to(torch.float64).clamp(0, 255) + 0.5).floor()
        arr = t.to(torch.uint8).permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = np.floor(np.clip(arr.astype(np.float64), 0, 255) + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return np.ascontiguousarray(arr)


def save_rgb(path, img) -> Path:
    """Write an image (CHW tensor or HWC array, 0..255) losslessly by the file's extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_hwc_uint8(img)).save(path)
    return path
