"""Test setup. TRITON_INTERPRET must be set before any Triton kernel module is imported (the
check happens at decoration time), so it is set here, at collection, when there is no GPU."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
