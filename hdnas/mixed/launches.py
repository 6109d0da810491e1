"""Where a fused composition launches the Triton depthwise kernels: the slot sizes of each launch
site, computed from the composition's ``Plan`` (the same object the launches read), so the
ahead-of-time compile matrix (``python -m hdnas.kernels.aot``; the sites of both searches are
gathered in ``hdnas.darts.launches``) cannot drift from what runs."""
from __future__ import annotations

from hdnas.kernels.stencil import union_layout
from hdnas.mixed.plan import Plan


def plan_sites(name: str, plan: Plan) -> list[tuple[str, int, bool, bool]]:
    """(use, KMAX, relu_input, shared_input) of the two ``grouped_dw`` launches of ``plan``:
    stage 1 (one shared read of x, ReLU on read) and stage 2 (per-group input)."""
    return [(f"{name} stage 1 (grouped_dw)", plan.st1_kmax, True, True),
            (f"{name} stage 2 (grouped_dw)", plan.st2_kmax, True, False)]


def union_site(name: str, plan: Plan) -> tuple[str, int, bool, bool]:
    """The ``mixed_dw`` launch over ``plan``'s stage 1: one union kernel spanning the full
    dilated extent (dilation is applied inside ``grouped_dw``, so its slots stay k wide)."""
    S = union_layout(plan.st1_ksizes, plan.st1_dils, plan.st1_kmax, False)[0]
    return (f"{name} mixed_dw", S, True, True)
