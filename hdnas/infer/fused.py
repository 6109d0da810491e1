"""Fast CPU inference of a derived network: oneDNN convolutions with fused epilogues.

``FusedInference(net)`` computes ``net(x)`` (a ``DerivedNet``: evaluation, upscaling) with the
same operations in the same order of layers, but

* every convolution runs through oneDNN in channels-last (NHWC) memory format
  (``torch.ops.mkldnn._convolution_pointwise``, the op PyTorch's own compiler emits for CPU
  convolutions; stock PyTorch sends 1x1 convs at batch 1 and one thread to a slower GEMM path);
* the activation after a conv runs inside it as a oneDNN post-op (the distillation branches'
  LeakyReLU, the ReLUs of the separable convs and of ESA, ESA's sigmoid), and so does the
  residual addition of each step (``conv(x) + x``) and the global residual;
* no concatenation is materialised: a 1x1 conv over ``cat(parts)`` (each cell's fuse conv
  ``c5``, the cell-input blocks, the global ``cout``) is the sum of 1x1 convs over the parts,
  accumulated in place by oneDNN's binary post-op.

The numbers are those of ``net(x)`` up to the order of floating-point summation (tested against
the fp64 plain network with a bound of a few times the plain fp32 network's own error;
measurements in bench/results/cpu_step.md). The cells and ESA keep their one description of
their structure: they run their fixed layers through this object's ``conv`` / ``step`` /
``conv_cat`` (``hdnas.model.cell.Layers`` is the plain twin), and so does ``hdnas.infer.tiling``'s
tile-aware ESA. What it does not recognise (an op module that is not one of hdnas.model.ops' conv /
separable / dilated / identity ops, a module put in place of a cell or of an ESA) it calls as a
module, so any derived network runs.

It serves fp32 CPU inputs without autograd (``torch.no_grad`` or parameters that do not require
grad), outside autocast, tracing and export; otherwise ``forward`` is ``net(x)`` itself
(``serves(x)`` tells which). The packed weights are re-read when a parameter changes in place
(``load_state_dict``, an optimizer step): they are keyed by storage and version counter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hdnas.model.cell import DistillCell, activate
from hdnas.model.network import DerivedNet
from hdnas.model.space import LRELU_SLOPE
from hdnas.model.ops import Identity, _OpModule, _tracing

_mk = torch.ops.mkldnn


def available() -> bool:
    """oneDNN's fused convolution ops are in this torch build (every x86/aarch64 CPU wheel) and
    not switched off (``torch.backends.mkldnn.enabled = False`` turns the fused path off)."""
    return (bool(torch.backends.mkldnn.is_available()) and torch.backends.mkldnn.enabled
            and hasattr(_mk, "_convolution_pointwise"))


class FusedInference(nn.Module):
    """``net`` run for inference through oneDNN with fused epilogues (module docstring)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if not isinstance(net, DerivedNet):
            raise TypeError(f"FusedInference runs a DerivedNet, got {type(net).__name__}")
        self.net = net
        self._packed: dict = {}
        # oneDNN pads with zeros only; another padding mode anywhere: run the plain network
        self._plain_padding = all(m.padding_mode == "zeros" and not isinstance(m.padding, str)
                                  for m in net.modules() if isinstance(m, nn.Conv2d))

    # ------------------------------------------------------------------ when it serves
    def serves(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` takes the fused path (else it is ``net(x)``)."""
        if not (available() and self._plain_padding) or _tracing() or x.device.type != "cpu" \
                or x.dtype != torch.float32:
            return False
        if torch.is_autocast_enabled("cpu"):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(
                p.requires_grad for p in self.net.parameters())):
            return False  # the fused ops have no backward
        return all(p.device.type == "cpu" and p.dtype == torch.float32
                   for p in self.net.parameters())

    def forward(self, x):
        if not self.serves(x):
            return self.net(x)
        self.net.check_input(x)
        with torch.no_grad():
            return self._forward(x.contiguous(memory_format=torch.channels_last))

    # ------------------------------------------------------------------ conv primitives
    def _weight(self, conv: nn.Conv2d, part=None) -> torch.Tensor:
        """conv's weight (or its input-channel slice ``part`` = (start, stop)) in the NHWC
        layout oneDNN reads without a copy; re-made when the parameter changed."""
        w = conv.weight
        key = (id(conv), part)
        stamp = (w.data_ptr(), w._version)
        hit = self._packed.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        v = w.detach() if part is None else w.detach()[:, part[0]:part[1]]
        v = v.contiguous(memory_format=torch.channels_last)
        self._packed[key] = (stamp, v)
        return v

    @staticmethod
    def _geometry(conv: nn.Conv2d):
        return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups

    def conv(self, conv: nn.Conv2d, x, act: str = "none", add=None):
        """``act(conv(x) [+ add])``; act: none, relu, lrelu (the cells' slope), sigmoid."""
        bias = None if conv.bias is None else conv.bias.detach()
        geo = self._geometry(conv)
        w = self._weight(conv)
        if add is None:
            if act == "lrelu":
                return _mk._convolution_pointwise(x, w, bias, *geo, "leaky_relu", [LRELU_SLOPE], "")
            return _mk._convolution_pointwise(x, w, bias, *geo, act, [], "")
        # oneDNN fuses only relu after the binary add: other activations run in place after it
        y = _mk._convolution_pointwise.binary(x, add, w, bias, *geo, "add", 1.0,
                                              "relu" if act == "relu" else None, [], "")
        return activate(y, act, inplace=True) if act != "relu" else y

    def conv_cat(self, conv: nn.Conv2d, parts, act: str = "none"):
        """``act(conv(cat(parts, 1)))`` for a 1x1 conv, without the concatenation: the first
        part's conv (with the bias), then each further part's conv added in place."""
        if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.stride != (1, 1):
            return self.conv(conv, torch.cat(parts, 1), act)
        bias = None if conv.bias is None else conv.bias.detach()
        start, y = 0, None
        for p in parts:
            w = self._weight(conv, (start, start + p.shape[1]))
            start += p.shape[1]
            if y is None:
                y = _mk._convolution_pointwise(p, w, bias, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
            else:
                _mk._convolution_pointwise_.binary(y, p, w, None, [0, 0], [1, 1], [1, 1], 1,
                                                   "add", 1.0, None, [], "")
        return activate(y, act, inplace=True)

    def step(self, op: nn.Module, x):
        """``lrelu(op(x) + x)``, the remaining branch of a distillation step: the op's
        ReLU/conv layers fused where they can be, the residual add inside its last conv."""
        if isinstance(op, Identity):
            return activate(x + x, "lrelu", inplace=True)
        layers = list(op.op) if isinstance(op, _OpModule) and isinstance(op.op, nn.Sequential) \
            else None
        if not layers or not all(type(m) in (nn.ReLU, nn.Conv2d) for m in layers) \
                or type(layers[-1]) is not nn.Conv2d:
            return activate(op(x) + x, "lrelu", inplace=True)
        y, i = x, 0
        while i < len(layers) - 1:
            m = layers[i]
            if type(m) is nn.ReLU:
                y, i = torch.relu(y), i + 1
            elif type(layers[i + 1]) is nn.ReLU:  # conv then ReLU: one fused call
                y, i = self.conv(m, y, "relu"), i + 2
            else:
                y, i = self.conv(m, y), i + 1
        return self.conv(layers[-1], y, "lrelu", add=x)

    # ------------------------------------------------------------------ the network
    def _forward(self, x):
        net = self.net
        fea = self.conv(net.fea_conv, x)
        outs = []
        for i, cell in enumerate(net.cells()):
            if i < 2:
                inp = fea if i == 0 else outs[0]
            else:
                inp = self._block(getattr(net, f"c{i + 1}"), net.input_parts(i, outs))
            # the cell and its ESA run their fixed layers through this object's conv/step/conv_cat
            outs.append(cell(inp, layers=self) if type(cell) is DistillCell else cell(inp))
        out = self._block(net.cout, outs)
        up_conv, shuffle = net.upsampler
        y = self.conv(up_conv, self.conv(net.LR_conv, out, add=fea))
        return shuffle(y).contiguous()

    def _block(self, block: nn.Sequential, parts):
        """conv_block (1x1 conv + LeakyReLU) over the concatenation of ``parts``."""
        conv, act = block
        if not (isinstance(act, nn.LeakyReLU) and act.negative_slope == LRELU_SLOPE):
            return block(torch.cat(parts, 1))
        return self.conv_cat(conv, parts, "lrelu")
