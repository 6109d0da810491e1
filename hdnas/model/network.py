"""The network level: the supernet (alpha over ops, beta over earlier cells) and the derived
network built from a genotype. Layer names follow the release so official weights load."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hdnas.model.cell import MIN_LR_SIZE, DistillCell, conv_layer
from hdnas.model.genotype import Genotype, check_scale, derive
from hdnas.model.mixed_op import MixedOp, PlainSteps
from hdnas.model.ops import _OpModule, check_depthwise_mode
from hdnas.model.space import DLSR_PRIMITIVES, check_op_set, get_op

NUM_STEPS = 3


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """1x1 conv + LeakyReLU(0.05), as the release's ``conv_block(..., act_type='lrelu')``."""
    return nn.Sequential(conv_layer(cin, cout, 1), nn.LeakyReLU(0.05))


def upsampler(C: int, scale: int, out_nc: int = 3) -> nn.Sequential:
    """3x3 conv to 3*s^2 channels + pixel shuffle (one stage for every scale)."""
    return nn.Sequential(conv_layer(C, out_nc * scale * scale, 3), nn.PixelShuffle(scale))


class _SRNet(nn.Module):
    """Head, cells, global concat, LR conv with global residual, upsampler. Subclasses say how
    the input of each cell from the third on is formed."""

    def __init__(self, C: int, scale: int, cells: list[nn.Module], in_nc: int = 3):
        super().__init__()
        self.C, self.scale, self.num_cells = C, check_scale(scale), len(cells)
        self.fea_conv = conv_layer(in_nc, C, 3)
        for i, cell in enumerate(cells, start=1):
            setattr(self, f"B{i}", cell)
        self.cout = conv_block(C * len(cells), C)
        self.LR_conv = conv_layer(C, C, 3)
        self.upsampler = upsampler(C, scale, in_nc)

    def cells(self):
        return [getattr(self, f"B{i}") for i in range(1, self.num_cells + 1)]

    def check_input(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an RGB batch (N, 3, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if min(x.shape[-2:]) < MIN_LR_SIZE:
            raise ValueError(f"input {tuple(x.shape[-2:])} is too small: the ESA attention needs LR "
                             f"images of at least {MIN_LR_SIZE}x{MIN_LR_SIZE}")

    def forward(self, x):
        self.check_input(x)
        fea = self.fea_conv(x)
        outs = []
        for i, cell in enumerate(self.cells()):
            if i < 2:  # B1 reads the head, B2 reads B1 (a fixed chain)
                inp = fea if i == 0 else outs[0]
            else:
                inp = getattr(self, f"c{i + 1}")(self.cell_input(i, outs))
            outs.append(self.run_cell(i, cell, inp))
        out = self.cout(torch.cat(outs, dim=1))
        return self.upsampler(self.LR_conv(out) + fea)


class SuperNet(_SRNet):
    """The DLSR search network. ``alphas``: (3, K) shared by all cells (the release), or
    (cells, 3, K) with ``alpha_per_cell``. ``betas[j]`` weighs the j+2 cells before cell j+3."""

    def __init__(self, C: int = 48, num_cells: int = 6, scale: int = 2, op_names=DLSR_PRIMITIVES,
                 alpha_per_cell: bool = False, backend: PlainSteps | None = None):
        self.op_names = check_op_set(op_names)
        cells = [DistillCell(C, [MixedOp(C, self.op_names) for _ in range(NUM_STEPS)])
                 for _ in range(num_cells)]
        super().__init__(C, scale, cells)
        for i in range(3, num_cells + 1):
            setattr(self, f"c{i}", conv_block(C * (i - 1), C))
        K = len(self.op_names)
        shape = (num_cells, NUM_STEPS, K) if alpha_per_cell else (NUM_STEPS, K)
        self.alphas = nn.Parameter(1e-3 * torch.randn(shape))
        self.betas = nn.ParameterList(nn.Parameter(1e-3 * torch.randn(i)) for i in range(2, num_cells))
        if isinstance(backend, str):
            raise TypeError("SuperNet(backend=...) takes a backend object (hdnas.mixed.get_backend"
                            f"({backend!r})) or None for the plain per-op loop")
        self.backend = backend

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas, *self.betas]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def op_weights(self) -> torch.Tensor:
        return F.softmax(self.alphas, dim=-1)

    def cell_input(self, i, outs):
        """beta-weighted concat of all earlier cells."""
        b = F.softmax(self.betas[i - 2], dim=-1)
        return torch.cat([b[j] * o for j, o in enumerate(outs)], 1)

    def run_cell(self, i, cell, inp):
        w = self.op_weights()
        return cell(inp, w[i] if w.dim() == 3 else w, self.backend)

    def genotype(self, name: str = "") -> Genotype:
        return derive(self.alphas, self.betas, self.op_names, self.C, self.scale, name)


class DerivedNet(_SRNet):
    """The network of a genotype: fixed ops, each of cells 3.. takes its two chosen predecessors
    through ``conv1x1(2C -> C) + lrelu`` (the release's retrain model). ``depthwise``: how the
    ops' depthwise convs run (``set_depthwise``)."""

    def __init__(self, genotype: Genotype, depthwise: str = "auto"):
        C = genotype.channels
        cells = [DistillCell(C, [get_op(n).build(C) for n in genotype.ops_of_cell(i)])
                 for i in range(genotype.num_cells)]
        super().__init__(C, genotype.scale, cells)
        self.genotype = genotype
        for i in range(3, genotype.num_cells + 1):
            setattr(self, f"c{i}", conv_block(2 * C, C))
        self.set_depthwise(depthwise)

    def set_depthwise(self, mode: str) -> "DerivedNet":
        """How the ops' depthwise convs run (``hdnas.model.ops.DEPTHWISE_MODES``): "auto" (the
        default: the native kernels on CPU when they are built, never while tracing or
        exporting), "native" or "torch" (the plain ``nn.Conv2d`` modules). The module tree and
        state dict are the same in every mode."""
        check_depthwise_mode(mode)
        for m in self.modules():
            if isinstance(m, _OpModule):
                m.depthwise = mode
        return self

    def input_parts(self, i, outs):
        """The two predecessor outputs cell ``i`` (0-based, >= 2) reads, in order."""
        a, b = self.genotype.inputs[i - 2]
        return [outs[a], outs[b]]

    def cell_input(self, i, outs):
        return torch.cat(self.input_parts(i, outs), 1)

    def run_cell(self, i, cell, inp):
        return cell(inp)
