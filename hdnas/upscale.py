"""Super-resolve your own images with a derived network.

    python -m hdnas.upscale --genotype TINY18 --weights tiny.safetensors photo.jpg scans/ --out sr/
    python -m hdnas.upscale --weights net.safetensors big.png --out sr/ --tile 768   # genotype from the file

Inputs are image files or folders (their PNG/JPEG/BMP/TIFF/WebP files, not recursive). Each
result is written losslessly as ``OUT/<name>.png``:

* RGB: as is. Greyscale: replicated to RGB for the network (as the evaluation does) and written
  back as grey, the mean of the three output channels.
* Alpha (RGBA, grey+alpha, palette with transparency): the colour goes through the network and
  the alpha channel is upscaled with bicubic interpolation (clamped to the valid range) and
  kept in the output.
* 16-bit PNG: read as uint16, scaled to the network's 0..255 float range (v * 255 / 65535) and
  written back as 16-bit (no rounding to 8 bits in between). Other images are 8-bit.

The network runs on the whole image, or with ``--tile T`` on LR tiles of at most T x T pixels
with a margin of ``--tile-overlap`` pixels of context on each inner side. With an overlap of at
least the network's receptive radius (``receptive_radius``, the default) the tiled result equals
the untiled one up to float reassociation: |difference| <= ``TILE_TOLERANCE`` (0..255 scale,
tested). Two things make that true: every output pixel's full dependency cone is inside its tile,
and each cell's ESA attention is computed in the coordinates of the whole image (``FramedESA``:
tile origins on multiples of ``ALIGN`` = 6 LR pixels, the stride of ESA's conv + max-pool, and
ESA's bilinear upsampling with the whole image's scale), since ESA is not shift-invariant. A
smaller overlap is faster and is allowed with a warning; the result then differs from the
untiled one (docs/deploy.md gives measured differences).

Errors about one image (unreadable, too small, output name taken) are reported and the other
files are still processed; the exit status is then 1. Errors about the setup (genotype, weights
that do not fit it, ``--scale`` different from the weights', a tile too small for its overlap)
stop before any image, with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from hdnas.model.cell import PLAIN
from hdnas.io.images import IMAGE_EXTENSIONS
from hdnas.model.genotype import Genotype
from hdnas.infer.fused import FusedInference
from hdnas.io.models import ModelFileError, load_model
from hdnas.model.network import DerivedNet
from hdnas.model.space import get_op

__all__ = ["UpscaleError", "TileError", "ESA_RADIUS", "ALIGN", "MIN_LR", "TILE_TOLERANCE",
           "op_radius", "receptive_radius", "FramedESA", "tile_spans", "upscale_tensor",
           "read_image", "write_image", "load_model", "main"]

#: ESA's reach, in its input's pixels, for any image size: the attention at row g reads the
#: pooled rows i0, i1 = i0 + 1 around g * P / H (P < H / 6 pooled rows), each pooled row after
#: three 3x3 convs reads pooled rows q - 3 .. q + 3, a pooled row q covers conv rows 3q .. 3q + 6
#: (max-pool 7 stride 3) and conv row j covers rows 2j .. 2j + 2 (3x3 stride 2, no padding), so
#: rows 6 i0 - 18 .. 6 i1 + 32; with H - 6P <= 14 that is at most 41 rows above and 38 below
#: (38 where the source row is clamped to 0 at the top).
ESA_RADIUS = 41
#: tile origins are multiples of this (ESA's stride-2 conv, then its stride-3 max-pool)
ALIGN = 6
#: the smallest LR image the network takes (ESA: conv 3 stride 2, then max-pool 7 stride 3)
MIN_LR = 15
#: tiled vs untiled, overlap >= receptive radius, float32, 0..255 scale
TILE_TOLERANCE = 2e-3
_MAX16 = 65535.0


class UpscaleError(ValueError):
    """An image that cannot be upscaled, or a setup that cannot upscale anything."""


class TileError(UpscaleError):
    """A tile size that leaves no room for the overlap."""


# --------------------------------------------------------------------------- receptive field
def op_radius(name: str) -> int:
    """How many pixels on each side a candidate op reads."""
    spec = get_op(name)
    half = spec.kernel // 2
    return {"conv": half, "sep": 2 * half, "dil": spec.dilation * half, "skip": 0}[spec.family]


def receptive_radius(genotype: Genotype) -> int:
    """The LR distance over which an input pixel can change an output pixel of the derived net:
    the longest path head -> cells -> tail, a cell adding its ops, its 3x3 conv and ESA."""
    head = 1  # fea_conv 3x3
    outs = []
    for i in range(genotype.num_cells):
        if i == 0:
            r_in = head
        elif i == 1:
            r_in = outs[0]
        else:
            r_in = max(outs[j] for j in genotype.inputs[i - 2])  # conv_block 1x1 adds nothing
        outs.append(r_in + sum(op_radius(n) for n in genotype.ops_of_cell(i)) + 1 + ESA_RADIUS)
    return max(outs) + 1 + 1  # cout 1x1, LR_conv 3x3 (+ the head residual), upsampler 3x3


# --------------------------------------------------------------------------- framed ESA
@dataclass
class Frame:
    """Where the current tile lies in the whole LR image: origin (oy, ox), size (H, W)."""

    oy: int = 0
    ox: int = 0
    H: int = 0
    W: int = 0


def _pooled(n: int) -> int:
    return ((n - 3) // 2 + 1 - 7) // 3 + 1


def _axis(o: int, n: int, N: int, tile_pooled: int, device):
    """Bilinear source rows (as torch computes them for the whole image, align_corners=False)
    for rows o .. o + n of an image of N rows, as indices into the tile's pooled map."""
    P = _pooled(N)
    scale = torch.tensor(P, dtype=torch.float32) / torch.tensor(N, dtype=torch.float32)
    g = torch.arange(o, o + n, device=device, dtype=torch.float32)
    src = (scale.to(device) * (g + 0.5) - 0.5).clamp_min(0)
    i0 = src.floor()
    lam = src - i0
    i0 = i0.long()
    i1 = torch.where(i0 < P - 1, i0 + 1, i0)
    q0 = o // ALIGN  # the tile's first pooled row in whole-image pooled rows
    return (i0 - q0).clamp(0, tile_pooled - 1), (i1 - q0).clamp(0, tile_pooled - 1), lam


