"""Round-off bounds shared by the conformance tests (tests/mixed/test_conformance.py) and the GPU
checks (``python -m bench.gpu``, bench/gpu_check.py).

``bound_ratio`` is the elementwise bound of a low-precision computation against its fp64 truth:
``|got - truth| <= (depth u + gamma_n(fp32)) * magnitude``, the magnitude being the fp64
reference run on the absolute values of every input, parameter and cotangent (for the linear
and ReLU-like ops of the search space, the sum of the magnitudes of each element's terms).
``max_rel`` and ``norm_rel`` are the max-norm and 2-norm relative errors.
"""
from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24,
                 torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
DEPTH = 16  # roundings along a chain of ops
AUTOCAST_DEPTH = DEPTH + 9  # the reference also rounds each of its <= 9 weighted terms


def bound_ratio(got: torch.Tensor, truth: torch.Tensor, mag: torch.Tensor, u: float, n: int,
                depth: int = DEPTH) -> float:
    """max over elements of |got - truth| / ((depth u + gamma_n(u32)) mag + u 1e-3 max mag):
    <= 1 is the promise of a computation that stores in a dtype of unit round-off ``u`` and
    accumulates length-``n`` dot products in fp32 (Higham's gamma_n = n u32 / (1 - n u32)).
    Where the limit is 0 (every term zero) the element must be exactly right (else inf)."""
    u32 = 2.0 ** -24
    bound = depth * u + n * u32 / (1 - n * u32)
    err = (got.double() - truth.double()).abs()
    mag = mag.double().abs()
    lim = bound * mag + u * 1e-3 * (mag.max() if mag.numel() else 0.0)
    if err.numel() == 0:
        return 0.0
    ratio = torch.where(lim > 0, err / torch.where(lim > 0, lim, torch.ones_like(lim)),
                        torch.where(err > 0, torch.full_like(err, math.inf), torch.zeros_like(err)))
    return float(ratio.max())


def max_rel(got: torch.Tensor, truth: torch.Tensor) -> float:
    """max |got - truth| / max |truth| (0 when both are zero)."""
    scale = truth.double().abs().max() if truth.numel() else torch.tensor(0.0)
    err = (got.double() - truth.double()).abs().max() if got.numel() else torch.tensor(0.0)
    if float(scale) == 0.0:
        return 0.0 if float(err) == 0.0 else math.inf
    return float(err / scale)


def norm_rel(got: list, truth: list) -> float:
    """||got - truth||_2 / ||truth||_2 over a group of tensors taken together."""
    num = sum(float(((g.double() - t.double()) ** 2).sum()) for g, t in zip(got, truth))
    den = sum(float((t.double() ** 2).sum()) for t in truth)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)
