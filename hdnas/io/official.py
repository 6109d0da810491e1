"""Loading weights into a derived network: hdnas checkpoints and the official DLSR release.

Why strict: a checkpoint that only partly fits gives a network that runs and scores garbage.
Every model tensor must be in the file with the same shape and every file tensor must be used;
otherwise the error names the first offending tensor (in the model's order) and both shapes,
plus what the file's head and tail say about its channels and scale.

Accepted files: ``{'model': sd}`` (hdnas), ``{'state_dict': sd, 'epoch', 'optimizer'}`` (the
DLSR release), a bare state dict, or a pickled ``nn.Module`` (only with ``trust_pickle``). A
``module.`` prefix (DataParallel) is removed. The official layer names equal ours (``hdnas.model.cell``
keeps them), so no renaming is needed. Two genotypes that differ only in their connections have
identical tensor shapes, so that mistake cannot be detected from the file.

Safetensors files (``hdnas.io.weights``: a ``.safetensors`` name or the safetensors header) are
recognised first and need no trust flag: the format holds only tensors and strings. Other files
are read with torch's safe loader (``weights_only=True``); both via ``hdnas.io.checkpoint.load``. The
release's checkpoints are plain dicts of tensors and numbers and load with it. A file it refuses
(a pickled ``nn.Module``, anything naming other Python objects) needs the full unpickler, which
can run code stored in the file: it is only used with ``trust_pickle=True`` (``hdnas.evaluate
--trust-pickle``), otherwise the file is a ``WeightsError`` that says so.

Weights of the wrong kind are refused, not converted: a tensor that is floating point in the
model must be floating point in the file (int8 or bool weights would load silently and give
black images) and finite (NaN or infinity gives NaN scores); the error names the file and the
tensor. ``build_net`` makes a derived network only after estimating its size on the meta device
(no memory) against ``hdnas.io.weights.max_weight_bytes()``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from hdnas.io import checkpoint
from hdnas.io.weights import max_weight_bytes
from hdnas.model.genotype import Genotype
from hdnas.model.network import DerivedNet

__all__ = ["WeightsError", "read_state_dict", "extract_state_dict", "check_state_dict",
           "load_weights", "load_official_checkpoint", "describe_state_dict", "model_bytes",
           "build_net"]


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model."""


