"""The DARTS CNN candidate operations as plain PyTorch modules (the reference twins).

Written from the published DARTS description (Liu et al., ICLR 2019; names and module layouts of
quark0/darts ``cnn/operations.py`` and ``cnn/model_search.py``, docs/method.md §9). The module
structure is kept exactly, so that a DARTS model's state dict loads into these by name:

* ``SepConv.op``  = Sequential(ReLU, Conv dw k (stride s), Conv pw, BN, ReLU, Conv dw k, Conv pw, BN)
* ``DilConv.op``  = Sequential(ReLU, Conv dw k dilation d (stride s), Conv pw, BN)
* ``ReLUConvBN.op`` = Sequential(ReLU, Conv, BN)
* ``FactorizedReduce``: ``relu``, ``conv_1``/``conv_2`` (1x1, stride 2; conv_2 reads
  x[:, :, 1:, 1:]), ``bn`` over the concatenation
* ``Zero(stride)``: ``x * 0`` (subsampled at stride 2); ``Identity``
* pools in a search cell: Sequential(pool, BatchNorm2d(C, affine=False)); the average pool does not
  count the padding.

Every convolution has no bias, every ReLU is out of place (as in DARTS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from hdnas.registry import Registry

#: The DARTS search space (``cnn/genotypes.py``).
PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
              "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


class ReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding, dilation=dilation,
                      groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class SepConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding, groups=C_in,
                      bias=False),
            nn.Conv2d(C_in, C_in, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=1, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.)
        return x[:, :, ::self.stride, ::self.stride].mul(0.)


class FactorizedReduce(nn.Module):
    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        out = torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1)
        return self.bn(out)


@dataclass(frozen=True)
class DartsOpSpec:
    """One DARTS candidate: its constructor ``build(C, stride, affine)`` (calling the spec calls
    it, as DARTS' ``OPS[name](C, stride, affine)``) and the structure the fused path plans by
    (``hdnas.mixed.plan.Plan``): ``family`` 'sep', 'dil', 'skip', 'max_pool', 'avg_pool' or
    'none', depthwise ``kernel`` and ``dilation``."""

    name: str
    family: str
    kernel: int
    dilation: int
    build: Callable

    def __call__(self, C, stride, affine):
        return self.build(C, stride, affine)


#: The DARTS candidates by name (one ``Registry``: a name registered twice is an error).
OPS: Registry[DartsOpSpec] = Registry("DARTS primitive", ValueError)


def _op(name, family, kernel, dilation, build):
    OPS.register(name, DartsOpSpec(name, family, kernel, dilation, build))


_op("none", "none", 0, 1, lambda C, stride, affine: Zero(stride))
_op("avg_pool_3x3", "avg_pool", 3, 1,
    lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False))
_op("max_pool_3x3", "max_pool", 3, 1,
    lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1))
_op("skip_connect", "skip", 0, 1, lambda C, stride, affine: (
    Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine)))
for _k in (3, 5, 7):
    _op(f"sep_conv_{_k}x{_k}", "sep", _k, 1,
        lambda C, stride, affine, k=_k: SepConv(C, C, k, stride, k // 2, affine=affine))
for _k in (3, 5):
    _op(f"dil_conv_{_k}x{_k}", "dil", _k, 2,
        lambda C, stride, affine, k=_k: DilConv(C, C, k, stride, 2 * (k // 2), 2, affine=affine))
#: The families the fused DARTS path computes.
DARTS_FAMILIES = ("sep", "dil", "skip", "max_pool", "avg_pool", "none")


def check_primitives(primitives) -> tuple:
    """The candidate names as a tuple; a clear error for an unknown name or an empty set."""
    if isinstance(primitives, str):
        raise ValueError(f"primitives must be a sequence of op names, got the string {primitives!r}")
    names = tuple(primitives)
    if not names:
        raise ValueError("a mixed op needs at least one candidate primitive")
    bad = [n for n in names if n not in OPS]
    if bad:
        raise ValueError(f"unknown primitive(s) {bad}; known: {', '.join(OPS)}")
    return names


def check_stride(stride) -> int:
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2 (DARTS normal/reduction edges), got {stride!r}")
    return int(stride)


def build_candidates(C: int, stride: int, primitives=PRIMITIVES, affine: bool = False) -> nn.ModuleList:
    """The ``_ops`` ModuleList of a DARTS search MixedOp: each pool followed by a non-affine BN."""
    ops = nn.ModuleList()
    for name in check_primitives(primitives):
        op = OPS[name](C, stride, affine)
        if "pool" in name:
            op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
        ops.append(op)
    return ops


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """PC-DARTS' channel shuffle: (N, g, C/g, H, W) -> transpose -> (N, C, H, W)."""
    N, C, H, W = x.shape
    return x.view(N, groups, C // groups, H, W).transpose(1, 2).contiguous().view(N, C, H, W)


class PlainMixedOp(nn.Module):
    """DARTS' search ``MixedOp`` exactly: ``sum(w * op(x) for w, op in zip(weights, _ops))``.

    ``partial_k > 1`` gives PC-DARTS' MixedOp: the candidates are built on C // k channels, run on
    the first C // k channels of x, the rest passes through (max-pooled 2x2 at stride 2), and the
    concatenation is channel-shuffled with k groups. ``forward_gdas`` is GDAS' form
    ``_ops[index](x) * weights[index]`` (only the chosen candidate is run)."""

    def __init__(self, C: int, stride: int, primitives=PRIMITIVES, partial_k: int = 1):
        super().__init__()
        if partial_k < 1 or C % partial_k:
            raise ValueError(f"C={C} channels are not divisible by the PC-DARTS partial-channel "
                             f"factor K={partial_k}")
        self.partial_k = partial_k
        self._ops = build_candidates(C // partial_k, check_stride(stride), primitives)
        if partial_k > 1:
            self.mp = nn.MaxPool2d(2, 2)

    def forward(self, x, weights):
        if self.partial_k == 1:
            return sum(w * op(x) for w, op in zip(weights, self._ops))
        d = x.shape[1] // self.partial_k
        xa, xb = x[:, :d], x[:, d:]
        y = sum(w * op(xa) for w, op in zip(weights, self._ops))
        if y.shape[2] != x.shape[2]:
            xb = self.mp(xb)
        return channel_shuffle(torch.cat([y, xb], dim=1), self.partial_k)

    def forward_gdas(self, x, weights, index: int):
        return self._ops[index](x) * weights[index]


# ---------------------------------------------------------------------------------------------
# Recognising the candidate layouts of an existing DARTS-style MixedOp (hdnas.darts.patch)

class NotRecognised(ValueError):
    """A module that is not one of the DARTS candidate layouts above."""


def _is_conv(m, cin, cout, k, stride, padding, dilation, groups) -> bool:
    return (type(m) is nn.Conv2d and m.bias is None and m.in_channels == cin
            and m.out_channels == cout and m.kernel_size == (k, k) and m.stride == (stride, stride)
            and m.padding == (padding, padding) and m.dilation == (dilation, dilation)
            and m.groups == groups and m.padding_mode == "zeros")


def _is_bn(m, C) -> bool:
    return isinstance(m, nn.BatchNorm2d) and type(m) is not nn.SyncBatchNorm and m.num_features == C


def _is_relu(m, inplace_ok: bool) -> bool:
    return type(m) is nn.ReLU and (inplace_ok or not m.inplace)


def _dw_params(m):
    """(C, k, stride, dilation) of a depthwise conv, or None."""
    if type(m) is not nn.Conv2d or m.groups != m.in_channels or m.out_channels != m.in_channels:
        return None
    k = m.kernel_size[0]
    if m.kernel_size != (k, k) or k % 2 == 0 or m.stride[0] != m.stride[1]:
        return None
    d = m.dilation[0]
    if not _is_conv(m, m.in_channels, m.in_channels, k, m.stride[0], d * (k // 2), d, m.in_channels):
        return None
    return m.in_channels, k, m.stride[0], d


def identify_candidate(op: nn.Module):
    """(primitive name, stride, channels or None) of a DARTS search candidate module, matched by
    its module structure (not its class); raises NotRecognised saying why not."""
    kind = type(op).__name__
    params = list(op.parameters(recurse=True))
    if kind == "Zero" and not params and not list(op.buffers()) and hasattr(op, "stride"):
        return "none", int(op.stride), None
    if isinstance(op, nn.Identity) or (kind == "Identity" and not params and not list(op.children())):
        return "skip_connect", 1, None
    if all(hasattr(op, a) for a in ("conv_1", "conv_2", "bn")):
        C = op.bn.num_features
        c1, c2 = op.conv_1, op.conv_2
        if (type(c1) is nn.Conv2d and _is_conv(c1, c1.in_channels, C // 2, 1, 2, 0, 1, 1)
                and _is_conv(c2, c1.in_channels, C // 2, 1, 2, 0, 1, 1) and c1.in_channels == C
                and _is_bn(op.bn, C) and _is_relu(getattr(op, "relu", nn.ReLU()), False)):
            return "skip_connect", 2, C
        raise NotRecognised(f"{kind} has conv_1/conv_2/bn but not FactorizedReduce(C, C)'s layout")
    if isinstance(op, nn.Sequential) and len(op) == 2 and isinstance(op[0], (nn.MaxPool2d, nn.AvgPool2d)):
        pool, bn = op[0], op[1]
        s = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
        same = (pool.kernel_size in (3, (3, 3)) and pool.padding in (1, (1, 1))
                and pool.stride in (s, (s, s)) and not pool.ceil_mode)
        if isinstance(bn, nn.BatchNorm2d) and same:
            if isinstance(pool, nn.MaxPool2d) and pool.dilation in (1, (1, 1)) and not pool.return_indices:
                return "max_pool_3x3", s, bn.num_features
            if (isinstance(pool, nn.AvgPool2d) and not pool.count_include_pad
                    and pool.divisor_override is None):
                return "avg_pool_3x3", s, bn.num_features
        raise NotRecognised(f"pool candidate {op} is not a DARTS 3x3 pool (padding 1, "
                            "count_include_pad=False for the average) followed by BatchNorm2d")
    seq = getattr(op, "op", None)
    if isinstance(seq, nn.Sequential) and len(seq) in (4, 8):
        dw = _dw_params(seq[1])
        if dw is not None:
            C, k, s, d = dw
            if len(seq) == 8 and d == 1:
                dw2 = _dw_params(seq[5])
                if (_is_relu(seq[0], False) and _is_relu(seq[4], True)
                        and _is_conv(seq[2], C, C, 1, 1, 0, 1, 1) and _is_bn(seq[3], C)
                        and dw2 == (C, k, 1, 1) and _is_conv(seq[6], C, C, 1, 1, 0, 1, 1)
                        and _is_bn(seq[7], C)):
                    name = f"sep_conv_{k}x{k}"
                    if name in OPS:
                        return name, s, C
            if (len(seq) == 4 and d == 2 and _is_relu(seq[0], False)
                    and _is_conv(seq[2], C, C, 1, 1, 0, 1, 1) and _is_bn(seq[3], C)):
                name = f"dil_conv_{k}x{k}"
                if name in OPS:
                    return name, s, C
        raise NotRecognised(f"{kind}.op is not the SepConv (ReLU, dw, pw, BN, ReLU, dw, pw, BN) or "
                            "DilConv (ReLU, dw dilation 2, pw, BN) layout of a DARTS op with C_in == C_out")
    raise NotRecognised(f"{kind} is not a DARTS candidate layout")
