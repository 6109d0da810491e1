"""The reference backend: the plain per-op loop, exactly as the method (and the release) does it."""
from __future__ import annotations

from hdnas.mixed.base import Backend, MixedOp, check_mixed_inputs, register_backend
from hdnas.model.mixed_op import PLAIN_STEPS


def mixed_op_ref(x, weights, mixed: MixedOp):
    """sum_k w_k * op_k(x), one op at a time (the model's plain loop, after the input checks)."""
    check_mixed_inputs(x, weights, mixed)
    return PLAIN_STEPS.mixed_op(x, weights, mixed)


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0

    def mixed_op(self, x, weights, mixed):
        return mixed_op_ref(x, weights, mixed)


register_backend(ReferenceBackend())
