"""The native backend: the C++ (CPU) / CUDA depthwise kernels of ``csrc/`` as torch custom ops.

Ops (namespace ``hdnas_native``), defined in C++ and given fake (meta) kernels and autograd here:

* ``dw_fwd(x, w[G, C, T], offs, ntaps, relu_input, shared_input, stride=1)``: the tap-table
  depthwise engine (see ``csrc/hdnas_dw.h``; stride 2 on the CPU only); ``dw_bwd`` its input/tap
  gradients (deterministic);
* CPU only, for the fused DARTS op: ``bn_stats`` (training-mode BN statistics, float64),
  ``max_pool3x3`` (+ ``_backward``; DARTS' 3x3 max pool, NCHW, PyTorch's choice rules),
  ``bn_sum`` (+ ``_backward``; training-mode BNs of channel groups, scaled and summed over the
  groups), ``pw`` (+ ``pw_wgrad``; 1x1 convs of channel groups), each with its twin in
  ``hdnas.mixed.primitives``.

The contract's primitives are built on it:

* ``grouped_dw(x, kernels, ksizes, dilations, relu_input, shared_input)``: each group's k x k
  (dilated) taps gathered into the tap table with a one-hot matmul (exact; its backward scatters
  the tap gradients back into ``kernels`` deterministically);
* ``mixed_dw(x, weights, kernels, ksizes, dilations, relu_input, skip_weight)``: the groups
  folded into one union stencil ``W_eff[c, u] = sum_g weights[g] kernels[g, c, tap->u]`` (exact,
  one pass over x instead of G), plus ``skip_weight * x``; autograd gives the kernel, weight and
  skip gradients from the native tap gradient.

The library is built/loaded lazily at first use (``hdnas.native_build``), so importing this
module costs nothing; when it cannot be built, the backend says why (``unsupported_reason``) and
``--fused`` falls back to another backend with one warning.
"""
from __future__ import annotations

import functools
import sys

import torch
from torch._subclasses.fake_tensor import is_fake

from hdnas import native_build
from hdnas.mixed import dense
from hdnas.mixed.base import BackendError, register_backend
from hdnas.mixed.merged import DecomposedBackend
from hdnas.kernels.checks import check_dw_args
from hdnas.kernels.stencil import Table as _Table, grouped_table as _grouped_table, union_table as _union_table
from hdnas.mixed.primitives import Primitives, bn_sum_ref, engine_needs
from hdnas.model.ops import set_native_depthwise

# Limits of the CUDA kernels (csrc/hdnas_dw.h); the CPU kernels have none.
CUDA_MAX_GROUPS, CUDA_MAX_TAPS, CUDA_MAX_RADIUS = 8, 96, 8
CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_registered = False