def _global_bilinear(c3: torch.Tensor, frame: Frame, h: int, w: int) -> torch.Tensor:
    i0, i1, ly = _axis(frame.oy, h, frame.H, c3.shape[-2], c3.device)
    j0, j1, lx = _axis(frame.ox, w, frame.W, c3.shape[-1], c3.device)
    ly = ly[:, None]
    rows = c3[..., i0, :] * (1 - ly) + c3[..., i1, :] * ly
    return rows[..., j0] * (1 - lx) + rows[..., j1] * lx


class FramedESA(nn.Module):
    """``hdnas.model.cell.ESA`` evaluated on a tile as it is on the whole image: the same layers and
    the same arithmetic, except that the final bilinear upsampling uses the whole image's scale
    and the tile's place in it (``frame``). With the frame of the whole image it equals ESA up
    to float reassociation (tested). It runs ``ESA.forward`` itself with that resize."""

    def __init__(self, esa: nn.Module, frame: Frame):
        super().__init__()
        self.esa, self.frame = esa, frame

    accepts_layers = True  # the cell passes its layer executor on (hdnas.model.cell.Layers)

    def forward(self, x, layers=PLAIN):
        e = self.esa
        if self.frame.oy % ALIGN or self.frame.ox % ALIGN:
            raise TileError(f"tile origin ({self.frame.oy}, {self.frame.ox}) is not on a multiple "
                            f"of {ALIGN}")
        return e(x, resize=lambda c3, x: _global_bilinear(c3, self.frame, x.shape[-2],
                                                           x.shape[-1]), layers=layers)


@contextlib.contextmanager
def framed(model: DerivedNet):
    """Swap every cell's ESA for a ``FramedESA`` sharing one ``Frame`` (yielded); restore after."""
    frame = Frame()
    cells = model.cells()
    originals = [c.esa for c in cells]
    try:
        for c in cells:
            c.esa = FramedESA(c.esa, frame)
        yield frame
    finally:
        for c, e in zip(cells, originals):
            c.esa = e


