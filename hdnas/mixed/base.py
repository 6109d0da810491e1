"""The backend contract, the registry of backends and the choice among them. The module that holds
the candidates (``MixedOp``) and the plain computation a backend speeds up (``PlainSteps``) are the
model's (``hdnas.model.mixed_op``)."""
from __future__ import annotations

import logging
import warnings

import torch

from hdnas.model.mixed_op import BackendError, MixedOp, PlainSteps, check_mixed_inputs
from hdnas.registry import Registry

log = logging.getLogger("hdnas")


class Backend(PlainSteps):
    """Base backend: the model's plain steps (``PlainSteps``) plus a name, a priority and what it
    can serve. Subclasses override ``mixed_op`` and may override ``distill_step`` to share the
    read of ``x`` between the distilled 1x1 branch and the mixed op."""

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

    def __repr__(self):
        return f"<backend {self.name}>"


#: Every backend by name (one ``Registry``: a second backend of the same name is an error).
BACKENDS: Registry[Backend] = Registry("backend", BackendError)


def register_backend(backend: Backend) -> Backend:
    return BACKENDS.register(backend.name, backend)


def available_backends() -> list[str]:
    return sorted(BACKENDS, key=lambda n: -BACKENDS[n].priority)


def get_backend(name: str) -> Backend:
    _load_optional_backends()
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(available_backends())}"
                           " (or 'fused' for the fastest fused one)")
    return BACKENDS[name]


def _load_optional_backends():
    """Import the backends that need optional packages (triton, the native extension)."""
    for mod in ("hdnas.mixed.triton_backend", "hdnas.mixed.native"):
        try:
            __import__(mod)
        except ImportError as e:  # missing module or missing optional dependency
            log.debug("backend module %s not loaded: %s", mod, e)


def resolve_backend(name: str, device, dtype, op_names) -> Backend:
    """The backend to use for a DLSR op set. ``name`` is a backend name, or 'auto' / 'fused':
    the highest-priority fused backend that serves this device/dtype/op set (every fused backend
    is proven exact against the reference by the conformance suite; on a CPU that is 'native'
    when the extension is built, else 'merged'; on a GPU 'triton'). A named backend that cannot
    serve falls back to 'reference' with one warning."""
    op_names = tuple(op_names)
    return resolve(name, device, dtype, lambda b, dev: b.unsupported_reason(op_names, dev, dtype))


def resolve(name: str, device, dtype, reason, fallback: str = "reference",
            stacklevel: int = 3) -> Backend:
    """The one resolver: backend ``name``, or for 'fused' the highest-priority fused backend,
    for which ``reason(backend, device)`` is None (it says why a backend cannot serve the
    caller's case); otherwise the ``fallback`` backend, with one warning naming every reason."""
    _load_optional_backends()
    device = torch.device(device)
    if name in ("fused", "auto"):
        candidates = [b for b in sorted(BACKENDS.values(), key=lambda b: -b.priority) if b.fused]
    else:
        candidates = [get_backend(name)]
    reasons = []
    for b in candidates:
        why = reason(b, device)
        if why is None:
            return b
        reasons.append(f"{b.name}: {why}")
    fb = BACKENDS[fallback]
    warnings.warn(f"backend {name!r} cannot serve {device.type}/{dtype}: {'; '.join(reasons)}; "
                  f"falling back to {fb.name!r}", RuntimeWarning, stacklevel=stacklevel)
    return fb


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
