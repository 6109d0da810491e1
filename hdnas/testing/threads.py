"""Run a computation on several intra-op thread counts (tests of kernels whose results must not
depend on how their work is split over threads)."""
from __future__ import annotations

import torch


def on_threads(run, counts=(1, 2, 1)):
    """``[run() for each count in counts]``, each with ``torch.set_num_threads(count)``; the
    caller's thread count is restored afterwards."""
    old = torch.get_num_threads()
    outs = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            outs.append(run())
    finally:
        torch.set_num_threads(old)
    return outs


def assert_same_on_threads(run, counts=(1, 2, 1)):
    """``run()`` returns a tensor or a sequence of tensors: all bit-identical over ``counts``."""
    outs = [[o] if isinstance(o, torch.Tensor) else list(o) for o in on_threads(run, counts)]
    for o in outs[1:]:
        assert len(o) == len(outs[0]) and all(torch.equal(p, q) for p, q in zip(o, outs[0])), \
            f"results differ between thread counts {counts}"
