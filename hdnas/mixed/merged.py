"""The exact merge algebra of the DLSR mixed op (docs/kernels.md §8), composed from a ``Primitives`` set.

``DecomposedBackend`` computes ``y = sum_k w_k * op_k(x)`` for any subset of the four op
families without running the candidates one by one:

1. dense convs ('conv'): ``sum_k w_k conv_k(x) = conv(x, W)`` with ``W = sum_k w_k pad(K_k)``
   (one dense conv at the largest kernel size, ``primitives.dense_conv``: the native set may
   run it by FFT, hdnas.mixed.dense). In ``distill_step`` the distillation 1x1
   (``c_d``, with bias) is appended to ``W`` as C/2 extra output channels only when the dense
   kernel is 1x1: zero-padded into a 7x7 it would cost 49x its MACs (+50% on the whole dense
   conv at C/2 extra channels, measured 1.0x instead of 1.3x for a CPU step) to save one 1M
   read of x, so otherwise it stays a separate 1x1 conv;
2. first stage of every 'sep' and 'dil' op: one ``primitives.grouped_dw(x, ..., relu_input=True,
   shared_input=True)`` (one read of x, one shared ReLU, G1 = #sep + #dil output groups, sep
   groups first), or with ``split_stage1`` one such call for the sep and one for the dil groups;
3. first pointwise of the 'sep' ops: one block-diagonal batched GEMM (no ReLU here: the ReLU that
   follows it is folded into step 4 as ``relu_input``);
4. second stage of the 'sep' ops: one ``primitives.grouped_dw(..., relu_input=True,
   shared_input=False)``;
5. final pointwise convs of all 'sep'/'dil' ops: GEMMs with the alpha-scaled block weight
   ``[w_1 PW_1 | ... | w_5 PW_5]``, accumulated onto the dense output; 'skip' adds ``w_skip x``.

The merged weights are built from the op parameters and ``w`` with differentiable PyTorch ops,
so autograd derives the gradients of every op parameter and of ``w`` from the few big
gradients (docs/kernels.md §0.2, §8.4). Backends differ only in ``primitives``:

* ``merged``  : ``TORCH_PRIMITIVES`` (stock PyTorch convs), the fused path without Triton;
* ``triton``  : Triton primitives (hdnas.mixed.triton_backend);
* ``native``  : a C++ primitives set plugs in the same way::

      register_backend(DecomposedBackend("native", Primitives("native", my_grouped_dw,
                                                               my_mixed_dw), priority=30))

``DecomposedBackend(name, primitives, priority, fused=True, split_stage1=False)`` is a stable API, with two
optional hooks for subclasses: ``primitives_unsupported_reason(device, dtype)`` (why the
primitives cannot serve; None if they can) and ``epilogue(terms, add, res, lrelu, out_dtype)`` (step 5 plus
the distillation step's ``lrelu(y + x)``; the triton backend replaces it by one fused kernel).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from hdnas.mixed.base import (Backend, BackendError, MixedOp, amp_dtype,
                              check_mixed_inputs, register_backend)
from hdnas.mixed.plan import Plan, pad_to, plan_of
from hdnas.mixed.primitives import TORCH_PRIMITIVES, Primitives
from hdnas.model.space import LRELU_SLOPE

def _pw(x: torch.Tensor, w: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 conv as a batched GEMM: (N, Cin, H, W) x (Cout, Cin) -> (N, Cout, H, W), plus ``acc``
    (N, Cout, H, W) if given (added by the GEMM itself). Accepts channel slices and a weight
    slice without a copy: ``bmm`` reads the strided views and the weight broadcast over the
    batch (stride 0). (``torch.matmul(w, x)`` would fold the batch into the GEMM's rows, i.e.
    copy x transposed in, the result transposed out, and both again in the backward pass.)"""
    N, _, H, W = x.shape
    wb = w.expand(N, *w.shape)
    if acc is None:
        return torch.bmm(wb, x.flatten(2)).view(N, w.shape[0], H, W)
    return torch.baddbmm(acc.flatten(2), wb, x.flatten(2)).view(N, w.shape[0], H, W)


