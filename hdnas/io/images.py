"""Image files: 8-bit RGB for scoring (``load_rgb``), any image for upscaling (``read_image`` /
``write_image``), clear errors naming the file.

``load_rgb`` (benchmarks, training data) reads 8-bit RGB with Pillow. Its choices for unusual
images (why: benchmark sets contain some, and silent conversions change the
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

``read_image`` (upscaling your own images) takes every common kind and ``write_image`` writes
the result back in kind, losslessly as PNG:

* RGB: as is. Greyscale: replicated to RGB for the network (``LoadedImage.grey``) and written
  back as grey, the mean of the three output channels.
* Alpha (RGBA, grey+alpha, palette with transparency): kept apart (``LoadedImage.alpha``), for
  the caller to upscale and pass back.
* 16-bit PNG: read as uint16 with pypng (Pillow reads 16-bit colour PNGs as 8-bit), scaled to the
  network's 0..255 float range (v * 255 / 65535) and written back as 16-bit (no rounding to 8
  bits in between). Other images are 8-bit.

``collect_inputs`` finds the image files given directly or in given folders (not recursive).

Bounded memory: every reader (8-bit through Pillow, 16-bit PNG through pypng) checks the
width x height the file's header declares against one limit, ``max_pixels()``:
``HDNAS_MAX_PIXELS`` or ``MAX_PIXELS`` (178,956,970, Pillow's own hard limit), before any pixel is
decoded; a larger image (a "decompression bomb": a 1 MB PNG can declare 15000 x 15000 pixels)
is an ``ImageError`` naming the file, caught wherever images are read (the data cache, where
``--skip-bad-images`` skips it, evaluate, upscale). Pillow's own check runs at the same limit
while we open a file (its global setting is restored after).

Writing goes through the one atomic writer (``hdnas.io.atomic``), into a command's
``OutputDir`` when given (no write outside it, no overwrite without consent).
"""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hdnas.io.atomic import OutputDir, write_file
from hdnas.safeio import env_int

__all__ = ["IMAGE_EXTENSIONS", "ImageError", "load_rgb", "save_rgb", "to_hwc_uint8", "LoadedImage",
           "read_image", "write_image", "collect_inputs", "MAX_PIXELS", "max_pixels", "png_bytes"]

IMAGE_EXTENSIONS = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".ppm", ".webp"})
GRAY_MODES = ("replicate", "keep", "error")
_MAX16 = 65535.0


#: default pixel limit of every image reader (Pillow's DecompressionBombError threshold)
MAX_PIXELS = 178_956_970


class ImageError(ValueError):
    """An image file that cannot be used: unreadable, corrupt, too large, or of an unsupported
    kind."""


def max_pixels() -> int:
    """The pixel limit of every reader: ``HDNAS_MAX_PIXELS``, else ``MAX_PIXELS``."""
    return env_int("HDNAS_MAX_PIXELS", MAX_PIXELS)


def _check_pixels(path, w: int, h: int, limit: int) -> None:
    if w * h > limit:
        raise ImageError(f"{path}: image of {w}x{h} = {w * h:,} pixels is larger than the limit "
                         f"of {limit:,} (a decompression bomb? HDNAS_MAX_PIXELS raises the limit)")


def _open(path: Path, limit: int) -> Image.Image:
    """Pillow's lazy open (the header only) with the pixel limit checked before decoding;
    Pillow's own check runs at the same limit during the call."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: image larger than the limit of {limit:,} pixels (a "
                         "decompression bomb? HDNAS_MAX_PIXELS raises the limit)") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    try:
        _check_pixels(path, *im.size, limit)
    except ImageError:
        im.close()
        raise
    return im


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
    limit = max_pixels()  # a bad HDNAS_MAX_PIXELS is a setup error, not an image error
    try:
        with _open(path, limit) as im:
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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as e:
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


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def save_rgb(path, img, out: OutputDir | None = None) -> Path:
    """Write an image (CHW tensor or HWC array, 0..255) losslessly by the file's extension
    (PNG unless it names another lossless format), atomically, through ``out`` if given."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    if fmt not in ("PNG", "BMP", "TIFF", "PPM"):
        fmt = "PNG"
    return write_file(path, _encode(Image.fromarray(to_hwc_uint8(img)), fmt), out)


