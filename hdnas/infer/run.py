"""How a derived network runs for inference: the one place that chooses its execution, and
super-resolving one image with it (optionally with the x8 self-ensemble).

* ``prepare_model(model, backend, device)``: evaluation's ``--backend`` (``BACKENDS``: plain
  modules, native depthwise kernels, channels-last, or the fused oneDNN runner), the model set up
  for it and moved to ``device``;
* ``inference_runner(model, fused)``: the model as it is (device, depthwise kernels, memory
  format untouched), run through the fused oneDNN path where that serves (fp32 CPU inputs, no
  autograd, no autocast) and as itself elsewhere; upscaling (``--fused`` / ``--no-fused``) and
  retraining's validation use it;
* ``pick_device(name)``: a torch device from a ``--device`` value (``auto``: cuda if available).
"""
from __future__ import annotations

import torch

from hdnas.infer.fused import FusedInference, available
from hdnas.model.network import DerivedNet


def _transforms():
    """The 8 dihedral transforms as (forward, inverse) on (..., H, W)."""
    out = []
    for t in (False, True):
        for k in range(4):
            def fwd(x, k=k, t=t):
                x = x.transpose(-1, -2) if t else x
                return torch.rot90(x, k, (-2, -1))

            def inv(x, k=k, t=t):
                x = torch.rot90(x, -k, (-2, -1))
                return x.transpose(-1, -2) if t else x
            out.append((fwd, inv))
    return out


@torch.no_grad()
def self_ensemble(model, lr: torch.Tensor) -> torch.Tensor:
    """x8 geometric self-ensemble: mean of the inverse-transformed outputs (before rounding)."""
    acc = None
    for fwd, inv in _transforms():
        y = inv(model(fwd(lr)))
        acc = y if acc is None else acc + y
    return acc / 8


#: --backend: how the derived network runs (the same numbers up to rounding order)
BACKENDS = {"torch": "stock PyTorch, NCHW", "native": "depthwise convs on the native kernels, NCHW",
            "channels_last": "stock PyTorch in channels-last (NHWC) memory format",
            "fused": "oneDNN convolutions with fused activations and residuals, channels-last, "
                     "no concatenations (CPU; hdnas.infer.fused)",
            "auto": "fused on a CPU (the fastest measured there), else torch"}


def pick_device(name: str = "auto") -> torch.device:
    """``name`` as a torch device; ``auto``: cuda if this torch has a CUDA device, else cpu.
    ValueError for a name torch does not know or a CUDA device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such CUDA device here")
    return device


def inference_runner(model: DerivedNet, fused: bool = True) -> torch.nn.Module:
    """The module that runs ``model`` for inference, the model left as it is: with ``fused``, a
    ``FusedInference`` around it (the fused oneDNN path for fp32 CPU inputs without autograd or
    autocast, ``model`` itself elsewhere; it keeps its packed weights between calls, re-made when
    a parameter changes); without, ``model``."""
    return FusedInference(model) if fused else model


def prepare_model(model: DerivedNet, backend: str, device) -> torch.nn.Module:
    """``model`` set up for inference with ``backend`` (see BACKENDS), on ``device``: the
    network itself, or a ``FusedInference`` around it (which runs the network as is wherever
    it cannot serve, e.g. under autograd)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
    model = model.eval().to(device)
    if backend == "auto":
        backend = "torch" if torch.device(device).type != "cpu" else \
            "fused" if available() else "channels_last"
    if backend == "fused":
        if torch.device(device).type != "cpu" or not available():
            raise ValueError("backend 'fused' needs a CPU device and a torch build with oneDNN "
                             f"(device {device}, oneDNN available: {available()})")
        return inference_runner(
            model.set_depthwise("torch").to(memory_format=torch.contiguous_format))
    if backend == "channels_last":
        return model.set_depthwise("torch").to(memory_format=torch.channels_last)
    return model.set_depthwise(backend).to(memory_format=torch.contiguous_format)


def _memory_format(model) -> torch.memory_format:
    w = next(model.parameters(), None)
    if w is not None and w.dim() == 4 and not w.is_contiguous() \
            and w.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.no_grad()
def super_resolve(model, lr_uint8: torch.Tensor, ensemble: bool = False,
                  device: str = "cpu") -> torch.Tensor:
    """uint8 (3, h, w) LR -> float (3, H, W) SR in 0..255 (not yet rounded). The input takes
    the model's memory format (channels-last after ``prepare_model(..., "channels_last")``)."""
    x = lr_uint8.to(device=device, dtype=torch.float32)[None]
    x = x.contiguous(memory_format=_memory_format(model))
    y = self_ensemble(model, x) if ensemble else model(x)
    return y[0].float().cpu()
