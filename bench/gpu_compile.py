"""The ``torch.compile`` peer in ``python -m bench.gpu`` (a provider of bench/gpu.py: ``PROVIDERS``).

One timed case, ``weight_step compiled``: the DLSR search's weight step (forward, SR loss,
backward into the weights, Adam) with the supernet's forward compiled by ``torch.compile``, for
every bench backend: the ``reference`` row is the obvious peer (the plain per-op loop, compiled),
the fused rows compile around the fused backends' custom ops. Compare its rows with the eager
``search_step`` rows of the same report (their ``weight`` part). The compilation (the first
call, made when the case is built) is timed and written to the report's notes, with the number
of graph breaks Dynamo counted. On a GPU it compiles with inductor; in ``--dry-run`` (CPU, tiny
shapes) with ``aot_eager``, which traces the same graphs without generating code, so the case is
exercised in seconds.
"""
from __future__ import annotations

import time

import torch

from bench.gpu_time import TimeCase, weight_step_of
from hdnas.model.network import SuperNet
from hdnas.model.space import DLSR_PRIMITIVES
from hdnas.nas.losses import SRLoss


def check_cases(plan) -> list:
    return []  # the compiled numbers are the eager ones' (bench/bench_compile.py measures the gap)


def weight_step_case(plan) -> TimeCase:
    cells = plan.step_cells
    compiler = "aot_eager" if plan.kind == "dry-run" else "inductor"

    def build(backend, shape, device, dtype):
        N, C, H, W = shape
        torch.manual_seed(0)
        model = SuperNet(C, cells, 2, DLSR_PRIMITIVES, backend=backend).to(device)
        forward = torch.compile(model, backend=compiler)
        batches, step = weight_step_of(model, forward, SRLoss(0.2), shape, device)
        nb = len(batches)

        torch._dynamo.utils.counters.clear()
        t = time.perf_counter()
        step(batches[0])  # the compilation
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        plan.notes.append(f"torch.compile ({compiler}) of the {backend.name} supernet, "
                          f"{N}x{C}x{H}x{W}, {cells} cells: first weight step (compilation) "
                          f"{time.perf_counter() - t:.1f} s, {breaks} graph break(s)")

        def fn(i, mark):
            step(batches[i % nb])
        return fn

    return TimeCase(f"weight_step compiled ({compiler})", "step", build)


def time_cases(plan) -> list[TimeCase]:
    return [weight_step_case(plan)]
