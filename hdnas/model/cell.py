"""The residual feature-distillation cell (RFDN's RFDB) with ESA, as the DLSR release builds it.

The same class serves the supernet (each step's remaining branch is a ``MixedOp``, computed by a
backend) and the derived network (each step is one fixed op). Layer names follow the release
(``c1_d``, ``c1_r`` ... ``c5``, ``esa``) so official weights load by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hdnas.model.mixed_op import PLAIN_STEPS, MixedOp
from hdnas.model.space import LRELU_SLOPE

NUM_STEPS = 3


def conv_layer(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    """Conv with bias and 'same' padding (the release's ``conv_layer``)."""
    return nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, bias=True)


def lrelu(x):
    return F.leaky_relu(x, LRELU_SLOPE)


def activate(y, act: str, inplace: bool = False):
    """``act`` of the layers protocol: "none", "relu", "lrelu" (the cells' slope), "sigmoid"."""
    if act == "lrelu":
        return F.leaky_relu(y, LRELU_SLOPE, inplace=inplace)
    if act == "relu":
        return F.relu(y, inplace=inplace)
    if act == "sigmoid":
        return torch.sigmoid_(y) if inplace else torch.sigmoid(y)
    return y


class Layers:
    """How the fixed layers of a cell and of ESA run: this class runs the plain modules;
    ``hdnas.infer.fused.FusedInference`` has the same three methods and runs them through oneDNN
    with fused epilogues. The cell and ESA describe their structure once, through these."""

    @staticmethod
    def conv(conv: nn.Module, x, act: str = "none", add=None):
        """``act(conv(x) [+ add])``."""
        y = conv(x)
        return activate(y if add is None else y + add, act)

    @staticmethod
    def step(op: nn.Module, x):
        """``lrelu(op(x) + x)``: the remaining branch of a derived distillation step."""
        return lrelu(op(x) + x)

    @staticmethod
    def conv_cat(conv: nn.Module, parts, act: str = "none"):
        """``act(conv(cat(parts, 1)))``."""
        return activate(conv(torch.cat(parts, dim=1)), act)


PLAIN = Layers()


class ESA(nn.Module):
    """Enhanced spatial attention, exactly RFDN's (f = C // 4)."""

    def __init__(self, C: int):
        super().__init__()
        f = C // 4
        self.conv1 = nn.Conv2d(C, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv_max = nn.Conv2d(f, f, 3, padding=1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)
        self.conv3_ = nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = nn.Conv2d(f, C, 1)

    #: ``forward`` takes ``layers`` (see ``Layers``); a module replacing ``cell.esa`` may not
    accepts_layers = True

    def forward(self, x, resize=None, layers: Layers = PLAIN):
        """``resize(c3, x)`` brings the pooled branch back to x's size (default: bilinear, as
        RFDN; ``hdnas.upscale`` passes a tile-aware one)."""
        c1_ = layers.conv(self.conv1, x)
        c1 = layers.conv(self.conv2, c1_)
        v_max = F.max_pool2d(c1, kernel_size=7, stride=3)
        v_range = layers.conv(self.conv_max, v_max, "relu")
        c3 = layers.conv(self.conv3, v_range, "relu")
        c3 = layers.conv(self.conv3_, c3)
        if resize is None:
            c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        else:
            c3 = resize(c3, x)
        return x * layers.conv(self.conv4, layers.conv(self.conv_f, c1_, add=c3), "sigmoid")


#: Smallest H (and W) of a network input: the ESA branch runs a conv 3 stride 2 then a max-pool
#: 7 stride 3, which need at least 15 LR pixels. Every check of an LR size uses this one number.
MIN_LR_SIZE = 15


def esa_min_size() -> int:
    """Smallest H (and W) the ESA branch accepts (``MIN_LR_SIZE``)."""
    return MIN_LR_SIZE


class DistillCell(nn.Module):
    """Three distillation steps, a fourth 3x3 conv, concat, 1x1 fuse, ESA. No cell residual."""

    def __init__(self, C: int, step_ops: list[nn.Module]):
        super().__init__()
        if len(step_ops) != NUM_STEPS:
            raise ValueError(f"a cell has {NUM_STEPS} searchable steps, got {len(step_ops)} ops")
        dc = C // 2
        for i, op in enumerate(step_ops, start=1):
            setattr(self, f"c{i}_d", conv_layer(C, dc, 1))
            setattr(self, f"c{i}_r", op)
        self.c4 = conv_layer(C, dc, 3)
        self.c5 = conv_layer(dc * 4, C, 1)
        self.esa = ESA(C)

    def steps(self):
        return [(getattr(self, f"c{i}_d"), getattr(self, f"c{i}_r")) for i in range(1, NUM_STEPS + 1)]

    def forward(self, x, weights=None, backend=None, layers: Layers = PLAIN):
        """``weights``: (3, K) op weights when the steps are mixed ops; None for a derived cell.
        ``layers`` runs the fixed layers (``Layers``; the plain modules by default)."""
        if weights is not None and backend is None:
            backend = PLAIN_STEPS
        distilled = []
        for i, (c_d, c_r) in enumerate(self.steps()):
            if isinstance(c_r, MixedOp):
                d, x = backend.distill_step(x, weights[i], c_r, c_d)
            else:
                d, x = layers.conv(c_d, x, "lrelu"), layers.step(c_r, x)
            distilled.append(d)
        parts = distilled + [layers.conv(self.c4, x, "lrelu")]
        y = layers.conv_cat(self.c5, parts) if backend is None else backend.fuse_concat(parts, self.c5)
        if getattr(self.esa, "accepts_layers", False):
            return self.esa(y, layers=layers)
        return self.esa(y)  # a module put in place of the ESA
