"""A drawing of a derived network (any genotype), with matplotlib: the head conv, each cell with
its three chosen ops (the remaining branch of its distillation steps), the network-level
connections (B1 reads the head, B2 reads B1, each later cell reads its two chosen predecessors
through a 1x1 conv), the global concat, the LR conv with the global residual and the upsampler;
the caption gives channels, scale, params and Multi-Adds (at a 1280x720 output, as the tables)."""
from __future__ import annotations

from pathlib import Path

import torch
# files only, never a window: a Figure of its own (no pyplot, so no global backend is switched
# in the process of whoever imports this)
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from hdnas.model.complexity import count_params_and_macs, format_count
from hdnas.model.genotype import Genotype
from hdnas.model.network import DerivedNet
from hdnas.safeio import write_atomic

#: a colour per op family (conv, sep, dil, skip)
FAMILY_COLOURS = {"conv": "#c6dbef", "sep": "#c7e9c0", "dil": "#fdd0a2", "skip": "#e5e5e5"}


def _family(op: str) -> str:
    return "conv" if op.startswith("conv") else "sep" if op.startswith("sep") else \
        "dil" if op.startswith("dil") else "skip"


def _box(ax, x, y, w, h, text, colour="white", size=8, weight="normal"):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=colour, edgecolor="#333333", linewidth=1.0))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, weight=weight)


def _arrow(ax, a, b, rad=0.0, colour="#333333", style="-|>", lw=1.0):
    ax.add_patch(FancyArrowPatch(a, b, connectionstyle=f"arc3,rad={rad}", arrowstyle=style,
                                 mutation_scale=10, color=colour, linewidth=lw,
                                 shrinkA=2, shrinkB=2))


def draw_genotype(genotype: Genotype, path, title: str | None = None,
                  overwrite: bool = True, root=None) -> Path:
    """Draw ``genotype`` to ``path`` (PNG, or any format matplotlib writes, by suffix), through
    the atomic writer (``overwrite=False`` refuses an existing file; ``root``: the file's folder
    must lie inside it). The counts come from the network built on the meta device (no weights
    allocated, so any genotype within the bounds draws in about a second)."""
    g = genotype
    n = g.num_cells
    with torch.device("meta"):
        net = DerivedNet(g, depthwise="torch")
    params, macs = count_params_and_macs(net)
    cw, ch, gap = 1.6, 1.55, 0.7          # cell box size and the gap between boxes
    xs = [1.9 + i * (cw + gap) for i in range(n)]
    y0 = 0.0
    width = xs[-1] + cw / 2 + 3.2
    fig = Figure(figsize=(max(8.0, width * 0.95), 4.6))
    ax = fig.subplots()
    ax.set_xlim(-0.4, width)
    ax.set_ylim(-2.45, 2.7)
    ax.set_axis_off()

    _box(ax, 0.3, y0, 0.9, 0.6, "conv 3x3\n(head)", "#f7f7f7")
    for i, x in enumerate(xs):
        ops = g.ops_of_cell(i)
        ax.add_patch(FancyBboxPatch((x - cw / 2, y0 - ch / 2), cw, ch,
                                    boxstyle="round,pad=0.02,rounding_size=0.1",
                                    facecolor="white", edgecolor="#333333", linewidth=1.2))
        ax.text(x, y0 + ch / 2 - 0.18, f"B{i + 1}", ha="center", va="center", fontsize=9,
                weight="bold")
        for k, op in enumerate(ops):
            _box(ax, x, y0 + 0.28 - 0.4 * k, cw - 0.25, 0.3, op, FAMILY_COLOURS[_family(op)], 7)
    # the chain: head -> B1 -> B2; B1.. feed the global concat
    _arrow(ax, (0.75, y0), (xs[0] - cw / 2, y0))
    _arrow(ax, (xs[0] + cw / 2, y0), (xs[1] - cw / 2, y0))
    # cells 3..: the two chosen predecessors, through a 1x1 conv (arcs above the row)
    for i in range(2, n):
        a, b = g.inputs[i - 2]
        for j, src in enumerate((a, b)):
            d = (i - src) * (cw + gap)
            rad = -2 * min(0.35 + 0.3 * (i - src - 1), 1.45) / d  # arc height grows, bounded
            start = (xs[src] + 0.25 * (j - 0.5), y0 + ch / 2)
            end = (xs[i] - 0.25 + 0.5 * j, y0 + ch / 2)
            _arrow(ax, start, end, rad=rad, colour="#3182bd" if j == 0 else "#e6550d")
    # the global concat of all cells, conv 1x1, LR conv + head residual, upsampler
    yc = -2.05
    for x in xs:
        _arrow(ax, (x, y0 - ch / 2), (x, yc + 0.22), colour="#777777", lw=0.8)
    ax.plot([xs[0], xs[-1]], [yc + 0.22, yc + 0.22], color="#777777", linewidth=0.8)
    xt = xs[-1] + cw / 2 + 0.5
    _arrow(ax, (xs[-1], yc + 0.22), (xt + 0.2, yc + 0.22), colour="#777777", lw=0.8)
    _box(ax, xt + 0.9, yc + 0.22, 1.4, 0.55, f"concat {n}C\nconv 1x1 + LReLU", "#f7f7f7", 7)
    _box(ax, xt + 0.9, -0.9, 1.4, 0.55, "conv 3x3 (LR)\n+ head (residual)", "#f7f7f7", 7)
    _box(ax, xt + 0.9, 0.55, 1.4, 0.55, f"conv 3x3, pixel\nshuffle x{g.scale}", "#f7f7f7", 7)
    _arrow(ax, (xt + 0.9, yc + 0.5), (xt + 0.9, -1.18))
    _arrow(ax, (xt + 0.9, -0.62), (xt + 0.9, 0.27))
    _arrow(ax, (xt + 0.9, 0.83), (xt + 0.9, 1.35))
    ax.text(xt + 0.9, 1.5, "SR output", ha="center", va="center", fontsize=8, weight="bold")
    ax.text(0.3, 0.55, "LR input", ha="center", va="center", fontsize=8, weight="bold")
    _arrow(ax, (0.3, 0.45), (0.3, 0.31))
    name = title or g.name or "derived network"
    shared = "ops shared by all cells" if len(g.cell_ops) == 1 else "ops per cell"
    ax.set_title(f"{name}: C={g.channels}, x{g.scale}, {n} cells ({shared})", fontsize=10)
    inputs = ("\ncells 3..: their two chosen predecessors (blue first), concatenated, through "
              "conv 1x1 + LReLU") if n > 2 else ""
    fig.text(0.5, 0.015, f"params {params:,} ({format_count(params)}), Multi-Adds "
             f"{format_count(macs)} at a 1280x720 output\neach cell: three distillation steps "
             f"(1x1 distilled branch + the op shown), conv 3x3, concat, conv 1x1, ESA{inputs}",
             ha="center", va="bottom", fontsize=8, linespacing=1.5)
    fig.tight_layout(rect=(0, 0.1 if inputs else 0.08, 1, 1))
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    write_atomic(path, lambda f: fig.savefig(f, format=fmt, dpi=130), overwrite=overwrite,
                 root=root)
    return path
