"""Where a search launches the Triton depthwise kernels: the slot sizes of every launch site of
a DLSR or a DARTS search, computed by the code that launches them (the mixed op's ``Plan``), so
the ahead-of-time compile matrix (``python -m hdnas.kernels.aot``) cannot drift from it."""
from __future__ import annotations

from hdnas.kernels.stencil import union_layout
from hdnas.mixed.merged import plan_of
from hdnas.model.space import DLSR_PRIMITIVES

#: The depthwise candidates of a DARTS search space (at stride 1, where the Triton kernels run).
DARTS_DW_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


def dw_launch_sites() -> list[tuple[str, int, bool, bool]]:
    """(use, KMAX, relu_input, shared_input) of every depthwise launch of a DLSR or DARTS
    search, with the slot sizes computed by the code that launches them."""
    sites = []
    for name, ops in (("DLSR", DLSR_PRIMITIVES), ("DARTS", DARTS_DW_OPS)):
        plan = plan_of(ops)
        sites.append((f"{name} stage 1 (grouped_dw)", plan.st1_kmax, True, True))
        sites.append((f"{name} stage 2 (grouped_dw)", plan.st2_kmax, True, False))
    plan = plan_of(DARTS_DW_OPS)
    S = union_layout(plan.st1_ksizes, plan.st1_dils, plan.st1_kmax, False)[0]
    sites.append(("DARTS mixed_dw", S, True, True))
    return sites


def aot_configs(scope: str = "search"):
    """``hdnas.kernels.aot.configs`` over these launch sites."""
    from hdnas.kernels import aot  # noqa: PLC0415  (aot needs Triton, an optional dependency)

    return aot.configs(dw_launch_sites(), scope)