# --------------------------------------------------------------------------- tiling
def tile_spans(n: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, end, core_start, core_end) along one axis of n LR pixels: the cores partition
    0..n; each tile holds its core plus >= ``overlap`` pixels of context on each side (less only
    at the image border), starts on a multiple of ALIGN, and is at most ``tile`` long."""
    if tile <= 0 or n <= tile:
        return [(0, n, 0, n)]
    if tile < MIN_LR + ALIGN - 1:
        raise TileError(f"--tile {tile} is smaller than the network's smallest input on an "
                        f"aligned origin ({MIN_LR} + {ALIGN - 1} = {MIN_LR + ALIGN - 1} LR pixels)")
    step = (tile - 2 * overlap - (ALIGN - 1)) // ALIGN * ALIGN
    if step < ALIGN:
        raise TileError(f"--tile {tile} leaves no room for --tile-overlap {overlap}: a tile needs "
                        f"at least 2 * overlap + {2 * ALIGN - 1} = {2 * overlap + 2 * ALIGN - 1} "
                        "LR pixels")
    spans = []
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        s = max(0, (c0 - overlap) // ALIGN * ALIGN)
        e = min(n, c1 + overlap)
        if e - s < MIN_LR:  # more context is always allowed: grow to the network's minimum
            s = max(0, (e - MIN_LR) // ALIGN * ALIGN)
            e = min(n, max(e, s + MIN_LR))
        spans.append((s, e, c0, c1))
    return spans


def _autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


@torch.no_grad()
def upscale_tensor(model: DerivedNet, x: torch.Tensor, tile: int = 0, overlap: int | None = None,
                   amp: str = "off", progress: bool = False, fused: bool = True) -> torch.Tensor:
    """(N, 3, h, w) float LR in 0..255 on the model's device -> (N, 3, s h, s w) float32 SR
    (not clamped). ``tile`` 0: one pass; otherwise tiles as in the module docstring, with
    ``overlap`` defaulting to the receptive radius. ``fused``: on a CPU, run the network through
    ``hdnas.infer.fused.FusedInference`` (oneDNN convs with fused epilogues; the same numbers up
    to summation order; it runs the plain network where it cannot serve, e.g. under --amp)."""
    run = FusedInference(model) if fused else model  # it runs ``model`` itself off the CPU
    s = model.scale
    h, w = x.shape[-2:]
    if min(h, w) < MIN_LR:
        raise UpscaleError(f"image {w}x{h} is too small: the network needs at least "
                           f"{MIN_LR}x{MIN_LR} pixels")
    if overlap is None:
        overlap = receptive_radius(model.genotype)
    ys, xs = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    if len(ys) == 1 and len(xs) == 1:
        with _autocast(x.device, amp):
            return run(x).float()
    out = x.new_empty((x.shape[0], 3, h * s, w * s), dtype=torch.float32)
    with framed(model) as frame, _autocast(x.device, amp):
        frame.H, frame.W = h, w
        bar = tqdm(total=len(ys) * len(xs), desc="tiles", unit="tile", leave=False,
                   disable=not progress, file=sys.stderr)
        for y0, y1, cy0, cy1 in ys:
            for x0, x1, cx0, cx1 in xs:
                frame.oy, frame.ox = y0, x0
                y = run(x[..., y0:y1, x0:x1]).float()
                out[..., cy0 * s:cy1 * s, cx0 * s:cx1 * s] = \
                    y[..., (cy0 - y0) * s:(cy1 - y0) * s, (cx0 - x0) * s:(cx1 - x0) * s]
                bar.update()
        bar.close()
    return out


# --------------------------------------------------------------------------- image files
@dataclass
class LoadedImage:
    rgb: np.ndarray  # (H, W, 3) float32, 0..255
    alpha: np.ndarray | None  # (H, W) float32, 0..255
    grey: bool
    bits: int  # 8 or 16


def _png_bit_depth(path: Path) -> int | None:
    with path.open("rb") as f:
        head = f.read(25)
    if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
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
    """Read an image for the network (see the module docstring); UpscaleError names the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UpscaleError(f"{path}: no such image file")
    try:
        if _png_bit_depth(path) == 16:
            import png  # pypng: Pillow reads 16-bit colour PNGs as 8-bit

            w, h, rows, info = png.Reader(filename=str(path)).asDirect()
            planes = info["planes"]
            arr = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(h, w, planes)
            return _from_planes(arr, planes, 16)
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("L" if im.mode == "1" else "RGB")
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
                return _from_planes(np.asarray(im, dtype=np.uint16)[..., None], 1, 16)
            planes = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(im.mode)
            if planes is None:
                raise UpscaleError(f"{path}: unsupported image mode {im.mode!r}")
            arr = np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, planes)
            return _from_planes(arr, planes, 8)
    except UpscaleError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as e:
        raise UpscaleError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - pypng's own FormatError and friends
        raise UpscaleError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """0..255 float -> uint8, or uint16 on 0..65535 (rounded half up, clamped)."""
    x = np.clip(x.astype(np.float64), 0, 255)
    if bits == 16:
        return np.floor(x * (_MAX16 / 255.0) + 0.5).astype(np.uint16)
    return np.floor(x + 0.5).astype(np.uint8)


