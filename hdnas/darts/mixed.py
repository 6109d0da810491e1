"""``hdnas.darts.MixedOp``: DARTS' search mixed op with a fused path and recomputation.

The candidates are the plain modules of ``hdnas.darts.operations`` in DARTS' layout (``_ops.{i}``),
so a DARTS state dict loads by name and ``patch`` can adopt an existing model's modules (and
thereby its parameter objects and BN buffers) unchanged. The fused path reads their parameters
and computes ``sum_k w_k op_k(x)`` as:

1. the first depthwise stage of the sep candidates, and apart that of the dil candidates: at
   stride 1 one ``primitives.grouped_dw`` call each (one read of x, the ReLU applied on read, one
   output group per candidate); at stride 2, with the native CPU primitives: the sep
   candidates by their stride-2 call (``grouped_dw_s2``: only the even output pixels computed),
   the dil candidates (even dilation) on the even-pixel image alone (``_strided_stage1``);
   otherwise one stock strided depthwise conv per candidate on one shared ``relu(x)``;
2. the pointwise convs after it (sep: first pw; dil: its only pw): one grouped 1x1 conv each
   (``primitives.pointwise``: the primitives' own kernel where they have one, native on a CPU;
   else one batched GEMM);
3. the BatchNorms after those: one normalisation over the groups (batch statistics in training
   mode; every module's running statistics and ``num_batches_tracked`` updated as
   ``nn.BatchNorm2d`` does); the dil groups' scaled by their architecture weights ``w_k`` and
   summed in the same pass where the primitives have ``bn_sum`` (native), so only the sum is
   written;
4. the sep candidates' second stage: ``primitives.grouped_dw`` (ReLU on read, per-group input),
   one grouped 1x1 conv, one normalisation with ``w_k`` folded in, summed over the candidates (one
   ``bn_sum`` pass where the primitives have it);
5. pools (the primitives' own max pool where they have one: the native CPU kernel; else on a
   channels-last copy of x on CPU: the same result, several times faster than PyTorch's NCHW
   pool) with their BN (``w_k`` folded in; the BN reads an NCHW tensor, as accurate as the plain
   loop), ``skip_connect`` (``w x``, or FactorizedReduce from the shared ``relu(x)`` with its
   BN: one grouped 1x1 conv over the even and odd pixel phases), ``none`` (contributes exactly 0)
   with stock ops; the sum (its incoming gradient made contiguous once).

``recompute=True`` runs this without an autograd graph and again in backward (``_Recomputed``):
only the op's inputs are kept for backward, every per-candidate intermediate is recomputed there
(running statistics are updated once, in the forward pass; the recomputation normalises with the
batch statistics of the first run, kept, not computed again). ``recompute=False`` keeps the
intermediates (autograd's graph). ``recompute="auto"`` (default) recomputes where the input plane
has more than ``AUTO_RECOMPUTE_ABOVE`` (256) pixels and keeps the intermediates on smaller
planes: there the recomputation's fixed cost per call weighs most against its work, and the
intermediates take the least memory (DARTS' CIFAR search: its 32x32 edges recompute, the 16x16
and 8x8 ones keep; docs/darts.md, "Recomputation", has the measured trade-off).

Backends (``backend=``): 'reference' (the plain per-op loop, DARTS' code), 'merged' (the fused path
over stock PyTorch depthwise convs), 'native' (the C++ CPU / CUDA primitives), 'triton' (the
Triton primitives), 'fused' (the fastest that serves the device: triton on CUDA, then native, then
merged). A named backend that cannot serve the device/dtype falls back to 'merged' with one
warning. Under ``torch.autocast`` the fused path is not used (the plain loop runs).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from hdnas.darts.batchnorm import RunState as _RunState
from hdnas.darts.batchnorm import group_batch_norm, group_batch_norm_sum
from hdnas.darts.operations import (DARTS_FAMILIES, OPS, PRIMITIVES, NotRecognised,
                                    build_candidates, channel_shuffle, check_primitives,
                                    check_stride, identify_candidate)
from hdnas.kernels.checks import check_weight_vector
from hdnas.mixed.base import BackendError, get_backend, resolve
from hdnas.mixed.merged import DecomposedBackend
from hdnas.mixed.plan import Plan, pad_to
from hdnas.mixed.primitives import engine_needs, pointwise

BACKENDS = ("reference", "merged", "native", "triton", "fused")
#: ``recompute="auto"`` recomputes on input planes of more than this many pixels (H * W)
AUTO_RECOMPUTE_ABOVE = 256


class DartsBackendError(ValueError):
    """Bad input to a DARTS mixed op, or an unknown backend."""


# ---------------------------------------------------------------------------------------------
# Primitive sets: the backends of hdnas.mixed, resolved by its one resolver

_resolved: dict = {}


def _reason(backend, device, dtype, plan):
    """Why ``backend`` cannot run the fused DARTS path of ``plan`` on (device, dtype), or None."""
    if not isinstance(backend, DecomposedBackend):
        return "not a composition over depthwise primitives"
    return backend.plan_unsupported_reason(plan, device, dtype)


def resolve_primitives(name: str, device: torch.device, dtype: torch.dtype, plan):
    """The ``Primitives`` set that backend ``name`` uses on (device, dtype), or None for
    'reference'. Resolved once per (name, device type, dtype, stage-1 stencil) by
    ``hdnas.mixed.base.resolve``; a named backend that cannot serve falls back to 'merged'
    (always served) with one warning."""
    key = (name, device.type, dtype, plan.st1_ksizes, plan.st1_dils)
    if key in _resolved:
        return _resolved[key]
    if name == "reference":
        prims = None
    else:
        try:
            backend = resolve(name, device, dtype, lambda b, dev: _reason(b, dev, dtype, plan),
                              fallback="merged", stacklevel=5)
        except BackendError as e:  # a backend whose optional module did not load
            warnings.warn(f"DARTS backend {name!r} is not available ({e}); using 'merged'",
                          RuntimeWarning, stacklevel=4)
            backend = get_backend("merged")
        prims = backend.primitives
    _resolved[key] = prims
    return prims


def check_recompute(recompute) -> bool | str:
    if recompute == "auto" or isinstance(recompute, bool):
        return recompute
    raise DartsBackendError(f"recompute must be True, False or 'auto', got {recompute!r}")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise DartsBackendError(f"unknown DARTS backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def darts_plan(names) -> Plan:
    """The plan of a DARTS candidate set (``hdnas.mixed.plan.Plan`` over the DARTS specs)."""
    names = tuple(names)
    return Plan(names, [OPS[n] for n in names], DARTS_FAMILIES)


#: Primitive sets whose stride-1 depthwise stage, subsampled, is faster on a CPU than stock
#: strided convs (bench/bench_darts.py, the mixed op at stride 2); they also run the 3x3 average
#: pool (count_include_pad=False) as a depthwise box sum divided by the window counts.
SUBSAMPLED_STRIDE2 = ("native",)


def _channels_last(x):
    """x as channels-last on a CPU (PyTorch's pools are several times faster there), else x."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def _avg_pool_3x3(x, s, prims):
    """``F.avg_pool2d(x, 3, s, 1, count_include_pad=False)`` as a depthwise 3x3 box sum (one
    ``grouped_dw`` call at stride s, ``_grouped_dw_at``) divided by each window's count of real
    pixels: PyTorch's CPU average-pool backward is several times slower than the primitives'."""
    N, C, H, W = x.shape
    ones = x.new_ones(1, C, 3, 3)
    y = _grouped_dw_at(s, prims, x, ones, (3,), (1,), False, True)

    def counts(n):
        pos = torch.arange(0, n, s, device=x.device)
        return 3 - (pos == 0).to(x.dtype) - (pos == n - 1).to(x.dtype)

    return y / (counts(H).view(-1, 1) * counts(W).view(1, -1))


class _Recomputed(torch.autograd.Function):
    """``run(x, weights)`` computed without an autograd graph; its backward computes it again
    with one and differentiates that. Only the inputs are kept: x, the weights and ``params``
    (the parameters ``run`` reads, which receive their gradients here). This is
    ``torch.utils.checkpoint``'s recomputation without its per-tensor hooks, which at DARTS'
    shapes cost as much as half the fused op (measured: 9.4-10.9 ms vs 4.7-5.3 ms forward and
    backward without recomputation, batch 2, C 16, 8x8). Only the gradients this backward pass
    uses are computed (``engine_needs``: an architecture step asks none of the parameters');
    the incoming gradient, often a slice of a DARTS cell's concatenation, is made contiguous
    once. Differentiable again under ``create_graph=True``."""

    @staticmethod
    def forward(ctx, run, x, weights, *params):
        ctx.run = run
        ctx.save_for_backward(x, weights, *params)
        return run(x, weights)

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        need = [n and engine_needs(t) for n, t in zip(ctx.needs_input_grad[1:], saved)]
        wanted = [t for t, n in zip(saved, need) if n]
        create = torch.is_grad_enabled()  # create_graph=True
        grads = []
        if wanted:
            with torch.enable_grad():
                out = ctx.run(*saved[:2])
            if out.requires_grad:
                grads = torch.autograd.grad(out, wanted, g.contiguous(), allow_unused=True,
                                            create_graph=create)
        grads = iter(grads)
        return (None,) + tuple(next(grads, None) if n else None for n in need)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous once: a DARTS cell hands
    each edge a slice of its concatenation's gradient, and every term of the fused sum (each BN's
    and pool's backward) would otherwise copy it to a contiguous tensor on its own."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


class _EvenPixels(torch.autograd.Function):
    """``z[:, :, ::2, ::2].contiguous()``; its backward writes the gradient into one zero-filled
    tensor (the two slices' backward would zero-fill and copy twice)."""

    @staticmethod
    def forward(ctx, z):
        ctx.shape = z.shape
        return z[:, :, ::2, ::2].contiguous()

    @staticmethod
    def backward(ctx, g):
        gz = g.new_zeros(ctx.shape)
        gz[:, :, ::2, ::2] = g
        return gz


def _grouped_dw_at(s, prims, *args):
    """``prims.grouped_dw(*args)`` at stride ``s`` (1, or 2 from the stride-1 op): the
    primitives' own stride-2 op where they have one, else the even pixels of the stride-1
    output."""
    if s == 1:
        return prims.grouped_dw(*args)
    y = None if prims.grouped_dw_s2 is None else prims.grouped_dw_s2(*args)
    return _EvenPixels.apply(prims.grouped_dw(*args)) if y is None else y


def _strided_stage1(x, dws, ks, ds, prims):
    """The stride-2 first depthwise stage of sep/dil candidates (layers ``dws``, kernel sizes
    ``ks``, dilations ``ds``) from the stride-1 primitive. A candidate with an even dilation d
    (DARTS' dil convs) reads only even pixels (every tap offset d * (a - k // 2) is even): it is
    the stride-1 conv of the even-pixel image with dilation d / 2, on a quarter of the pixels.
    The others are the even output pixels of the stride-1 op (``_grouped_dw_at``: native on a
    CPU computes only those rows and writes only those pixels). Odd dilations first (as sep
    precede dil; otherwise every group takes the second route)."""
    n_odd = sum(d % 2 for d in ds)
    if any(d % 2 for d in ds[n_odd:]):
        n_odd = len(ds)
    parts = []
    if n_odd:
        k = torch.stack([pad_to(m.weight[:, 0], max(ks[:n_odd])) for m in dws[:n_odd]])
        parts.append(_grouped_dw_at(2, prims, x, k, ks[:n_odd], ds[:n_odd], True, True))
    if n_odd < len(ds):
        k = torch.stack([pad_to(m.weight[:, 0], max(ks[n_odd:])) for m in dws[n_odd:]])
        parts.append(prims.grouped_dw(_EvenPixels.apply(x), k, ks[n_odd:],
                                      tuple(d // 2 for d in ds[n_odd:]), True, True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _stage1(x, xr, dws, pws, ks, ds, s, prims, subsample):
    """The first depthwise stage (ReLU on read) and the pointwise convs after it of the sep/dil
    candidates whose layers are ``dws`` / ``pws`` (kernel sizes ``ks``, dilations ``ds``):
    u (N, G*C, H', W'). At stride 1 one ``grouped_dw`` call; at stride 2 ``_strided_stage1``
    (``subsample``) or stock strided convs on ``xr = relu(x)``."""
    if s == 1:
        k = torch.stack([pad_to(m.weight[:, 0], max(ks)) for m in dws])
        z = prims.grouped_dw(x, k, ks, ds, True, True)
    elif subsample:
        z = _strided_stage1(x, dws, ks, ds, prims)
    else:
        z = torch.cat([F.conv2d(xr, m.weight, stride=2, padding=d * (k // 2), dilation=d,
                                groups=x.shape[1]) for m, k, d in zip(dws, ks, ds)], 1)
    return pointwise(prims, z, torch.stack([m.weight[:, :, 0, 0] for m in pws]))


def _factorized_reduce(xr, fr, prims):
    """DARTS' FactorizedReduce before its BN, ``cat(conv_1(xr), conv_2(xr[:, :, 1:, 1:]), 1)``
    with 1x1 stride-2 convs, on ``xr = relu(x)``. With an even height and width both halves are
    1x1 convs of one phase of xr (the even pixels, the odd ones): one grouped 1x1 conv over the two
    stacked phases (``primitives.pointwise``; stock CPU stride-2 1x1 convs copy their input and
    are several times slower).
    Otherwise the convs (the plain module's error included)."""
    N, C, H, W = xr.shape
    w1, w2 = fr.conv_1.weight, fr.conv_2.weight
    if H % 2 or W % 2 or w1.shape != w2.shape or xr.device.type != "cpu":
        return torch.cat([F.conv2d(xr, w1, stride=2), F.conv2d(xr[:, :, 1:, 1:], w2, stride=2)], 1)
    xv = xr.view(N, C, H // 2, 2, W // 2, 2)
    ph = torch.stack([xv[:, :, :, 0, :, 0], xv[:, :, :, 1, :, 1]], 1)  # (N, 2, C, H/2, W/2)
    wk = torch.stack([w1[:, :, 0, 0], w2[:, :, 0, 0]])  # (2, C/2, C)
    return pointwise(prims, ph.view(N, 2 * C, H // 2, W // 2), wk)


# ---------------------------------------------------------------------------------------------
# The module

class MixedOp(nn.Module):
    """DARTS' search mixed op, ``forward(x, weights) = sum_k weights[k] * op_k(x)``, computed by
    ``backend`` (see the module docstring). ``partial_k > 1``: PC-DARTS' partial channels (the
    candidates run on the first C // K channels, the rest passes through, max-pooled 2x2 at
    stride 2, then ``channel_shuffle(., K)``). ``forward_gdas(x, hardwts, index)``: GDAS, only the
    chosen candidate runs."""

    def __init__(self, C: int | None, stride: int, primitives=PRIMITIVES, backend: str = "fused",
                 recompute: bool | str = "auto", partial_k: int = 1,
                 ops: nn.ModuleList | None = None):
        super().__init__()
        if C is None and (ops is None or partial_k != 1):
            raise DartsBackendError("C may be None only when adopting candidates that do not "
                                    "depend on it (none / identity)")
        if not isinstance(partial_k, int) or partial_k < 1 or (C or 0) % partial_k:
            raise DartsBackendError(f"C={C} channels are not divisible by the PC-DARTS "
                                    f"partial-channel factor K={partial_k}")
        self.C = C
        self.stride = check_stride(stride)
        self.partial_k = partial_k
        self.backend = check_backend(backend)
        self.recompute = check_recompute(recompute)
        names = check_primitives(primitives)
        self.primitives = names
        Cop = None if C is None else C // partial_k
        if ops is None:
            ops = build_candidates(Cop, self.stride, names)
        else:
            if len(ops) != len(names):
                raise DartsBackendError(f"{len(ops)} candidate modules for {len(names)} primitives")
            for i, (op, name) in enumerate(zip(ops, names)):
                got, s, c = identify_candidate(op)
                if got != name or (name != "none" and s != self.stride) or c not in (None, Cop):
                    raise DartsBackendError(f"candidate {i} is {got} (stride {s}, C {c}), expected "
                                            f"{name} at stride {self.stride} with C={Cop}")
        self._ops = ops
        if partial_k > 1:
            self.mp = nn.MaxPool2d(2, 2)
        self.plan = darts_plan(names)
        self._single: dict = {}  # GDAS: index -> (plan, [module]) of one candidate

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "fused", recompute: bool | str = "auto",
                    partial_k: int | None = None) -> "MixedOp":
        """Adopt the ``_ops`` of a DARTS-style MixedOp (its very modules: parameters and BN
        buffers are shared, not copied). ``partial_k``: PC-DARTS' K (default: 4 when the module
        has PC-DARTS' ``mp`` pool, else 1). Raises NotRecognised if a candidate is not a DARTS
        layout."""
        ops = getattr(module, "_ops", None)
        if not isinstance(ops, nn.ModuleList) or len(ops) == 0:
            raise NotRecognised(f"{type(module).__name__} has no non-empty `_ops` ModuleList")
        found = [identify_candidate(op) for op in ops]
        strides = {s for n, s, _ in found if n != "none"} or {found[0][1]}
        chans = {c for _, _, c in found if c is not None}
        if len(strides) != 1 or len(chans) > 1:
            raise NotRecognised(f"candidates disagree on stride {sorted(strides)} or channels {sorted(chans)}")
        if partial_k is None:
            partial_k = 4 if isinstance(getattr(module, "mp", None), nn.MaxPool2d) else 1
        if not chans and partial_k > 1:
            raise NotRecognised("no candidate fixes the channel count (only none/identity)")
        C = chans.pop() * partial_k if chans else None  # None: only none/identity, any C
        new = cls(C, strides.pop(), [n for n, _, _ in found], backend, recompute, partial_k, ops=ops)
        new.train(module.training)
        return new

    def extra_repr(self):
        k = f", partial_k={self.partial_k}" if self.partial_k > 1 else ""
        return f"C={self.C}, stride={self.stride}, backend={self.backend!r}, recompute={self.recompute!r}{k}"

    # -- checks -------------------------------------------------------------------------------
    def _check(self, x, weights):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise DartsBackendError(
                "mixed op input must be a floating-point (N, C, H, W) tensor, got "
                + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__))
        if self.C is not None and x.shape[1] != self.C:
            raise DartsBackendError(f"mixed op expects {self.C} input channels, got {x.shape[1]}")
        K = len(self._ops)
        check_weight_vector(weights, K, "mixed op weights", DartsBackendError,
                            f": {', '.join(self.primitives)}")
        if weights.device != x.device:
            raise DartsBackendError(f"weights on {weights.device} but input on {x.device}")

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x, weights):
        self._check(x, weights)
        return self._partial(x, lambda xa: self._mix(xa, weights))

    def forward_gdas(self, x, weights, index):
        """GDAS: ``weights[index] * op_index(x)``; only the chosen candidate runs (by the fused
        path of that candidate alone, like ``forward`` with one candidate)."""
        self._check(x, weights)
        index = int(index)
        if not 0 <= index < len(self._ops):
            raise DartsBackendError(f"GDAS index {index} out of range for {len(self._ops)} candidates")
        if index not in self._single:
            self._single[index] = (darts_plan([self.primitives[index]]), [self._ops[index]])
        plan, ops = self._single[index]
        return self._partial(x, lambda xa: self._mix(xa, weights[index:index + 1], plan, ops))

    def _partial(self, x, f):
        if self.partial_k == 1:
            return f(x)
        d = x.shape[1] // self.partial_k
        y = f(x[:, :d])
        xb = x[:, d:]
        if y.shape[2] != x.shape[2]:
            xb = self.mp(xb)
        return channel_shuffle(torch.cat([y, xb], dim=1), self.partial_k)

    def _mix(self, x, weights, plan=None, ops=None):
        """``sum_k weights[k] * ops[k](x)`` over the candidates of ``plan`` (default: all)."""
        plan, ops = (self.plan, self._ops) if plan is None else (plan, ops)
        prims = resolve_primitives(self.backend, x.device, x.dtype, plan)
        if prims is None or torch.is_autocast_enabled(x.device.type):
            return sum(w * op(x) for w, op in zip(weights, ops))
        state = _RunState()
        if torch.is_grad_enabled() and self.recomputes(x):
            params = [p for op in ops for p in op.parameters()]
            return _Recomputed.apply(lambda xx, ww: self._fused(xx, ww, prims, state, plan, ops),
                                     x, weights, *params)
        out = self._fused(x, weights, prims, state, plan, ops)
        return _ContiguousGrad.apply(out) if out.requires_grad else out

    def recomputes(self, x) -> bool:
        """Whether a forward on ``x`` recomputes in backward (``recompute``: see the module
        docstring)."""
        if self.recompute == "auto":
            return x.shape[-2] * x.shape[-1] > AUTO_RECOMPUTE_ABOVE
        return self.recompute

    @staticmethod
    def _layers_of(P: Plan, ops):
        """The candidates' layers the fused path reads, per role, for the candidates of ``P``."""
        return {"dw1": [ops[i].op[1] for i in P.st1], "pw1": [ops[i].op[2] for i in P.st1],
                "bn1": [ops[i].op[3] for i in P.st1], "dw2": [ops[i].op[5] for i in P.sep],
                "pw2": [ops[i].op[6] for i in P.sep], "bn2": [ops[i].op[7] for i in P.sep]}

    def _fused(self, x, weights, prims, state: _RunState, P: Plan, ops):
        s = self.stride
        state.start()
        w = weights.to(x.dtype)
        terms = []
        xr = None
        # the fast primitives at stride 1, subsampled, beat stock strided convs (CPU, measured)
        subsample = prims.name in SUBSAMPLED_STRIDE2 and x.device.type == "cpu"
        bst = prims.batch_stats  # the BNs' batch statistics (None: F.batch_norm's own)
        if P.st1 or (P.skip and s == 2):
            xr = F.relu(x) if (s == 2) else None
        if P.st1:
            L = self._layers_of(P, ops)
            Gs = len(P.sep)
            # the sep and the dil candidates' first stages apart (two calls, each output
            # contiguous): the dil candidates' BNs then write only their weighted sum
            if Gs:
                u1 = _stage1(x, xr, L["dw1"][:Gs], L["pw1"][:Gs], P.st1_ksizes[:Gs],
                             P.st1_dils[:Gs], s, prims, subsample)
                v_sep = group_batch_norm(u1, L["bn1"][:Gs], None, state, bst)
                k2 = torch.stack([pad_to(m.weight[:, 0], P.st2_kmax) for m in L["dw2"]])
                z2 = prims.grouped_dw(v_sep, k2, P.st2_ksizes, (1,) * Gs, True, False)
                pw2 = torch.stack([m.weight[:, :, 0, 0] for m in L["pw2"]])
                u2 = pointwise(prims, z2, pw2)
                terms.append(group_batch_norm_sum(u2, L["bn2"], w[P.sep], state, bst, prims.bn_sum))
            if P.dil:
                u1 = _stage1(x, xr, L["dw1"][Gs:], L["pw1"][Gs:], P.st1_ksizes[Gs:],
                             P.st1_dils[Gs:], s, prims, subsample)
                terms.append(group_batch_norm_sum(u1, L["bn1"][Gs:], w[P.dil], state, bst,
                                                  prims.bn_sum))
        # PyTorch's NCHW CPU pools are several times slower than its channels-last ones (same
        # windows, scan order and tie rule: the first maximum in row-major order); where the
        # primitives have no pool of their own, the pools read a channels-last copy of x and the
        # BNs an NCHW copy of their output: torch's channels-last training-mode batch_norm on CPU
        # accumulates its statistics far less accurately (5e-5 vs 3e-7 relative, fp32)
        xp = None
        for i in P.max_pool:
            # the primitives' own pool (native: 1.5-2x the channels-last route with its copies,
            # forward and backward; python -m bench.bench_pool)
            mp = None if prims.max_pool_3x3 is None else prims.max_pool_3x3(x, s)
            if mp is None:
                xp = _channels_last(x) if xp is None else xp
                mp = F.max_pool2d(xp, 3, s, 1).contiguous()
            terms.append(group_batch_norm(mp, [ops[i][1]], w[i:i + 1], state, bst))
        for i in P.avg_pool:
            if subsample:
                ap = _avg_pool_3x3(x, s, prims)
            else:
                xp = _channels_last(x) if xp is None else xp
                ap = F.avg_pool2d(xp, 3, s, 1, count_include_pad=False).contiguous()
            terms.append(group_batch_norm(ap, [ops[i][1]], w[i:i + 1], state, bst))
        for i in P.skip:
            if s == 1:
                terms.append(w[i] * x)
            else:
                fr = ops[i]
                xr = F.relu(x) if xr is None else xr
                terms.append(group_batch_norm(_factorized_reduce(xr, fr, prims), [fr.bn],
                                              w[i:i + 1], state, bst))
        state.first = False
        if not terms:  # only 'none': w * x.mul(0) as the plain loop (a zero weight gradient)
            return (x[:, :, ::s, ::s].mul(0.) if s > 1 else x.mul(0.)) * w.sum()
        if len(terms) == 1:
            return terms[0]
        out = terms[0] + terms[1]
        for t in terms[2:]:  # in place on the fresh sum (no autograd node keeps it): one buffer
            out.add_(t)
        return out
