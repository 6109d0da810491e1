"""Every depthwise launch site of a DLSR or a DARTS search, each from the plan its composition
runs (``hdnas.mixed.plan.plan_of`` for DLSR cells, ``darts_plan`` for DARTS edges): the input of
the ahead-of-time compile matrix (``python -m hdnas.kernels.aot``)."""
from __future__ import annotations

from hdnas.darts.mixed import darts_plan
from hdnas.mixed.launches import plan_sites, union_site
from hdnas.mixed.plan import plan_of
from hdnas.model.space import DLSR_PRIMITIVES

#: The depthwise candidates of a DARTS search space (at stride 1, where the Triton kernels run).
DARTS_DW_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


def dw_launch_sites() -> list[tuple[str, int, bool, bool]]:
    """(use, KMAX, relu_input, shared_input) of every depthwise launch of a DLSR or DARTS
    search, with the slot sizes computed by the code that launches them."""
    darts = darts_plan(DARTS_DW_OPS)
    return (plan_sites("DLSR", plan_of(DLSR_PRIMITIVES)) + plan_sites("DARTS", darts)
            + [union_site("DARTS", darts)])


def aot_configs(scope: str = "search"):
    """``hdnas.kernels.aot.configs`` over these launch sites."""
    from hdnas.kernels import aot  # aot imports Triton, an optional dependency

    return aot.configs(dw_launch_sites(), scope)
