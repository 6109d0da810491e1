"""The argument contracts of the depthwise primitives, checked once for every implementation
(the plain twins in ``hdnas.mixed.primitives``, the Triton kernels, the native kernels). Imports
only torch, so a backend can check arguments without importing Triton."""
from __future__ import annotations

import torch


def check_weight_vector(weights, n: int, what: str = "weights", error: type = ValueError,
                        detail: str = "") -> None:
    """``weights`` must be a 1-D tensor of ``n`` entries (one per candidate / kernel group)."""
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or weights.numel() != n:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise error(f"{what} must be a vector of {n} entries (one per candidate{detail}), "
                    f"got {got}")


def check_input(x, where: str = "") -> None:
    """``x`` is a floating-point (N, C, H, W) tensor (``where``: a prefix for the message)."""
    if x.dim() != 4:
        raise ValueError(f"{where}input must be (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{where}input must be floating point, got {x.dtype}")


def check_input_matches(x, kernels, shared_input, where: str = "") -> None:
    """``x`` has the channels of ``kernels`` (G, C, ...) (C shared by all groups, else G*C) and
    their device and dtype."""
    G, C = kernels.shape[:2]
    want = C if shared_input else G * C
    if x.shape[1] != want:
        raise ValueError(f"{where}input has {x.shape[1]} channels, expected {want}")
    if kernels.device != x.device or kernels.dtype != x.dtype:
        raise ValueError(f"{where}kernels ({kernels.device}, {kernels.dtype}) and input "
                         f"({x.device}, {x.dtype}) differ in device or dtype")


def check_dw_args(x, kernels, ksizes, dilations, shared_input, weights=None):
    """Clear errors before a kernel sees bad arguments: ``x`` (N, C or G*C, H, W) floating,
    ``kernels`` (G, C, KMAX, KMAX) on x's device and dtype, one odd size <= KMAX and one
    dilation >= 1 per group; ``weights`` (mixed_dw) a vector of G."""
    check_input(x)
    if kernels.dim() != 4 or kernels.shape[-1] != kernels.shape[-2]:
        raise ValueError(f"kernels must be (G, C, KMAX, KMAX), got {tuple(kernels.shape)}")
    G, C = kernels.shape[:2]
    if len(ksizes) != G or len(dilations) != G:
        raise ValueError(f"{G} kernel groups but {len(ksizes)} ksizes and {len(dilations)} dilations")
    for k, d in zip(ksizes, dilations):
        if k % 2 == 0 or not 1 <= k <= kernels.shape[-1] or d < 1:
            raise ValueError(f"kernel size {k} (must be odd, <= {kernels.shape[-1]}), dilation {d}")
    check_input_matches(x, kernels, shared_input)
    if weights is not None:
        check_weight_vector(weights, G, detail=" kernel group")