class DecomposedBackend(Backend):
    """The merged composition over a ``Primitives`` set (see the module docstring)."""

    def __init__(self, name: str, primitives: Primitives = TORCH_PRIMITIVES, priority: int = 10,
                 fused: bool = True, split_stage1: bool = False):
        self.name = name
        #: stage 1 as two ``grouped_dw`` calls (sep groups, dil groups) instead of one shared
        #: read of x: cheaper where the GEMMs that follow would copy a slice (CPU, see step 2)
        self.split_stage1 = split_stage1
        self.primitives = primitives
        self.priority = priority
        self.fused = fused

    # -- contract ---------------------------------------------------------------------------
    def unsupported_reason(self, op_names, device, dtype):
        return self.plan_unsupported_reason(plan_of(op_names), device, dtype)

    def plan_unsupported_reason(self, plan: Plan, device, dtype):
        """Why this backend cannot compute ``plan`` (a composition's plan: its ``unknown``
        families are the ones that composition does not compute) on (device, dtype), or None."""
        if plan.unknown:
            return f"op families of {plan.unknown} are not handled by the merged composition"
        if not dtype.is_floating_point:
            return f"dtype {dtype} is not floating point"
        return self.primitives_unsupported_reason(torch.device(device), dtype, plan)

    def primitives_unsupported_reason(self, device, dtype, plan: Plan | None = None):
        """Hook for primitives that cannot serve a device/dtype (and ``plan``'s stencil, when
        given) (None: fine)."""
        return None

    def mixed_op(self, x, weights, mixed: MixedOp):
        check_mixed_inputs(x, weights, mixed)
        y, _ = self._compose(x, weights, mixed, None)
        return y

    def distill_step(self, x, weights, mixed: MixedOp, distill):
        check_mixed_inputs(x, weights, mixed)
        if distill.weight.device != x.device:
            raise BackendError(f"distillation conv on {distill.weight.device} but input on {x.device}")
        if (distill.weight.shape[1:] != (mixed.C, 1, 1) or tuple(distill.stride) != (1, 1)
                or distill.groups != 1):
            raise BackendError(f"the distillation conv must be a 1x1 conv from {mixed.C} channels "
                               f"with stride 1, got {distill}")
        r, d = self._compose(x, weights, mixed, distill)
        return F.leaky_relu(d, LRELU_SLOPE), r

    def fuse_concat(self, parts, fuse):
        """A 1x1 conv of a concat is the sum of per-part GEMMs with the matching weight columns:
        the cell's concat buffer is never written (the parts may be strided slices). Under
        autocast the GEMMs run in the autocast dtype, the sum in fp32, the result is stored in
        the autocast dtype (as ``fuse(cat(parts))`` would be)."""
        cdt = amp_dtype(parts[0])
        with _no_autocast(parts[0], cdt):
            cdt = cdt or parts[0].dtype
            acc = _acc_dtype(cdt)
            W = fuse.weight.flatten(1).to(cdt)
            y, c0 = None, 0
            if fuse.bias is not None and cdt == acc:  # the first GEMM adds the bias
                N, _, H, W_ = parts[0].shape
                y = fuse.bias.to(acc).view(1, -1, 1, 1).expand(N, -1, H, W_)
            for p in parts:
                if y is not None and cdt == acc:
                    y = _pw(p.to(cdt), W[:, c0:c0 + p.shape[1]], y)
                else:
                    t = _pw(p.to(cdt), W[:, c0:c0 + p.shape[1]]).to(acc)
                    y = t if y is None else y + t
                c0 += p.shape[1]
            if c0 != W.shape[1]:
                raise BackendError(f"fuse conv takes {W.shape[1]} channels, the parts have {c0}")
            if fuse.bias is not None and cdt != acc:
                y = y + fuse.bias.to(acc).view(1, -1, 1, 1)
            return y.to(cdt)

    def epilogue(self, terms, add, res, lrelu: bool, out_dtype: torch.dtype):
        """``act(sum_b _pw(z_b, W_b) + add + res)`` with act = LeakyReLU(0.05) if ``lrelu``,
        accumulated in fp32 (fp64 for fp64) and stored as ``out_dtype``; ``terms`` is a list of
        (z, W) with W = an alpha-scaled block weight (Cout, Cin_b) of z's dtype; add and res may
        be None, and (under autocast) of another dtype than z. Fused backends override this
        with one kernel."""
        acc = _acc_dtype(out_dtype)
        y = None if add is None else add.to(acc)
        for z, Wb in terms:
            if y is not None and z.dtype == acc:  # the GEMM accumulates onto y
                y = _pw(z, Wb, y)
            else:
                t = _pw(z, Wb).to(acc)
                y = t if y is None else y + t
        if res is not None:
            y = y + res
        return (F.leaky_relu(y, LRELU_SLOPE) if lrelu else y).to(out_dtype)

    # -- composition ------------------------------------------------------------------------
    def _compose(self, x, weights, mixed, distill):
        """Without ``distill``: (sum_k w_k op_k(x), None). With it: (lrelu(sum_k w_k op_k(x) + x),
        c_d(x)) -- the remaining branch of a distillation step, before the distilled lrelu.

        dtype policy (docs/kernels.md §5): without autocast everything is in x's dtype. Under
        ``torch.autocast`` the reference's policy, made explicit: convs, GEMMs and depthwise
        stages store their activations in the autocast dtype ``cdt`` (accumulating in fp32),
        the merged weights are formed from the fp32 parameters and the fp32 op weights in fp32
        and then cast (so d alpha and every parameter gradient are fp32), sums are accumulated
        in fp32, and each output has the reference's dtype: ``cdt`` for the mixed op (x's dtype
        joins when 'skip' is a candidate, since the identity is not cast), the promotion of
        that with x's dtype for the residual branch, ``cdt`` for the distilled branch."""
        cdt = amp_dtype(x)
        with _no_autocast(x, cdt):
            return self._compose_in(x, weights, mixed, distill, cdt)

    def _compose_in(self, x, weights, mixed, distill, amp):
        plan = plan_of(mixed.op_names)
        cdt = amp or x.dtype
        self.require(mixed.op_names, x.device, cdt)
        ops = mixed.ops
        w = weights if amp else weights.to(x.dtype)  # autocast: fp32 op weights, fp32 d alpha
        xc = x.to(cdt)
        C = mixed.C
        y = None
        d = None

        # 1. dense convs (+ the distillation 1x1 as extra output channels)
        if plan.conv:
            K = plan.conv_k
            Wd = sum(w[i] * pad_to(ops[i].op[0].weight, K) for i in plan.conv)
            if distill is not None and K == 1:
                Wcat = torch.cat([Wd, distill.weight.to(Wd.dtype)], 0)  # K == 1: no padding
                bias = None
                if distill.bias is not None:
                    bias = torch.cat([distill.bias.new_zeros(C), distill.bias]).to(cdt)
                out = F.conv2d(xc, Wcat.to(cdt), bias, padding=K // 2)
                y, d = out[:, :C], out[:, C:]
            else:
                y = self.primitives.dense_conv(xc, Wd.to(cdt))
        if distill is not None and d is None:
            bias = None if distill.bias is None else distill.bias.to(cdt)
            d = F.conv2d(xc, distill.weight.to(cdt), bias)
        out_dtype = cdt
        if plan.skip:  # the identity candidate is not cast by autocast: x's dtype joins the sum
            out_dtype = torch.promote_types(cdt, x.dtype)
            acc = _acc_dtype(out_dtype)
            y = None if y is None else y.to(acc)
            for i in plan.skip:
                y = w[i] * x if y is None else y + w[i] * x

        # 2.-5. separable and dilated ops: (z_b, alpha-scaled block weight) terms
        terms = []
        if plan.sep or plan.dil:
            st1 = plan.sep + plan.dil
            k1 = torch.stack([pad_to(ops[i].op[1].weight[:, 0], plan.st1_kmax) for i in st1]).to(cdt)
            Gs = len(plan.sep)
            if self.split_stage1 and plan.sep and plan.dil:
                # two calls: z_sep is a whole tensor, so step 3's batched GEMM reads it as a
                # view (a channel slice of one stage-1 output would be copied there), and the
                # backward pass adds two input gradients instead of concatenating one
                z_sep = self.primitives.grouped_dw(xc, k1[:Gs], plan.st1_ksizes[:Gs],
                                                   plan.st1_dils[:Gs], True, True)
                z_dil = self.primitives.grouped_dw(xc, k1[Gs:], plan.st1_ksizes[Gs:],
                                                   plan.st1_dils[Gs:], True, True)
            else:
                s1 = self.primitives.grouped_dw(xc, k1, plan.st1_ksizes, plan.st1_dils, True, True)
                # one split (its backward is one cat) rather than two slices (each of whose
                # backward zero-fills and copies a whole stage-1-sized gradient)
                z_sep, z_dil = s1.split([Gs * C, len(plan.dil) * C], dim=1)
            if Gs:
                N, _, H, W_ = x.shape
                pw1 = torch.stack([ops[i].op[2].weight[:, :, 0, 0] for i in plan.sep])  # (Gs,C,C)
                p1 = torch.matmul(pw1.to(cdt), z_sep.reshape(N, Gs, C, H * W_)).view(N, Gs * C, H, W_)
                k2 = torch.stack([pad_to(ops[i].op[4].weight[:, 0], plan.st2_kmax) for i in plan.sep])
                s2 = self.primitives.grouped_dw(p1, k2.to(cdt), plan.st2_ksizes, (1,) * Gs, True, False)
                Wsep = torch.cat([w[i] * ops[i].op[5].weight[:, :, 0, 0] for i in plan.sep], 1)
                terms.append((s2, Wsep.to(cdt)))
            if plan.dil:
                Wdil = torch.cat([w[i] * ops[i].op[2].weight[:, :, 0, 0] for i in plan.dil], 1)
                terms.append((z_dil, Wdil.to(cdt)))
        res = None
        if distill is not None:
            res = x
            out_dtype = torch.promote_types(out_dtype, x.dtype)
        return self.epilogue(terms, y, res, distill is not None, out_dtype), d


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of sums stored as ``dtype``: fp32 for the half types."""
    return torch.promote_types(dtype, torch.float32)


def _no_autocast(x, amp):
    """Autocast off for the explicit-dtype composition (a no-op context without autocast)."""
    return torch.autocast(x.device.type, enabled=False) if amp else contextlib.nullcontext()


MERGED = register_backend(DecomposedBackend("merged", TORCH_PRIMITIVES, priority=10, split_stage1=True))
