"""Depthwise primitives that fused backends implement, each with its plain PyTorch twin.

Kernels of one call are stacked as ``kernels[G, C, KMAX, KMAX]``: group g's real kernel is
``ksizes[g]`` wide (odd) and sits centred, zero-padded, in the KMAX x KMAX slot; its dilation is
``dilations[g]`` and its padding ``dilations[g] * (ksizes[g] // 2)`` ('same' output size).

* ``grouped_dw``: y[:, g*C:(g+1)*C] = dwconv(act(x_g), kernel g), with x_g = x when
  ``shared_input`` (one read of x feeds every group: the first stage of the sep/dil candidates)
  or x[:, g*C:(g+1)*C] otherwise (the second stage of the sep candidates).
* ``mixed_dw``: y = sum_g weights[g] * dwconv(act(x), kernel g) (+ ``skip_weight * x``): the
  general fused mixed depthwise op, usable outside DLSR (DARTS-style sets with skip).

``act`` is ReLU when ``relu_input`` else identity. Backends register a ``Primitives`` object;
the composition around them (hdnas.mixed.merged) is shared, so backends differ only here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hdnas.kernels.checks import check_dw_args
from hdnas.mixed.dense import conv_same


def _kernel(kernels, g, k):
    kmax = kernels.shape[-1]
    o = (kmax - k) // 2
    return kernels[g, :, o:o + k, o:o + k].unsqueeze(1)  # (C, 1, k, k)


def _grouped_convs(x, kernels, ksizes, dilations, relu_input, shared_input, stride):
    check_dw_args(x, kernels, ksizes, dilations, shared_input)
    G, C = kernels.shape[:2]
    xa = F.relu(x) if relu_input else x
    outs = []
    for g, (k, d) in enumerate(zip(ksizes, dilations)):
        xg = xa if shared_input else xa[:, g * C:(g + 1) * C]
        outs.append(F.conv2d(xg, _kernel(kernels, g, k), stride=stride, padding=d * (k // 2),
                             dilation=d, groups=C))
    return torch.cat(outs, dim=1)


def grouped_dw_ref(x, kernels, ksizes, dilations, relu_input: bool, shared_input: bool):
    return _grouped_convs(x, kernels, ksizes, dilations, relu_input, shared_input, 1)


def grouped_dw_s2_ref(x, kernels, ksizes, dilations, relu_input: bool, shared_input: bool):
    """The twin of ``Primitives.grouped_dw_s2``: ``grouped_dw_ref`` at stride 2, i.e. its output
    pixels (2h, 2w) (strided convs with the same 'same' padding)."""
    return _grouped_convs(x, kernels, ksizes, dilations, relu_input, shared_input, 2)


def mixed_dw_ref(x, weights, kernels, ksizes, dilations, relu_input: bool, skip_weight=None):
    check_dw_args(x, kernels, ksizes, dilations, True, weights)
    y = grouped_dw_ref(x, kernels, ksizes, dilations, relu_input, True)
    N, _, H, W = y.shape
    G, C = kernels.shape[:2]
    y = (y.view(N, G, C, H, W) * weights.view(1, G, 1, 1, 1)).sum(1)
    if skip_weight is not None:
        y = y + skip_weight * x
    return y


def engine_needs(t) -> bool:
    """Whether the running backward pass will use the gradient of ``t`` (a leaf's included: its
    gradient accumulator is asked). False e.g. for the op kernels in an architecture step,
    ``backward(inputs=arch)``, which needs only the input gradient: ``ctx.needs_input_grad`` only
    says that ``t`` requires grad, and built-in ops skip such gradients, so the backends' custom
    autograd does too. Outside a backward pass and in any doubt: ``t.requires_grad``."""
    if not t.requires_grad:
        return False
    try:
        node = torch.autograd.graph._get_grad_fn_or_grad_acc(t)
        return bool(torch._C._will_engine_execute_node(node))
    except Exception:  # noqa: BLE001 - not in a backward pass, or an API change
        return True


@dataclass(frozen=True)
class Primitives:
    """A set of primitives: two depthwise functions with the signatures of the twins above, and
    the merged dense conv (``dense_conv(x, w)``: 'same' padding, stride 1; twin
    ``hdnas.mixed.dense.conv_same``). The stock set is the twins themselves (PyTorch convs).
    ``batch_stats(x)``: optional, the per-channel (mean, biased variance) of a training-mode
    BatchNorm in float64, or None where it does not serve (twin: ``batch_stats_ref``); None:
    ``F.batch_norm`` computes them. ``max_pool_3x3(x, stride)``: optional, DARTS' 3x3 max pool
    with padding 1, or None where it does not serve (twin: ``max_pool_3x3_ref``).
    ``bn_sum(u, mean64, var64, scale, eps, groups)``: optional, training-mode BNs of channel
    groups with the given batch statistics, scaled per channel and summed over the groups, or
    None where it does not serve (twin: ``bn_sum_ref``). ``pointwise(x, w)``: optional, the
    1x1 convs of channel groups, or None where it does not serve (twin: ``pointwise_ref``).
    ``grouped_dw_s2``: optional, ``grouped_dw`` at stride 2, or None where it does not serve
    (twin: ``grouped_dw_s2_ref``)."""

    name: str = "torch"
    grouped_dw: Callable = grouped_dw_ref
    mixed_dw: Callable = mixed_dw_ref
    dense_conv: Callable = conv_same
    batch_stats: Callable | None = None
    max_pool_3x3: Callable | None = None
    bn_sum: Callable | None = None
    pointwise: Callable | None = None
    grouped_dw_s2: Callable | None = None


def batch_stats_ref(x):
    """The twin of ``Primitives.batch_stats``: (mean, biased variance) of x over (0, 2, 3), fp64."""
    var, mean = torch.var_mean(x.double(), (0, 2, 3), correction=0)
    return mean, var


TORCH_PRIMITIVES = Primitives()


def pointwise_ref(x, w):
    """The twin of ``Primitives.pointwise``: 1x1 convs of channel groups, x (N, G*Ci, H, W) and
    w (G, Co, Ci) -> y (N, G*Co, H, W) with y[:, g*Co + o] = sum_i w[g, o, i] x[:, g*Ci + i]:
    one batched GEMM."""
    N, _, H, W = x.shape
    G, Co, Ci = w.shape
    return torch.matmul(w, x.reshape(N, G, Ci, H * W)).view(N, G * Co, H, W)


def pointwise(prims: Primitives, x, w):
    """``prims.pointwise(x, w)`` where it serves, else its twin."""
    y = None if prims.pointwise is None else prims.pointwise(x, w)
    return pointwise_ref(x, w) if y is None else y


def max_pool_3x3_ref(x, stride: int):
    """The twin of ``Primitives.max_pool_3x3``."""
    return F.max_pool2d(x, 3, stride, 1)


def bn_sum_ref(u, mean64, var64, scale, eps: float, groups: int):
    """The twin of ``Primitives.bn_sum``: ``F.batch_norm`` in training mode over all G*C channels
    (its own batch statistics: ``mean64``/``var64`` must be u's, and are not read), scaled by
    ``scale`` (G*C,), summed over the groups: (N, C, H, W)."""
    N, GC, H, W = u.shape
    y = F.batch_norm(u, None, None, scale.to(u.dtype), None, True, 0.0, eps)
    return y.view(N, groups, GC // groups, H, W).sum(1)
