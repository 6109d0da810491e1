"""The backend contract, the MixedOp module that holds the candidates, and the registry."""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from hdnas.space import check_op_set, get_op

log = logging.getLogger("hdnas")

LRELU_SLOPE = 0.05


class BackendError(ValueError):
    """An unknown backend, or bad input given to one."""


class MixedOp(nn.Module):
    """The candidates of one searchable op (the release's ``MixedLayer``)."""

    def __init__(self, C: int, op_names):
        super().__init__()
        self.C = C
        self.op_names = check_op_set(op_names)
        self.ops = nn.ModuleList(get_op(n).build(C) for n in self.op_names)

    def forward(self, x, weights, backend: "Backend | None" = None):
        return (backend or get_backend("reference")).mixed_op(x, weights, self)


class Backend:
    """Base backend. Subclasses override ``mixed_op`` and may override ``distill_step`` to share
    the read of ``x`` between the distilled 1x1 branch and the mixed op."""

    name = "base"
    #: higher is preferred by ``--fused`` / "auto"
    priority = 0
    fused = False

    def unsupported_reason(self, op_names, device: torch.device, dtype: torch.dtype) -> str | None:
        """None if this backend can compute the op set on (device, dtype), else why not."""
        return None

    def require(self, op_names: tuple, device: torch.device, dtype: torch.dtype) -> None:
        """Raise BackendError if ``unsupported_reason`` says why this backend cannot serve.
        The answer is computed once per (op set, device, dtype) value and then reused, so the
        hot path pays one dict lookup instead of the full check."""
        key = (op_names, device, dtype)
        try:
            why = self._supported[key]
        except AttributeError:
            self._supported = {}
            why = self._supported[key] = self.unsupported_reason(tuple(op_names), device, dtype)
        except KeyError:
            why = self._supported[key] = self.unsupported_reason(tuple(op_names), device, dtype)
        if why is not None:
            raise BackendError(f"backend {self.name!r} cannot compute this mixed op: {why}")

    def mixed_op(self, x, weights, mixed: MixedOp):
        raise NotImplementedError

    def distill_step(self, x, weights, mixed: MixedOp, distill: nn.Conv2d):
        """One distillation step: (lrelu(c_d(x)), lrelu(mixed(x) + x))."""
        d = F.leaky_relu(distill(x), LRELU_SLOPE)
        r = F.leaky_relu(self.mixed_op(x, weights, mixed) + x, LRELU_SLOPE)
        return d, r

    def fuse_concat(self, parts, fuse: nn.Conv2d):
        """``fuse(cat(parts, 1))``: the cell's 1x1 fuse over its distilled parts and r4."""
        return fuse(torch.cat(parts, dim=1))

    def __repr__(self):
        return f"<backend {self.name}>"


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def available_backends() -> list[str]:
    return sorted(_REGISTRY, key=lambda n: -_REGISTRY[n].priority)


def get_backend(name: str) -> Backend:
    _load_optional_backends()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(available_backends())}"
                           " (or 'fused' for the fastest fused one)") from None


def _load_optional_backends():
    """Import the backends that need optional packages (triton, the native extension)."""
    for mod in ("hdnas.mixed.triton_backend", "hdnas.mixed.native"):
        try:
            __import__(mod)
        except ImportError as e:  # missing module or missing optional dependency
            log.debug("backend module %s not loaded: %s", mod, e)


def resolve_backend(name: str, device, dtype, op_names) -> Backend:
    """The backend to use. ``name`` is a backend name or 'fused' (fastest fused one that serves
    this device/dtype/op set). A named backend that cannot serve falls back with one warning."""
    _load_optional_backends()
    device = torch.device(device)
    op_names = tuple(op_names)
    if name == "fused":
        candidates = [b for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority) if b.fused]
    else:
        candidates = [get_backend(name)]
    reasons = []
    for b in candidates:
        why = b.unsupported_reason(op_names, device, dtype)
        if why is None:
            return b
        reasons.append(f"{b.name}: {why}")
    ref = _REGISTRY["reference"]
    warnings.warn(f"backend {name!r} cannot serve {device.type}/{dtype}: {'; '.join(reasons)}; "
                  f"falling back to {ref.name!r}", RuntimeWarning, stacklevel=2)
    return ref


def amp_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The low-precision dtype that ``torch.autocast`` would cast ``x`` to here, or None.

    Autocast casts floating tensors other than fp64 for its lower-precision ops (conv2d,
    matmul), so under an enabled autocast region for ``x``'s device a mixed op computed with
    those ops stores its activations in that dtype. Fused backends follow the same policy
    explicitly (docs/kernels.md §5, dtype policy)."""
    dev = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def check_mixed_inputs(x, weights, mixed: MixedOp):
    """Clear errors for bad input, before anything reaches a kernel."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise BackendError(f"mixed op input must be a 4-D tensor (N, C, H, W), got "
                           f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise BackendError(f"mixed op input must be floating point, got {x.dtype}")
    if x.shape[1] != mixed.C:
        raise BackendError(f"mixed op expects {mixed.C} channels, got {x.shape[1]}")
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or weights.numel() != len(mixed.ops):
        raise BackendError(f"mixed op weights must be a vector of {len(mixed.ops)} entries (one per "
                           f"candidate), got shape {tuple(getattr(weights, 'shape', ()))}")
    if weights.device != x.device:
        raise BackendError(f"weights on {weights.device} but input on {x.device}")
    p = next(mixed.parameters(), None)
    if p is not None and p.device != x.device:
        raise BackendError(f"op parameters on {p.device} but input on {x.device}")