def write_image(path, rgb: np.ndarray, alpha: np.ndarray | None, grey: bool, bits: int) -> Path:
    """Write (H, W, 3) float 0..255 colour (grey: the channel mean) and optional alpha as PNG."""
    from PIL import Image

    colour = rgb.mean(axis=2, keepdims=True) if grey else rgb
    planes = [colour] + ([alpha[..., None]] if alpha is not None else [])
    arr = _quantize(np.concatenate(planes, axis=2), bits)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if bits == 16:
        import png

        h, w, c = arr.shape
        png.from_array(arr.reshape(h, w * c), f"{mode};16").save(str(tmp))
    else:
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr, mode).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _bicubic_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    t = torch.from_numpy(alpha)[None, None]
    up = F.interpolate(t, scale_factor=scale, mode="bicubic", align_corners=False)
    return up[0, 0].clamp(0, 255).numpy()


# --------------------------------------------------------------------------- model and CLI
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


def upscale_file(model: DerivedNet, src: Path, dst: Path, device: torch.device, tile: int,
                 overlap: int | None, amp: str, progress: bool, fused: bool = True) -> Path:
    img = read_image(src)
    x = torch.from_numpy(img.rgb).permute(2, 0, 1)[None].to(device)
    try:
        y = upscale_tensor(model, x, tile, overlap, amp, progress, fused)
    except (UpscaleError, ModelFileError) as e:
        raise UpscaleError(f"{src}: {e}") from None
    rgb = y[0].permute(1, 2, 0).cpu().numpy()
    alpha = _bicubic_alpha(img.alpha, model.scale) if img.alpha is not None else None
    return write_image(dst, rgb, alpha, img.grey, img.bits)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hdnas.upscale",
        description="Super-resolve image files or folders with a derived network; writes "
                    "OUT/<name>.png (grey stays grey, alpha is upscaled bicubically, 16-bit "
                    "PNG stays 16-bit).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--genotype", help="genotype JSON or a named network (BETA21, PARA_LOSS, "
                                      "TINY18); default: the one stored in a .safetensors --weights")
    p.add_argument("--weights", required=True, help="safetensors, hdnas checkpoint or official "
                                                    "DLSR .pt")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read --weights with the full unpickler if the safe loader refuses it "
                        "(can run code stored in the file: only for files you trust)")
    p.add_argument("--scale", type=int, help="check that the network upscales by this factor")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if "
                                                    "available)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="run the network under torch.autocast in this precision")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="on a CPU, run the convolutions through oneDNN with fused activations "
                        "and residuals (hdnas.infer.fused; the same numbers up to summation order; "
                        "default on)")
    p.add_argument("--tile", type=int, default=0, help="LR tile size in pixels (0: whole image)")
    p.add_argument("--tile-overlap", type=int, default=None,
                   help="LR context pixels on each inner side of a tile (default: the receptive "
                        "radius, which makes tiling exact)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    try:
        if args.tile < 0 or (args.tile_overlap is not None and args.tile_overlap < 0):
            raise TileError("--tile and --tile-overlap must be >= 0")
        model = load_model(args.genotype, args.weights, args.scale, args.trust_pickle).to(device)
        radius = receptive_radius(model.genotype)
        overlap = radius if args.tile_overlap is None else args.tile_overlap
        if args.tile:
            tile_spans(args.tile + 1, args.tile, overlap)  # the tile/overlap check, before any image
            if overlap < radius:
                warnings.warn(f"--tile-overlap {overlap} is below the receptive radius ({radius} LR "
                              "pixels): tiles will differ slightly from the untiled result "
                              "(docs/deploy.md)", stacklevel=1)
    except (UpscaleError, ModelFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files, errors = collect_inputs(args.inputs)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    out = Path(args.out)
    taken: dict[Path, Path] = {}
    failed = len(errors)
    for src in tqdm(files, desc="upscale", unit="img", disable=not progress, file=sys.stderr):
        dst = out / f"{src.stem}.png"
        try:
            if dst in taken:
                raise UpscaleError(f"{src}: its output {dst} is already taken by {taken[dst]}")
            taken[dst] = src
            upscale_file(model, src, dst, device, args.tile, overlap, args.amp, progress,
                         args.fused)
        except (UpscaleError, ModelFileError) as e:
            failed += 1
            tqdm.write(f"error: {e}", file=sys.stderr)
    print(f"wrote {len(files) + len(errors) - failed} image(s) to {out}"
          + (f"; {failed} input(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
