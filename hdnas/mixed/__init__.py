"""Mixed-op backends: one interface, one registry.

A backend computes, for one mixed op, ``y = sum_k w_k * op_k(x)`` (``mixed_op``) and one whole
distillation step of the cell (``distill_step``), with autograd gradients for the input, the op
parameters and ``w``. The weights ``w`` arrive already normalised (softmax, sigmoid, one-hot...).
``resolve_backend`` picks a backend by name for a (device, dtype, op set), falling back with one
warning when the named backend cannot serve it.
"""
from hdnas.mixed.base import (Backend, BackendError, MixedOp, available_backends, get_backend,
                              register_backend, resolve_backend)
from hdnas.mixed import reference as _reference  # noqa: F401  (registers "reference")
from hdnas.mixed import merged as _merged  # noqa: F401  (registers "merged")

__all__ = ["Backend", "BackendError", "MixedOp", "available_backends", "get_backend",
           "register_backend", "resolve_backend"]
