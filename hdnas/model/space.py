"""The search space as data: candidate ops by name, with their structure and cost formulas.

An op set is a tuple of names from ``OPS``. The DLSR set is ``DLSR_PRIMITIVES`` (the order of the
official release, which fixes the column order of alpha). New candidates are added with
``register_op``; fused backends look at ``OpSpec.family`` to decide what they can compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from hdnas.model import ops as _ops
from hdnas.registry import Registry


#: Negative slope of the cell's LeakyReLUs (the release's 0.05); fused backends fold it into
#: their epilogues, so it is part of the op specs they read.
LRELU_SLOPE = 0.05


class SearchSpaceError(ValueError):
    """An op name or op set that the search space does not define."""


@dataclass(frozen=True)
class OpSpec:
    """One candidate op. ``family`` is 'conv' (dense kxk), 'sep' (double separable),
    'dil' (dilated separable) or 'skip'; fused backends rely on it, so keep it truthful."""

    name: str
    family: str
    kernel: int
    dilation: int
    build: Callable[[int], nn.Module]

    def params(self, C: int) -> int:
        """Parameters of this op at C channels (no bias anywhere)."""
        k2 = self.kernel * self.kernel
        if self.family == "conv":
            return k2 * C * C
        if self.family == "sep":
            return 2 * (k2 * C + C * C)
        if self.family == "dil":
            return k2 * C + C * C
        return 0

    def macs_per_pixel(self, C: int) -> int:
        """Multiply-adds per output pixel (stride 1, so equal to the params)."""
        return self.params(C)


OPS: Registry[OpSpec] = Registry("op", SearchSpaceError)


def register_op(spec: OpSpec) -> OpSpec:
    """Add a candidate op; a name already registered is an error."""
    if spec.family not in ("conv", "sep", "dil", "skip"):
        raise SearchSpaceError(f"op {spec.name!r}: unknown family {spec.family!r}")
    return OPS.register(spec.name, spec)


for _k in (1, 3, 5, 7):
    register_op(OpSpec(f"conv_{_k}x{_k}", "conv", _k, 1, lambda C, k=_k: _ops.Conv(C, k)))
for _k in (3, 5, 7):
    register_op(OpSpec(f"sep_conv_{_k}x{_k}", "sep", _k, 1, lambda C, k=_k: _ops.SepConv(C, k)))
for _k in (3, 5):
    register_op(OpSpec(f"dil_conv_{_k}x{_k}", "dil", _k, 2, lambda C, k=_k: _ops.DilConv(C, k, 2)))
register_op(OpSpec("skip_connect", "skip", 0, 1, lambda C: _ops.Identity()))

#: The 9 candidates of DLSR, in the release's order (the columns of alpha).
DLSR_PRIMITIVES: tuple[str, ...] = (
    "conv_1x1", "conv_3x3", "conv_5x5", "conv_7x7",
    "sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7",
    "dil_conv_3x3", "dil_conv_5x5",
)


def get_op(name: str) -> OpSpec:
    return OPS.get(name)


def check_op_set(names) -> tuple[str, ...]:
    """Validate an op set: known names, no duplicates, at least one op."""
    names = tuple(names)
    if not names:
        raise SearchSpaceError("the op set is empty")
    for n in names:
        get_op(n)
    if len(set(names)) != len(names):
        raise SearchSpaceError(f"the op set has duplicates: {names}")
    return names
