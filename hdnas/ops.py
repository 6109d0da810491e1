"""Candidate op modules, built exactly as the DLSR release builds them (no BN, no bias).

Each op keeps its layers in ``self.op`` (an ``nn.Sequential``) so state-dict keys match the
official checkpoints (``B1.c2_r.op.1.weight`` is the first depthwise conv of a sep conv).
"""
from __future__ import annotations

from torch import nn


class _OpModule(nn.Module):
    def forward(self, x):
        return self.op(x)


class Conv(_OpModule):
    """Dense kxk conv C->C, 'same' padding."""

    def __init__(self, C: int, k: int):
        super().__init__()
        self.kernel = k
        self.op = nn.Sequential(nn.Conv2d(C, C, k, padding=k // 2, bias=False))


class SepConv(_OpModule):
    """DARTS double separable conv: ReLU, dw k, pw, ReLU, dw k, pw."""

    def __init__(self, C: int, k: int):
        super().__init__()
        self.kernel = k
        p = k // 2
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, k, padding=p, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False),
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, k, padding=p, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False),
        )


class DilConv(_OpModule):
    """ReLU, depthwise k with dilation d, pw."""

    def __init__(self, C: int, k: int, dilation: int = 2):
        super().__init__()
        self.kernel = k
        self.dilation = dilation
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, k, padding=dilation * (k // 2), dilation=dilation, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False),
        )


class Identity(nn.Module):
    def forward(self, x):
        return x
