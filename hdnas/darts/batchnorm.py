"""BatchNorm over groups of channels for the fused DARTS mixed op, exactly as ``nn.BatchNorm2d``.

``group_batch_norm(u, bns, scales, state)`` normalises the channel blocks of ``u`` (one block per
BN module of the candidates) in one call, with each module's own mode, affine parameters (times an
optional per-block scale: the architecture weight folded in), running statistics and
``num_batches_tracked`` (updated as the module would, once per forward even when the op is
recomputed in backward).

In training mode on float32/float64 CPU tensors with the native primitives, the batch statistics
come from their ``batch_stats`` kernel (``csrc/cpu/bn_stats.cpp``: one read of the tensor, float64
accumulation, two passes per cached image plane) and the normalisation is ``F.batch_norm`` in
evaluation form with those statistics; the backward is PyTorch's own training-mode
``native_batch_norm_backward`` with the same saved mean and inverse deviation;
``group_batch_norm_sum`` (the dil candidates' BNs, the sep candidates' second BNs: scaled by the
architecture weights and summed over the candidates) is the primitives' ``bn_sum`` kernel, one
pass writing only the sum, with the training-mode backward (``csrc/cpu/bn_sum.cpp``). A
recomputation in backward reuses the batch statistics of the first run (``RunState``). PyTorch's CPU
training-mode ``batch_norm`` spends most of its time on the statistics (measured on a 2-core AVX2
EPYC, 1 thread, (32, 64, 32, 32) fp32 not in cache: 6.3 ms, of which the normalisation alone
1.1-1.5 ms). Elsewhere every normalisation is one ``F.batch_norm`` call. (A normalisation written
as reductions and fused multiply-adds over the tensor was tried and dropped: its temporaries
made it up to 2x slower than PyTorch's kernel backward.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _StatsNorm(torch.autograd.Function):
    """Training-mode batch normalisation of ``u`` with given batch statistics (mean, biased var,
    float64; no gradient flows into them: the backward is the training-mode one, which accounts
    for them). Returns y."""

    @staticmethod
    def forward(ctx, u, weight, bias, mean64, var64, eps):
        mean, var = mean64.to(u.dtype), var64.to(u.dtype)
        y = F.batch_norm(u, mean, var, weight, bias, False, 0.0, eps)
        invstd = torch.rsqrt(var64 + eps).to(u.dtype)
        ctx.eps, ctx.has_w, ctx.has_b = eps, weight is not None, bias is not None
        ctx.save_for_backward(u, weight, bias, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, g):
        u, weight, bias, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, the twin's
            with torch.enable_grad():
                ins = [t for t in (u, weight, bias) if t is not None]
                y = F.batch_norm(u, None, None, weight, bias, True, 0.0, ctx.eps)
                grads = iter(torch.autograd.grad(y, ins, g, create_graph=True))
            gu = next(grads)
            gw = next(grads) if ctx.has_w else None
            gb = next(grads) if ctx.has_b else None
            return gu, gw, gb, None, None, None
        gu, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g.contiguous(), u, weight, None, None, mean, invstd, True, ctx.eps,
            [need[0], ctx.has_w and need[1], ctx.has_b and need[2]])
        return (gu if need[0] else None, gw if ctx.has_w and need[1] else None,
                gb if ctx.has_b and need[2] else None, None, None, None)


def _batch_stats(u, stats, state):
    """(mean64, var64) of a contiguous u from ``stats`` (kept in / read from ``state``), or None
    where it does not serve (or u has one value per channel: F.batch_norm says so)."""
    if u.numel() // max(u.shape[1], 1) <= 1:
        return None
    return state.batch_stats(u, stats)


class RunState:
    """Whether the fused function runs for the first time (update running statistics) or is
    being recomputed in backward (normalise only, with the batch statistics of the first run)."""

    __slots__ = ("first", "kept", "pos")

    def __init__(self):
        self.first = True
        self.kept = []  # the first run's batch statistics, in call order
        self.pos = 0

    def start(self):
        """Called as the fused function starts: a recomputation reads the kept statistics from
        the first."""
        self.pos = 0

    def batch_stats(self, u, stats):
        """``stats(u)`` on the first run (kept); the kept result of the same call when recomputed."""
        if self.first:
            got = stats(u.detach())
            self.kept.append(got)
            return got
        got = self.kept[self.pos]
        self.pos += 1
        return got


def _bn_key(bn):
    return (bn.training, bn.track_running_stats, bn.running_mean is None, bn.momentum, bn.eps,
            bn.running_mean.dtype if bn.running_mean is not None else None)


def _scale_vector(scales, like):
    """The per-group scales as one (G,) tensor of ``like``'s dtype, or None where all are 1: ``scales``
    is such a tensor already, or a list of None (1) / 0-d tensors."""
    if scales is None or isinstance(scales, torch.Tensor):
        return None if scales is None else scales.to(like.dtype)
    if all(s is None for s in scales):
        return None
    one = like.new_ones(())
    return torch.stack([one if s is None else s.to(like.dtype) for s in scales])


def _group_affine(bns, scales, like):
    """The (weight, bias) of one normalisation over the groups (None: 1 / 0 throughout), each
    group's affine parameters times its scale, contiguous (torch's CPU batch_norm backward computes
    a wrong input gradient from a stride-0 (expanded) weight when each channel has one pixel per
    image, H = W = 1; torch 2.13)."""
    C = bns[0].num_features
    if not any(bn.affine for bn in bns):
        return (None if scales is None else scales.repeat_interleave(C)), None
    w = torch.stack([bn.weight if bn.affine else like.new_ones(C) for bn in bns]).to(like.dtype)
    b = torch.stack([bn.bias if bn.affine else like.new_zeros(C) for bn in bns]).to(like.dtype)
    if scales is not None:
        w, b = w * scales[:, None], b * scales[:, None]
    return w.reshape(-1), b.reshape(-1)


def _split_calls(u, bns, scales, state, stats):
    C = bns[0].num_features
    return torch.cat([group_batch_norm(u[:, i * C:(i + 1) * C], [b],
                                       None if scales is None else scales[i:i + 1], state, stats)
                      for i, b in enumerate(bns)], 1)


def group_batch_norm(u, bns, scales, state: RunState, stats=None):
    """``cat_g(scale_g * bn_g(u_g))`` for the channel blocks u_g of u (one per BN module, each
    ``num_features`` wide), as each ``nn.BatchNorm2d`` computes it in its current mode (running
    statistics and ``num_batches_tracked`` updated as the module does, but only on the first run
    of ``state``). Modules with the same settings share one normalisation. ``scales``: a list of
    None (1) / 0-d tensors, or one (G,) tensor, or None (all 1). ``stats``: the primitives'
    ``batch_stats`` (None: ``F.batch_norm``'s own)."""
    return _group_batch_norm(u, bns, scales, state, stats, None)[0]


def group_batch_norm_sum(u, bns, scales, state: RunState, stats=None, bn_sum=None):
    """``sum_g scale_g * bn_g(u_g)``: ``group_batch_norm`` summed over the groups, (N, C, H, W).
    With the primitives' ``bn_sum`` (training mode, their ``batch_stats``, no affine BN) in one
    pass that writes only the sum (and whose backward reads the output gradient once, not an
    expanded copy per group); otherwise the normalisation, then the sum."""
    y, summed = _group_batch_norm(u, bns, scales, state, stats, bn_sum)
    G = len(bns)
    if summed or G == 1:
        return y
    N, GC, H, W = y.shape
    return y.view(N, G, GC // G, H, W).sum(1)


def _group_batch_norm(u, bns, scales, state: RunState, stats, bn_sum):
    """(y, whether y is already summed over the groups): see the two functions above."""
    scales = _scale_vector(scales, u)
    if len(bns) > 1 and len({_bn_key(b) for b in bns}) > 1:
        return _split_calls(u, bns, scales, state, stats), False
    b0 = bns[0]
    C = b0.num_features
    factor = 0.0 if b0.momentum is None else b0.momentum
    tracks = b0.training and b0.track_running_stats  # the module would update its statistics
    update = tracks and state.first
    if tracks and b0.num_batches_tracked is not None:
        counts = [b.num_batches_tracked for b in bns]
        if update:
            torch._foreach_add_(counts, 1)
        if b0.momentum is None:
            if len({int(c) for c in counts}) > 1:
                # cumulative averages over different counts: one call per module
                if update:
                    torch._foreach_sub_(counts, 1)
                return _split_calls(u, bns, scales, state, stats), False
            factor = 1.0 / float(b0.num_batches_tracked)
    weight, bias = _group_affine(bns, scales, u)
    bn_training = b0.training or b0.running_mean is None
    if bn_training and stats is not None:
        u = u.contiguous()
        st = _batch_stats(u, stats, state)
        summed = None
        if st is not None:
            if bn_sum is not None and bias is None:
                scale = weight if weight is not None else u.new_ones(u.shape[1])
                summed = bn_sum(u, *st, scale, b0.eps, len(bns))
            y = summed if summed is not None else _StatsNorm.apply(u, weight, bias, *st, b0.eps)
            mean64, var64 = st
            if update and b0.running_mean is not None:
                n = u.numel() // u.shape[1]
                rms, rvs = [b.running_mean for b in bns], [b.running_var for b in bns]
                dt = rms[0].dtype  # (one dtype: part of _bn_key)
                with torch.no_grad():  # as torch: momentum * batch + (1 - momentum) * running,
                    torch._foreach_mul_(rms + rvs, 1 - factor)  # the variance unbiased
                    torch._foreach_add_(rms, (factor * mean64).to(dt).split(C))
                    torch._foreach_add_(rvs, (factor * n / (n - 1) * var64).to(dt).split(C))
            return y, summed is not None
    rm = rv = None
    if b0.running_mean is not None and (tracks or not bn_training):
        if len(bns) == 1:
            rm, rv = b0.running_mean, b0.running_var
        else:
            rm = torch.cat([b.running_mean for b in bns])
            rv = torch.cat([b.running_var for b in bns])
        if tracks and not update:
            # recomputation in backward: the same call (so autograd saves the same tensors),
            # updating throw-away copies of the statistics
            rm, rv = rm.clone(), rv.clone()
    y = F.batch_norm(u, rm, rv, weight, bias, bn_training, factor, b0.eps)
    if update and len(bns) > 1 and rm is not None:
        with torch.no_grad():
            for i, b in enumerate(bns):
                b.running_mean.copy_(rm[i * C:(i + 1) * C])
                b.running_var.copy_(rv[i * C:(i + 1) * C])
    return y, False
