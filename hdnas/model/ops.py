"""Candidate op modules, built exactly as the DLSR release builds them (no BN, no bias).

Each op keeps its layers in ``self.op`` (an ``nn.Sequential``) so state-dict keys match the
official checkpoints (``B1.c2_r.op.1.weight`` is the first depthwise conv of a sep conv).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: How an op runs its depthwise convs (``_OpModule.depthwise``): "torch" through its
#: ``nn.Conv2d`` modules, "native" through the native kernels (an error if they cannot serve the
#: input), "auto" native where they serve and are faster (CPU; never while tracing, compiling or
#: exporting, so ONNX / torch.export see the plain modules).
DEPTHWISE_MODES = ("torch", "native", "auto")

#: The native depthwise kernels, as registered by ``hdnas.mixed.native`` when it loads (the
#: model imports no backend: the backend plugs itself in). An object with
#: ``unavailable_reason(device, dtype, G, T, radius) -> str | None`` and
#: ``grouped_dw(x, kernels, ksizes, dilations, relu_input, shared_input)``; None until then, when
#: "auto" runs the plain modules and "native" is an error.
_NATIVE_DW = None


def set_native_depthwise(kernels) -> None:
    """Plug in the native depthwise kernels (``hdnas.mixed.native`` does, at import)."""
    global _NATIVE_DW
    _NATIVE_DW = kernels


def check_depthwise_mode(mode: str) -> str:
    if mode not in DEPTHWISE_MODES:
        raise ValueError(f"unknown depthwise mode {mode!r}; choose one of {DEPTHWISE_MODES}")
    return mode


def _tracing() -> bool:
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
            or torch.onnx.is_in_onnx_export())


class _OpModule(nn.Module):
    #: "torch" by default (the supernet's candidates, which the reference backend runs one by
    #: one, stay stock PyTorch); ``DerivedNet`` sets "auto". A plain attribute: the module tree
    #: and the state dict are the same in every mode.
    depthwise = "torch"

    def forward(self, x):
        if self.depthwise == "torch" or not self._native_serves(x):
            return self.op(x)
        return self.native_forward(x)

    def _native_serves(self, x) -> bool:
        if x.device.type == "meta":  # shapes only (e.g. counting Multi-Adds): the plain modules
            return False
        if self.depthwise == "auto" and (x.device.type != "cpu" or _tracing()
                                         or torch.is_autocast_enabled(x.device.type)
                                         or not x.is_contiguous()):
            return False  # (channels_last: oneDNN's NHWC depthwise convs, no layout copies)
        why = None if _NATIVE_DW is not None else \
            "the native kernels are not loaded (import hdnas.mixed.native, or hdnas.infer)"
        for conv in self.depthwise_convs() if why is None else ():
            k, d = conv.kernel_size[0], conv.dilation[0]
            why = _NATIVE_DW.unavailable_reason(x.device, x.dtype, 1, k * k, d * (k // 2))
            if why is None and not _plain_depthwise(conv):
                why = f"{conv} is not a bias-free stride-1 'same' depthwise conv"
            if why is None and (conv.weight.dtype != x.dtype or conv.weight.device != x.device):
                why = (f"weights ({conv.weight.dtype}, {conv.weight.device}) and input "
                       f"({x.dtype}, {x.device}) differ")
            if why is None and torch.is_autocast_enabled(x.device.type):
                why = "autocast is on (the native path would not cast like the plain one)"
            if why is not None:
                break
        if why is not None and self.depthwise == "native":
            raise ValueError(f"depthwise mode 'native' cannot serve this input: {why}")
        return why is None

    def native_forward(self, x):
        """The forward pass with the depthwise convs on the native kernels (ops without any
        run as usual)."""
        return self.op(x)

    def depthwise_convs(self):
        return [m for m in self.op if isinstance(m, nn.Conv2d) and m.groups > 1]


def _plain_depthwise(conv: nn.Conv2d) -> bool:
    k, d = conv.kernel_size, conv.dilation
    return (conv.bias is None and conv.groups == conv.in_channels == conv.out_channels
            and conv.weight.shape[1] == 1 and k[0] == k[1] and k[0] % 2 == 1 and d[0] == d[1]
            and tuple(conv.stride) == (1, 1) and conv.padding_mode == "zeros"
            and tuple(conv.padding) == (d[0] * (k[0] // 2),) * 2)


def native_dw(conv: nn.Conv2d, x, relu_input: bool):
    """``conv(relu(x) if relu_input else x)`` for a depthwise ``conv`` through the native
    kernels (with autograd): the same numbers up to summation order."""
    k, d = conv.kernel_size[0], conv.dilation[0]
    return _NATIVE_DW.grouped_dw(x, conv.weight[:, 0].unsqueeze(0), (k,), (d,), relu_input, True)


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

    def native_forward(self, x):
        _, dw1, pw1, _, dw2, pw2 = self.op  # the ReLUs are folded into the depthwise kernels
        return pw2(native_dw(dw2, pw1(native_dw(dw1, x, True)), True))


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

    def native_forward(self, x):
        _, dw, pw = self.op
        return pw(native_dw(dw, x, True))


class Identity(nn.Module):
    def forward(self, x):
        return x