def _register_python_side():
    """Fake kernels and autograd for the C++-defined ops (once, after the library loads)."""
    global _registered
    if _registered:
        return

    @torch.library.register_fake("hdnas_native::dw_fwd")
    def _dw_fwd_fake(x, w, offs, ntaps, relu_input, shared_input, stride=1):
        return x.new_empty((x.shape[0], w.shape[0] * w.shape[1], (x.shape[2] - 1) // stride + 1,
                            (x.shape[3] - 1) // stride + 1))

    @torch.library.register_fake("hdnas_native::bn_stats")
    def _bn_stats_fake(x):
        return (x.new_empty((x.shape[1],), dtype=torch.float64),
                x.new_empty((x.shape[1],), dtype=torch.float64))

    @torch.library.register_fake("hdnas_native::dw_bwd")
    def _dw_bwd_fake(grad_y, x, w, offs, ntaps, relu_input, shared_input, need_gx, need_gw,
                     stride=1):
        gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_gx else x.new_empty((0,))
        gw = torch.empty_like(w, memory_format=torch.contiguous_format) if need_gw else w.new_empty((0,))
        return gx, gw

    def _setup(ctx, inputs, output):
        x, w, offs, ntaps, relu_input, shared_input, *stride = inputs
        ctx.save_for_backward(x, w)
        ctx.args = (offs, ntaps, relu_input, shared_input)
        ctx.stride = stride[0] if stride else 1

    def _backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        need_gx = ctx.needs_input_grad[0] and engine_needs(x)
        need_gw = ctx.needs_input_grad[1] and engine_needs(w)
        gx, gw = torch.ops.hdnas_native.dw_bwd(grad_y, x, w, *ctx.args, need_gx, need_gw,
                                               ctx.stride)
        return (gx if need_gx else None), (gw if need_gw else None), None, None, None, None, None

    torch.library.register_autograd("hdnas_native::dw_fwd", _backward, setup_context=_setup)

    # Double backward: dw_bwd is bilinear in (grad_y, w) and (act(x), grad_y), so its own
    # gradients are again dw_fwd / dw_bwd calls (ReLU' is 0 almost everywhere).
    def _setup_bwd(ctx, inputs, output):
        gy, x, w, offs, ntaps, relu_input, shared_input, need_gx, need_gw, *stride = inputs
        ctx.save_for_backward(gy, x, w)
        ctx.args = (offs, ntaps, relu_input, shared_input)
        ctx.need = (need_gx, need_gw)
        ctx.stride = stride[0] if stride else 1

    def _backward_bwd(ctx, ggx, ggw):
        gy, x, w = ctx.saved_tensors
        offs, ntaps, relu, shared = ctx.args
        need_gx, need_gw = ctx.need
        s = ctx.stride
        ops = torch.ops.hdnas_native
        d_gy = d_x = d_w = None
        if need_gx and ggx is not None:
            mg = ggx * (x > 0).to(ggx.dtype) if relu else ggx
            if ctx.needs_input_grad[0]:
                d_gy = ops.dw_fwd(mg, w, offs, ntaps, False, shared, s)
            if ctx.needs_input_grad[2]:
                d_w = ops.dw_bwd(gy, mg, w, offs, ntaps, False, shared, False, True, s)[1]
        if need_gw and ggw is not None:
            if ctx.needs_input_grad[0]:
                t = ops.dw_fwd(x, ggw, offs, ntaps, relu, shared, s)
                d_gy = t if d_gy is None else d_gy + t
            if ctx.needs_input_grad[1]:
                d_x = ops.dw_bwd(gy, x, ggw, offs, ntaps, relu, shared, True, False, s)[0]
        return d_gy, d_x, d_w, None, None, None, None, None, None, None

    torch.library.register_autograd("hdnas_native::dw_bwd", _backward_bwd, setup_context=_setup_bwd)

    @torch.library.register_fake("hdnas_native::max_pool3x3")
    def _max_pool_fake(x, stride):
        return x.new_empty((x.shape[0], x.shape[1], (x.shape[2] - 1) // stride + 1,
                            (x.shape[3] - 1) // stride + 1))

    @torch.library.register_fake("hdnas_native::max_pool3x3_backward")
    def _max_pool_bwd_fake(grad_y, x, stride):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _setup_pool(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.stride = inputs[1]

    def _backward_pool(ctx, grad_y):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the twin's differentiable backward
            with torch.enable_grad():
                y = torch.nn.functional.max_pool2d(x, 3, ctx.stride, 1)
                return torch.autograd.grad(y, x, grad_y, create_graph=True)[0], None
        return torch.ops.hdnas_native.max_pool3x3_backward(grad_y, x, ctx.stride), None

    torch.library.register_autograd("hdnas_native::max_pool3x3", _backward_pool,
                                    setup_context=_setup_pool)

    @torch.library.register_fake("hdnas_native::bn_sum")
    def _bn_sum_fake(u, mean, var, scale, eps, groups):
        return u.new_empty((u.shape[0], u.shape[1] // groups, u.shape[2], u.shape[3]))

    @torch.library.register_fake("hdnas_native::bn_sum_backward")
    def _bn_sum_bwd_fake(grad_y, u, mean, var, scale, eps, groups):
        return (torch.empty_like(u, memory_format=torch.contiguous_format),
                torch.empty_like(scale, memory_format=torch.contiguous_format))

    def _setup_bn_sum(ctx, inputs, output):
        u, mean, var, scale, eps, groups = inputs
        ctx.save_for_backward(u, mean, var, scale)
        ctx.args = (eps, groups)

    def _backward_bn_sum(ctx, grad_y):
        u, mean, var, scale = ctx.saved_tensors
        eps, groups = ctx.args
        if torch.is_grad_enabled():  # create_graph=True: the twin's differentiable backward
            with torch.enable_grad():  # (on the inputs themselves: gu depends on u)
                ins = [t for t in (u, scale) if t.requires_grad]
                y = bn_sum_ref(u, mean, var, scale, eps, groups)
                got = iter(torch.autograd.grad(y, ins, grad_y, create_graph=True))
                gu = next(got) if u.requires_grad else None
                gs = next(got) if scale.requires_grad else None
        else:
            gu, gs = torch.ops.hdnas_native.bn_sum_backward(grad_y, u, mean, var, scale, eps, groups)
        need = ctx.needs_input_grad
        return (gu if need[0] else None), None, None, (gs if need[3] else None), None, None

    torch.library.register_autograd("hdnas_native::bn_sum", _backward_bn_sum,
                                    setup_context=_setup_bn_sum)

    @torch.library.register_fake("hdnas_native::pw")
    def _pw_fake(x, w):
        return x.new_empty((x.shape[0], w.shape[0] * w.shape[1], x.shape[2], x.shape[3]))

    @torch.library.register_fake("hdnas_native::pw_wgrad")
    def _pw_wgrad_fake(grad_y, x, groups):
        return x.new_empty((groups, grad_y.shape[1] // groups, x.shape[1] // groups))

    # pw is linear in x and in w, pw_wgrad in grad_y and in x: every gradient is again a pw or
    # pw_wgrad call, so derivatives of any order come from these two formulas
    def _setup_pw(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward_pw(ctx, grad_y):
        x, w = ctx.saved_tensors
        ops = torch.ops.hdnas_native
        gx = gw = None
        if ctx.needs_input_grad[0] and engine_needs(x):
            gx = ops.pw(grad_y, w.transpose(1, 2))
        if ctx.needs_input_grad[1] and engine_needs(w):
            gw = ops.pw_wgrad(grad_y, x, w.shape[0])
        return gx, gw

    torch.library.register_autograd("hdnas_native::pw", _backward_pw, setup_context=_setup_pw)

    def _setup_pw_wgrad(ctx, inputs, output):
        grad_y, x, groups = inputs
        ctx.save_for_backward(grad_y, x)

    def _backward_pw_wgrad(ctx, ggw):
        grad_y, x = ctx.saved_tensors
        ops = torch.ops.hdnas_native
        d_gy = ops.pw(x, ggw) if ctx.needs_input_grad[0] else None
        d_x = ops.pw(grad_y, ggw.transpose(1, 2)) if ctx.needs_input_grad[1] else None
        return d_gy, d_x, None

    torch.library.register_autograd("hdnas_native::pw_wgrad", _backward_pw_wgrad,
                                    setup_context=_setup_pw_wgrad)
    _registered = True


def available(device="cpu") -> bool:
    """Whether the native kernels for ``device`` are built and loaded (builds them if needed)."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    if torch.device(device).type not in ("cpu", "cuda"):
        return False
    ok = native_build.load(kind)
    if ok:
        _register_python_side()
    return ok


def unavailable_reason(device, dtype, G=1, T=1, radius=0) -> str | None:
    """None if the native kernels serve (device, dtype, tap table size), else why not. The
    answer depends only on these values (and the outcome of the library's one load attempt,
    which never changes afterwards), so it is computed once per value and cached."""
    return _reason(torch.device(device).type, dtype, int(G), int(T), int(radius))


@functools.lru_cache(maxsize=1024)
def _reason(device_type: str, dtype, G: int, T: int, radius: int) -> str | None:
    if device_type not in ("cpu", "cuda"):
        return f"no native kernels for device {device_type!r}"
    if device_type == "cpu" and dtype not in CPU_DTYPES:
        return f"dtype {dtype} is not supported by the CPU kernels"
    if device_type == "cuda":
        if dtype not in CUDA_DTYPES:
            return f"dtype {dtype} is not supported by the CUDA kernels"
        if G > CUDA_MAX_GROUPS or T > CUDA_MAX_TAPS or radius > CUDA_MAX_RADIUS:
            return (f"the CUDA kernels take at most {CUDA_MAX_GROUPS} groups, {CUDA_MAX_TAPS} "
                    f"taps and radius {CUDA_MAX_RADIUS} (got {G}, {T}, {radius})")
    if not available(device_type):
        return f"native {device_type} kernels unavailable: {native_build.error(device_type)}"
    return None


# ---------------------------------------------------------------------------------------------
# Tap tables (cached per kernel-size/dilation set)

#: The one-hot tables as tensors, keyed by (table.key, device, dtype); at most
#: ONEHOT_CACHE_SIZE of them (the oldest is dropped first).
ONEHOT_CACHE_SIZE = 256
_onehot_cache: dict = {}


def _onehot(table: _Table, device, dtype, like):
    """The one-hot table as a tensor on (device, dtype); cached for real tensors, built afresh
    for fake ones (FakeTensorMode / torch.compile tracing must not see a real constant)."""
    # (is_compiling first: Dynamo cannot trace is_fake; inside a compiled graph the table is
    # built afresh, a constant of the graph)
    fake = torch.compiler.is_compiling() or is_fake(like)
    key = (table.key, device, dtype)
    t = None if fake else _onehot_cache.get(key)
    if t is None:
        idx = torch.tensor(table.nz, dtype=torch.long, device=device).t()
        t = torch.zeros(table.shape, dtype=dtype, device=device)
        t = t.index_put((idx[0], idx[1], idx[2]), torch.ones((), dtype=dtype, device=device))
        if not fake:
            while len(_onehot_cache) >= ONEHOT_CACHE_SIZE:
                del _onehot_cache[next(iter(_onehot_cache))]
            _onehot_cache[key] = t
    return t


def _require(x, G, T, radius):
    why = _reason(x.device.type, x.dtype, G, T, radius)
    if why is not None:
        raise BackendError(f"native depthwise kernels cannot take this input: {why}")


# ---------------------------------------------------------------------------------------------
# The primitives

def grouped_dw(x, kernels, ksizes, dilations, relu_input: bool, shared_input: bool,
               stride: int = 1):
    """Native ``grouped_dw`` (same contract as ``primitives.grouped_dw_ref``); ``stride=2`` (CPU
    only): its even output pixels, ``grouped_dw(...)[:, :, ::2, ::2]``, computed as such."""
    check_dw_args(x, kernels, ksizes, dilations, shared_input)
    ksizes, dilations = tuple(int(k) for k in ksizes), tuple(int(d) for d in dilations)
    G, C, kmax = kernels.shape[0], kernels.shape[1], kernels.shape[-1]
    table = _grouped_table(ksizes, dilations, kmax)
    _require(x, G, table.shape[-1], table.radius)
    onehot = _onehot(table, x.device, x.dtype, x)
    w = torch.matmul(kernels.reshape(G, C, kmax * kmax), onehot)  # [G, C, T], exact gather
    return torch.ops.hdnas_native.dw_fwd(x, w, table.offs, table.ntaps, bool(relu_input),
                                         bool(shared_input), int(stride))


def mixed_dw(x, weights, kernels, ksizes, dilations, relu_input: bool, skip_weight=None):
    """Native ``mixed_dw`` (same contract as ``primitives.mixed_dw_ref``)."""
    check_dw_args(x, kernels, ksizes, dilations, True, weights)
    ksizes, dilations = tuple(int(k) for k in ksizes), tuple(int(d) for d in dilations)
    G, C, kmax = kernels.shape[0], kernels.shape[1], kernels.shape[-1]
    table = _union_table(ksizes, dilations, kmax)
    _require(x, 1, table.shape[-1], table.radius)
    onehot = _onehot(table, x.device, x.dtype, x)
    # W_eff[c, u] = sum_g weights[g] * sum_k kernels[g, c, k] * onehot[g, k, u]
    per_group = torch.matmul(kernels.reshape(G, C, kmax * kmax), onehot)  # [G, C, U]
    w_eff = (per_group * weights.to(x.dtype).view(G, 1, 1)).sum(0, keepdim=True)
    y = torch.ops.hdnas_native.dw_fwd(x, w_eff, table.offs, table.ntaps, bool(relu_input), True)
    if skip_weight is not None:
        y = y + skip_weight * x
    return y


def batch_stats(x):
    """(mean, biased variance) per channel of a float32/float64 (N, C, H, W) CPU tensor over
    (N, H, W), in float64 (``csrc/cpu/bn_stats.cpp``; twin:
    ``torch.var_mean(x.double(), (0, 2, 3), correction=0)`` reversed), or None where the kernel
    does not serve (other devices or dtypes, no values, the library unavailable)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 4
            or x.numel() == 0 or _reason("cpu", x.dtype, 1, 1, 0) is not None):
        return None
    return torch.ops.hdnas_native.bn_stats(x)


def max_pool_3x3(x, stride: int):
    """``F.max_pool2d(x, 3, stride, 1)`` of a float32/float64 (N, C, H, W) CPU tensor, NCHW
    (``csrc/cpu/max_pool.cpp``: PyTorch's windows and tie rule, several times faster than its
    NCHW kernel, with no channels-last copies), or None where the kernel does not serve (other
    devices or dtypes, strides other than 1 and 2, the library unavailable)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 4
            or stride not in (1, 2) or x.shape[2] < 1 or x.shape[3] < 1
            or _reason("cpu", x.dtype, 1, 1, 0) is not None):
        return None
    return torch.ops.hdnas_native.max_pool3x3(x, int(stride))


def bn_sum(u, mean64, var64, scale, eps: float, groups: int):
    """``sum_g scale_g * BN_g(u_g)`` over the ``groups`` channel groups of a float32/float64
    (N, G*C, H, W) CPU tensor: training-mode batch normalisation with the batch statistics given
    (``batch_stats(u)``, float64; the backward accounts for their dependence on u), per-channel
    scales (G*C,), summed over the groups (``csrc/cpu/bn_sum.cpp``; twin:
    ``primitives.bn_sum_ref``). None where the kernel does not serve (other devices or dtypes,
    one value per channel, the library unavailable)."""
    if (u.device.type != "cpu" or u.dtype not in (torch.float32, torch.float64) or u.dim() != 4
            or groups < 1 or u.shape[1] % groups or u.numel() // max(u.shape[1], 1) <= 1
            or _reason("cpu", u.dtype, 1, 1, 0) is not None):
        return None
    return torch.ops.hdnas_native.bn_sum(u, mean64, var64, scale.to(u.dtype).contiguous(),
                                         float(eps), int(groups))


def grouped_dw_s2(x, kernels, ksizes, dilations, relu_input: bool, shared_input: bool):
    """``grouped_dw`` at stride 2 (twin: ``primitives.grouped_dw_s2_ref``) on a CPU: the stencil on
    the even rows only, the output gradient read straight into the kernels' zeroed scratch
    planes (no full-resolution output or gradient tensor); None on other devices (the CUDA
    kernels have stride 1 only)."""
    if x.device.type != "cpu":
        return None
    return grouped_dw(x, kernels, ksizes, dilations, relu_input, shared_input, stride=2)


def pointwise(x, w):
    """The 1x1 convs of channel groups, x (N, G*Ci, H, W), w (G, Co, Ci) -> (N, G*Co, H, W),
    of float32/float64 CPU tensors (``csrc/cpu/pw.cpp``: register-tiled, faster than the BLAS's
    batched GEMM at DARTS' 16-64 channels; twin: ``primitives.pointwise_ref``), or None where the
    kernel does not serve (other devices or dtypes, shapes that do not match, the library
    unavailable)."""
    if (x.device.type != "cpu" or w.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.float64) or w.dtype != x.dtype
            or x.dim() != 4 or w.dim() != 3 or x.shape[1] != w.shape[0] * w.shape[2]
            or _reason("cpu", x.dtype, 1, 1, 0) is not None):
        return None
    return torch.ops.hdnas_native.pw(x, w)


#: The C++/CUDA depthwise primitives (``--fused`` on a CPU uses these), with the merged dense
#: conv by FFT where that is measured faster (hdnas.mixed.dense).
NATIVE_PRIMITIVES = Primitives("native", grouped_dw, mixed_dw, dense.dense_conv, batch_stats,
                               max_pool_3x3, bn_sum, pointwise, grouped_dw_s2)


class NativeBackend(DecomposedBackend):
    """The merged composition (hdnas.mixed.merged) over the native primitives."""

    def primitives_unsupported_reason(self, device, dtype, plan=None):
        return unavailable_reason(device, dtype, *(plan.stage1_extent() if plan else (1, 1, 0)))


NATIVE = register_backend(NativeBackend("native", NATIVE_PRIMITIVES, priority=30,
                                        split_stage1=True))

# the derived network's ops run their depthwise convs on these kernels ("auto"/"native" modes):
# the model imports no backend, so the backend plugs itself in
set_native_depthwise(sys.modules[__name__])
