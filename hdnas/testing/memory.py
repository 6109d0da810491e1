"""What autograd keeps for backward: ``saved_bytes`` (the memory tests of hdnas.darts'
recompute and bench/bench_darts.py's ``saved_mb``)."""
from __future__ import annotations

import torch


def saved_bytes(fn) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves while ``fn()`` runs."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            seen[(st.data_ptr(), t.device)] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
