"""The fixed part of a derived network's cost (everything but the searchable ops), so that a
search budget in params or Multi-Adds means the number the evaluation table will print."""
from __future__ import annotations

from hdnas.model.genotype import Genotype
from hdnas.model.complexity import count_params, count_params_and_macs, lr_size_for
from hdnas.model.network import DerivedNet
from hdnas.model.space import get_op


def fixed_cost(C: int, cells: int, scale: int, kind: str = "params") -> tuple[float, float]:
    """(fixed cost, LR pixels per image): expected total = fixed + op cost per pixel * pixels.
    Measured on a derived net whose ops are all conv_1x1, minus those ops."""
    g = Genotype([["conv_1x1"] * 3], [[i - 1, i] for i in range(1, cells - 1)], channels=C,
                 scale=scale, num_cells=cells)
    net = DerivedNet(g)
    op_cost = 3 * cells * get_op("conv_1x1").params(C)
    if kind == "params":
        return float(count_params(net) - op_cost), 1.0
    h, w = lr_size_for(scale)
    pixels = h * w
    _, macs = count_params_and_macs(net, scale)
    return float(macs - op_cost * pixels), float(pixels)
