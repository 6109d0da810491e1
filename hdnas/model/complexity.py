"""Params and Multi-Adds of a model, counted by forward hooks at the published convention.

Why hooks: counting what actually runs covers every conv, including the ESA branch at its real
(strided, pooled) resolution, with no hand-written formula to drift from the code.

Convention (docs/method.md §4, §6): Multi-Adds = multiply-accumulates of every ``Conv2d``
(and ``Linear``/``ConvTranspose2d`` if present), bias not counted, for one image whose HR output
is 1280x720; the LR input is ``ceil(720/s) x ceil(1280/s)`` (640x360 for x2, 427x240 for x3,
320x180 for x4). Pooling, activations, interpolation, pixel shuffle and the attention product
are not counted. The forward runs on the ``meta`` device (shapes only, no arithmetic), so
counting is instant; a model that cannot run on meta tensors is counted with a real
``torch.no_grad`` forward on CPU instead. Ops applied functionally (not through a module) are
invisible to the hooks.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from hdnas.model.ops import _OpModule

__all__ = ["count_params", "count_params_and_macs", "lr_size_for", "format_count"]

HR_SIZE = (720, 1280)


def count_params(model: nn.Module) -> int:
    """All parameters (shared tensors once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def lr_size_for(scale: int, hr_size=HR_SIZE) -> tuple[int, int]:
    return tuple(int(math.ceil(n / scale)) for n in hr_size)


def _conv_hook(counter: dict):
    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            counter["macs"] += output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.ConvTranspose2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            x = inputs[0]
            counter["macs"] += x.numel() * (module.out_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            counter["macs"] += output.numel() * module.in_features
        counter["layers"] += 1
    return hook


def _count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multi-Adds by hooks on every conv/linear layer of one forward. The ops run their plain
    ``nn.Conv2d`` modules meanwhile (``hdnas.model.ops`` depthwise mode "torch"): the native
    depthwise path computes the same convs without calling the hooked modules."""
    counter = {"macs": 0, "layers": 0}
    modes = [(m, m.depthwise) for m in model.modules() if isinstance(m, _OpModule)]
    handles = [m.register_forward_hook(_conv_hook(counter)) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        for m, _ in modes:
            m.depthwise = "torch"
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.depthwise = mode
    return counter["macs"]


def count_params_and_macs(model: nn.Module, scale: int | None = None, hr_size=HR_SIZE,
                          in_channels: int = 3) -> tuple[int, int]:
    """(params, Multi-Adds) for one image with an ``hr_size`` (H, W) output; the LR input is
    ``lr_size_for(scale, hr_size)``. ``scale`` defaults to ``model.scale``."""
    scale = scale if scale is not None else getattr(model, "scale", None)
    if scale is None:
        raise ValueError("count_params_and_macs needs a scale (the model has no .scale)")
    lr = lr_size_for(int(scale), hr_size)
    params = count_params(model)
    try:
        meta = copy.deepcopy(model).to("meta").eval()
        macs = _count_macs(meta, torch.empty(1, in_channels, *lr, device="meta"))
    except (NotImplementedError, RuntimeError):
        was_training = model.training
        model.eval()
        try:
            dev = next(model.parameters()).device
            macs = _count_macs(model, torch.zeros(1, in_channels, *lr, device=dev))
        finally:
            model.train(was_training)
    return params, int(macs)


def format_count(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; 67.31e9 -> '67.31G'."""
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}{unit}"
    return f"{n:.0f}{unit}"
