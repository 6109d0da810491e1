"""The searchable op of a cell: the module that holds the candidates (``MixedOp``), and the plain
computation of a mixed op and of a whole distillation step (``PlainSteps``), which is the
method itself: backends (``hdnas.mixed``) compute the same numbers faster and subclass it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hdnas.kernels.checks import check_weight_vector
from hdnas.model.space import LRELU_SLOPE, check_op_set, get_op


class BackendError(ValueError):
    """An unknown backend, or bad input given to a mixed op (``hdnas.mixed`` re-exports it)."""


class MixedOp(nn.Module):
    """The candidates of one searchable op (the release's ``MixedLayer``)."""

    def __init__(self, C: int, op_names):
        super().__init__()
        self.C = C
        self.op_names = check_op_set(op_names)
        self.ops = nn.ModuleList(get_op(n).build(C) for n in self.op_names)

    def forward(self, x, weights, steps: "PlainSteps | None" = None):
        """``sum_k w_k * op_k(x)``, by ``steps`` (a backend; default the plain loop)."""
        if steps is None:
            check_mixed_inputs(x, weights, self)
            steps = PLAIN_STEPS
        return steps.mixed_op(x, weights, self)


def check_mixed_inputs(x, weights, mixed: MixedOp):
    """Clear errors for bad input, before anything reaches a kernel."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise BackendError(f"mixed op input must be a 4-D tensor (N, C, H, W), got "
                           f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise BackendError(f"mixed op input must be floating point, got {x.dtype}")
    if x.shape[1] != mixed.C:
        raise BackendError(f"mixed op expects {mixed.C} channels, got {x.shape[1]}")
    check_weight_vector(weights, len(mixed.ops), "mixed op weights", BackendError)
    if weights.device != x.device:
        raise BackendError(f"weights on {weights.device} but input on {x.device}")
    p = next(mixed.parameters(), None)
    if p is not None and p.device != x.device:
        raise BackendError(f"op parameters on {p.device} but input on {x.device}")


class PlainSteps:
    """How the searchable parts of a cell are computed: the plain per-op loop. A backend
    overrides ``mixed_op`` and may override ``distill_step`` (to share the read of ``x`` between
    the distilled 1x1 branch and the mixed op) and ``fuse_concat``."""

    def mixed_op(self, x, weights, mixed: MixedOp):
        """sum_k w_k * op_k(x), one op at a time."""
        return sum(w * op(x) for w, op in zip(weights, mixed.ops))

    def distill_step(self, x, weights, mixed: MixedOp, distill: nn.Conv2d):
        """One distillation step: (lrelu(c_d(x)), lrelu(mixed(x) + x))."""
        d = F.leaky_relu(distill(x), LRELU_SLOPE)
        r = F.leaky_relu(self.mixed_op(x, weights, mixed) + x, LRELU_SLOPE)
        return d, r

    def fuse_concat(self, parts, fuse: nn.Conv2d):
        """``fuse(cat(parts, 1))``: the cell's 1x1 fuse over its distilled parts and r4."""
        return fuse(torch.cat(parts, dim=1))


PLAIN_STEPS = PlainSteps()