# --------------------------------------------------------------------- any image, for upscaling
@dataclass
class LoadedImage:
    rgb: np.ndarray  # (H, W, 3) float32, 0..255
    alpha: np.ndarray | None  # (H, W) float32, 0..255
    grey: bool
    bits: int  # 8 or 16


def _png_header(path: Path) -> tuple[int, int, int] | None:
    """(width, height, bit depth) from a PNG's IHDR chunk, or None for other files."""
    with path.open("rb") as f:
        head = f.read(33)
    if len(head) == 33 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h, depth = struct.unpack(">IIB", head[16:25])
        if zlib.crc32(head[12:29]) != struct.unpack(">I", head[29:33])[0]:
            raise ImageError(f"{path}: corrupt PNG header (IHDR checksum)")
        return w, h, depth
    return None


def _from_planes(arr: np.ndarray, planes: int, bits: int) -> LoadedImage:
    arr = arr.astype(np.float32)
    if bits == 16:
        arr *= np.float32(255.0 / _MAX16)
    grey = planes in (1, 2)
    colour = np.repeat(arr[..., :1], 3, axis=2) if grey else arr[..., :3]
    alpha = arr[..., -1] if planes in (2, 4) else None
    return LoadedImage(np.ascontiguousarray(colour), alpha, grey, bits)


def read_image(path) -> LoadedImage:
    """Read an image of any kind for the network (see the module docstring: colour, grey, alpha,
    16-bit PNG); ImageError names the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    limit = max_pixels()  # a bad HDNAS_MAX_PIXELS is a setup error, not an image error
    try:
        header = _png_header(path)
        if header is not None and header[2] == 16:
            import png  # pypng: Pillow reads 16-bit colour PNGs as 8-bit

            _check_pixels(path, header[0], header[1], limit)  # before pypng decodes anything
            w, h, rows, info = png.Reader(filename=str(path)).asDirect()
            planes = info["planes"]
            arr = np.empty((h, w * planes), dtype=np.uint16)
            n = 0
            for n, r in enumerate(rows, start=1):
                if n > h:
                    raise ImageError(f"{path}: more rows than the {h} the header declares")
                arr[n - 1] = r
            if n != h:
                raise ImageError(f"{path}: {n} rows, the header declares {h}")
            return _from_planes(arr.reshape(h, w, planes), planes, 16)
        with _open(path, limit) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("L" if im.mode == "1" else "RGB")
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
                return _from_planes(np.asarray(im, dtype=np.uint16)[..., None], 1, 16)
            planes = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(im.mode)
            if planes is None:
                raise ImageError(f"{path}: unsupported image mode {im.mode!r}")
            arr = np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, planes)
            return _from_planes(arr, planes, 8)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error,
            MemoryError) as e:
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - pypng's own FormatError and friends
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """0..255 float -> uint8, or uint16 on 0..65535 (rounded half up, clamped)."""
    x = np.clip(x.astype(np.float64), 0, 255)
    if bits == 16:
        return np.floor(x * (_MAX16 / 255.0) + 0.5).astype(np.uint16)
    return np.floor(x + 0.5).astype(np.uint8)


def png_bytes(rgb: np.ndarray, alpha: np.ndarray | None, grey: bool, bits: int) -> bytes:
    """(H, W, 3) float 0..255 colour (grey: the channel mean) and optional alpha, encoded as a
    PNG (16-bit with ``bits`` 16)."""
    colour = rgb.mean(axis=2, keepdims=True) if grey else rgb
    planes = [colour] + ([alpha[..., None]] if alpha is not None else [])
    arr = _quantize(np.concatenate(planes, axis=2), bits)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    if bits == 16:
        import png

        h, w, c = arr.shape
        buf = io.BytesIO()
        png.from_array(arr.reshape(h, w * c), f"{mode};16").write(buf)
        return buf.getvalue()
    return _encode(Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr, mode), "PNG")


def write_image(path, rgb: np.ndarray, alpha: np.ndarray | None, grey: bool, bits: int,
                out: OutputDir | None = None) -> Path:
    """``png_bytes`` written to ``path`` atomically, through ``out`` if given."""
    return write_file(path, png_bytes(rgb, alpha, grey, bits), out)


def collect_inputs(inputs) -> tuple[list[Path], list[str]]:
    """Image files given directly or found in given folders (sorted), and errors for the rest."""
    files, errors = [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in
                           IMAGE_EXTENSIONS)
            if not found:
                errors.append(f"{p}: no images in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    return files, errors
