"""Upscaling a tensor with a derived network, whole or in tiles, with the tiled result equal to
the untiled one.

The network runs on the whole image, or on LR tiles of at most ``tile`` x ``tile`` pixels with
a margin of ``overlap`` pixels of context on each inner side. With an overlap of at least the
network's receptive radius (``receptive_radius``, the default) the tiled result equals the
untiled one up to float reassociation: |difference| <= ``TILE_TOLERANCE`` (0..255 scale,
tested). Two things make that true: every output pixel's full dependency cone is inside its tile,
and each cell's ESA attention is computed in the coordinates of the whole image (``FramedESA``:
tile origins on multiples of ``ALIGN`` = 6 LR pixels, the stride of ESA's conv + max-pool, and
ESA's bilinear upsampling with the whole image's scale), since ESA is not shift-invariant. A
smaller overlap is faster and is allowed with a warning (``tile_overlap``); the result then
differs from the untiled one (docs/deploy.md gives measured differences).
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from hdnas.infer.run import inference_runner
from hdnas.model.cell import MIN_LR_SIZE, PLAIN
from hdnas.model.genotype import Genotype
from hdnas.model.network import DerivedNet
from hdnas.model.space import get_op

__all__ = ["UpscaleError", "TileError", "ESA_RADIUS", "ALIGN", "TILE_TOLERANCE", "op_radius",
           "receptive_radius", "Frame", "FramedESA", "framed", "tile_spans", "check_tile_sizes",
           "tile_overlap", "upscale_tensor"]

#: ESA's reach, in its input's pixels, for any image size: the attention at row g reads the
#: pooled rows i0, i1 = i0 + 1 around g * P / H (P < H / 6 pooled rows), each pooled row after
#: three 3x3 convs reads pooled rows q - 3 .. q + 3, a pooled row q covers conv rows 3q .. 3q + 6
#: (max-pool 7 stride 3) and conv row j covers rows 2j .. 2j + 2 (3x3 stride 2, no padding), so
#: rows 6 i0 - 18 .. 6 i1 + 32; with H - 6P <= 14 that is at most 41 rows above and 38 below
#: (38 where the source row is clamped to 0 at the top).
ESA_RADIUS = 41
#: tile origins are multiples of this (ESA's stride-2 conv, then its stride-3 max-pool)
ALIGN = 6
#: tiled vs untiled, overlap >= receptive radius, float32, 0..255 scale
TILE_TOLERANCE = 2e-3


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
    if tile < MIN_LR_SIZE + ALIGN - 1:
        raise TileError(f"--tile {tile} is smaller than the network's smallest input on an "
                        f"aligned origin ({MIN_LR_SIZE} + {ALIGN - 1} = "
                        f"{MIN_LR_SIZE + ALIGN - 1} LR pixels)")
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
        if e - s < MIN_LR_SIZE:  # more context is always allowed: grow to the network's minimum
            s = max(0, (e - MIN_LR_SIZE) // ALIGN * ALIGN)
            e = min(n, max(e, s + MIN_LR_SIZE))
        spans.append((s, e, c0, c1))
    return spans


def check_tile_sizes(tile: int, overlap: int | None) -> None:
    """TileError for a negative tile size or overlap."""
    if tile < 0 or (overlap is not None and overlap < 0):
        raise TileError("--tile and --tile-overlap must be >= 0")


def tile_overlap(genotype: Genotype, tile: int, overlap: int | None) -> int:
    """The overlap to tile ``genotype``'s network with (None: its receptive radius), checked
    before any image: TileError for a negative size or a tile too small for its overlap, a
    warning for an overlap below the receptive radius (the tiles then differ slightly)."""
    check_tile_sizes(tile, overlap)
    radius = receptive_radius(genotype)
    overlap = radius if overlap is None else overlap
    if tile:
        tile_spans(tile + 1, tile, overlap)  # the tile/overlap check
        if overlap < radius:
            warnings.warn(f"--tile-overlap {overlap} is below the receptive radius ({radius} LR "
                          "pixels): tiles will differ slightly from the untiled result "
                          "(docs/deploy.md)", stacklevel=2)
    return overlap


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
    to summation order; it runs the plain network where it cannot serve, e.g. under --amp),
    as ``hdnas.infer.run.inference_runner`` decides."""
    run = inference_runner(model, fused)
    s = model.scale
    h, w = x.shape[-2:]
    if min(h, w) < MIN_LR_SIZE:
        raise UpscaleError(f"image {w}x{h} is too small: the network needs at least "
                           f"{MIN_LR_SIZE}x{MIN_LR_SIZE} pixels")
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