def _read(path: Path, trust_pickle: bool = False):
    try:
        return checkpoint.load(path, trust_pickle=trust_pickle,
                               hint="--trust-pickle (trust_pickle=True)")
    except checkpoint.CheckpointError as e:
        raise WeightsError(str(e)) from None


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def extract_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint object."""
    if isinstance(obj, nn.Module):
        sd = obj.state_dict()
    elif isinstance(obj, Mapping) and "model" in obj and _is_state_dict(obj["model"]):
        sd = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and _is_state_dict(obj["state_dict"]):
        sd = obj["state_dict"]
    elif _is_state_dict(obj):
        sd = obj
    else:
        keys = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(f"{source}: no state dict found (expected {{'model': sd}}, "
                           f"{{'state_dict': sd}} or a bare state dict; got {keys})")
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict in a weights file, read safely (see the module docstring):
    safetensors first, then torch's safe loader."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    return extract_state_dict(_read(path, trust_pickle), str(path))


def describe_state_dict(sd) -> str:
    """What the head and tail of a DLSR-style state dict say: channels, scale, cells."""
    parts = []
    w = sd.get("fea_conv.weight")
    if isinstance(w, torch.Tensor) and w.dim() == 4:
        parts.append(f"C={w.shape[0]}")
    u = sd.get("upsampler.0.weight")
    if isinstance(u, torch.Tensor) and u.dim() == 4:
        s = round((u.shape[0] / 3) ** 0.5)
        if 3 * s * s == u.shape[0]:
            parts.append(f"scale={s}")
    cells = {k.split(".")[0] for k in sd if k[:1] == "B" and k.split(".")[0][1:].isdigit()}
    if cells:
        parts.append(f"{len(cells)} cells")
    return ", ".join(parts)


def check_state_dict(model: nn.Module, sd: Mapping, source: str = "checkpoint") -> None:
    """Raise WeightsError naming the first tensor that is missing, extra or of another shape."""
    own = model.state_dict()
    missing, mismatched = [], []
    for k, v in own.items():
        if k not in sd:
            missing.append(k)
        elif tuple(sd[k].shape) != tuple(v.shape):
            mismatched.append(k)
    unexpected = [k for k in sd if k not in own]
    if not (missing or mismatched or unexpected):
        _check_values(own, sd, source)
        return
    first = next(k for k in own if k in missing or k in mismatched) if (missing or mismatched) \
        else unexpected[0]
    if first in mismatched:
        what = (f"first mismatched tensor {first!r}: checkpoint {tuple(sd[first].shape)} vs model "
                f"{tuple(own[first].shape)}")
    elif first in missing:
        what = f"first mismatched tensor {first!r}: missing in checkpoint (model {tuple(own[first].shape)})"
    else:
        what = (f"first mismatched tensor {first!r}: in checkpoint {tuple(sd[first].shape)} but "
                "not in the model")
    arch = getattr(model, "genotype", None)
    desc = describe_state_dict(sd)
    who = ""
    if isinstance(arch, Genotype):
        who = f" ({arch.name or '/'.join(arch.cell_ops[0])}, C={arch.channels}, x{arch.scale})"
    msg = (f"{source} does not fit the model{who}: "
           f"{what}; {len(mismatched)} shape mismatches, {len(missing)} missing, "
           f"{len(unexpected)} unexpected tensors")
    if desc:
        msg += f"; the checkpoint looks like {desc}"
    raise WeightsError(msg)


def _check_values(own: Mapping, sd: Mapping, source: str) -> None:
    """Floating-point model tensors must come as finite floating-point values."""
    for k, v in own.items():
        t = sd[k]
        if not v.is_floating_point():
            continue
        if not t.is_floating_point():
            raise WeightsError(f"{source}: tensor {k!r} is {str(t.dtype).replace('torch.', '')}; "
                               "weights must be floating point")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise WeightsError(f"{source}: tensor {k!r} holds {bad} non-finite value(s) (NaN or "
                               "infinity)")


def model_bytes(genotype: Genotype) -> int:
    """Bytes of the float32 parameters and buffers of ``genotype``'s derived network, counted
    on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        net = DerivedNet(genotype)
    return sum(t.numel() * 4 for t in net.state_dict().values())


def build_net(genotype: Genotype, source: str = "") -> DerivedNet:
    """``DerivedNet(genotype)`` after checking its size against ``max_weight_bytes()``."""
    need, limit = model_bytes(genotype), max_weight_bytes()
    if need > limit:
        raise WeightsError(f"{source + ': ' if source else ''}the network (C={genotype.channels}, "
                           f"{genotype.num_cells} cells) needs {need:,} bytes of weights, more "
                           f"than the limit of {limit:,} (HDNAS_MAX_MODEL_BYTES raises it)")
    return DerivedNet(genotype)


def load_weights(model: nn.Module, weights, source: str | None = None,
                 trust_pickle: bool = False) -> nn.Module:
    """Strictly load a weights file path (or a state dict / checkpoint object) into ``model``."""
    if isinstance(weights, (str, Path)):
        source = source or str(weights)
        sd = read_state_dict(weights, trust_pickle)
    else:
        source = source or "checkpoint"
        sd = extract_state_dict(weights, source)
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True)
    return model


def load_official_checkpoint(path, genotype, trust_pickle: bool = False) -> DerivedNet:
    """A DerivedNet of ``genotype`` (a Genotype, a JSON path or a name such as 'TINY18') with
    the weights of an official DLSR ``.pt``, an hdnas checkpoint or a safetensors file, in eval
    mode."""
    if not isinstance(genotype, Genotype):
        genotype = Genotype.load(genotype)
    model = build_net(genotype, str(genotype.name or ""))
    load_weights(model, path, trust_pickle=trust_pickle)
    return model.eval()
