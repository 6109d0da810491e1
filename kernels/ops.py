"""torch custom ops around the Triton kernels (namespace ``hdnas_triton``).

* ``hdnas_triton::dw_taps(x, kernels, taps, dilations, relu_input, shared_input) -> y``
  the multi-group tap-table stencil of ``hdnas.kernels.dw`` (see there for the formula);
  ``kernels`` is (G, C, KMAX, KMAX), ``taps`` a flat list of G*KMAX*KMAX 0/1 flags.
* ``hdnas_triton::dw_taps_backward(gy, x, kernels, taps, dilations, relu_input, shared_input)
  -> (dx, dkernels)``; dkernels is exactly zero on inactive taps.

* ``hdnas_triton::pw_epilogue(z1, w1, z2?, w2?, add?, res?, lrelu) -> out`` and its backward
  ``pw_epilogue_backward``: the alpha-block pointwise GEMM with its epilogue
  (``hdnas.kernels.epilogue``).

All have fake (meta) implementations and the forward ops have autograd formulas, so
``torch.library.opcheck`` passes and ``torch.compile`` treats them as opaque nodes.

On top of them, the two depthwise primitives of ``hdnas.mixed.primitives``:

* ``grouped_dw(x, kernels, ksizes, dilations, relu_input, shared_input)``
* ``mixed_dw(x, weights, kernels, ksizes, dilations, relu_input, skip_weight=None)``: the
  candidates are merged into one union-of-taps kernel ``W_eff = sum_g w_g scatter_g(K_g)`` built
  with differentiable PyTorch ops (docs/kernels.md §0.1, §0.2), so no per-op output is materialised and
  autograd derives dK_g and dw_g from the one stencil gradient.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import triton

from hdnas.kernels import dw as _dw
from hdnas.kernels.checks import check_dw_args, check_input, check_input_matches
from hdnas.kernels.stencil import square_taps, union_layout

NS = "hdnas_triton"


def interpreting() -> bool:
    """True when the kernels run in Triton's numpy interpreter (TRITON_INTERPRET=1 was set
    before this module was imported: the choice is made when the kernels are decorated)."""
    return type(_dw._dw_taps_fwd).__name__ == "InterpretedFunction"

# ----------------------------------------------------------------------------- launch configs
#: GPU configs: (BLOCK_R, BLOCK_S) for fwd/dx, (BLOCK_C, BLOCK_S) for dk, plus launch options
#: (num_warps; num_stages=1: software-pipelining the group/pixel loops only adds registers).
#: hdnas.kernels.aot compiles exactly these for sm_90 (tests/test_triton_aot.py).
GPU_FWD_CFG = dict(BLOCK_R=2, BLOCK_S=256, num_warps=4, num_stages=1)
GPU_DK_CFG = dict(BLOCK_C=16, BLOCK_S=128, num_warps=8, num_stages=1)


def _acc_dtype(dtype):
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n):
    return triton.next_power_of_2(max(int(n), 1))


def _fwd_cfg(rows, hw):
    if interpreting():  # few, big programs: the interpreter's cost tracks the program count
        br = min(_pow2(rows), 64)
        return dict(BLOCK_R=br, BLOCK_S=min(_pow2(hw), max(16384 // br, 16)), num_warps=4)
    return dict(GPU_FWD_CFG)


def _dk_cfg(C, rows, N, hw, device):
    """(config, split) of the kernel-gradient kernel with ``rows`` = groups x KMAX tap rows: the
    grid has one program per (channel block, group, tap row, split); split spreads the (n, pixel
    block) pairs over about 4 programs per SM."""
    if interpreting():
        bc = min(_pow2(C), 64)
        return dict(BLOCK_C=bc, BLOCK_S=min(_pow2(hw), max(8192 // bc, 16)), num_warps=4), 1
    cfg = dict(GPU_DK_CFG)
    nblk = N * triton.cdiv(hw, cfg["BLOCK_S"])
    progs = triton.cdiv(C, cfg["BLOCK_C"]) * rows
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    split = max(1, min(nblk, (4 * sms + progs - 1) // progs))
    return cfg, split


# ----------------------------------------------------------------------------- grids, index range
#: CUDA's launch-grid limits: up to 2**31 - 1 programs on axis 0, 65535 on axes 1 and 2.
GRID_LIMITS = (2**31 - 1, 65535, 65535)
INT32_MAX = 2**31 - 1
#: The kernels index planes (an image's channels, or all (n, c) planes of a batch) and the
#: pixels of one plane in int32; both stay below this (headroom for the last block's lanes).
INDEX_LIMIT = INT32_MAX - 2**16


def checked_grid(kernel: str, *axes: int) -> tuple:
    """``axes`` as a launch grid, or a ValueError naming ``kernel`` when an axis has more
    programs than CUDA allows on it."""
    for i, (n, limit) in enumerate(zip(axes, GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"{kernel}: {n} programs on grid axis {i} exceed CUDA's limit of "
                             f"{limit}: the tensor is too large for one launch")
    return tuple(axes)


def dw_grid(rows: int, groups: int, hw: int, block_r: int, block_s: int) -> tuple:
    """Grid of the dw_taps forward and dx kernels for ``rows`` (n, c) planes of ``hw`` pixels in
    ``groups`` program groups (1 when the groups share the input): (pixel block fastest, then
    row block) on axis 0, as ``dw._row_pixel_blocks`` decodes it, and the group on axis 1."""
    return checked_grid("dw_taps", triton.cdiv(hw, block_s) * triton.cdiv(rows, block_r), groups)


def dk_grid(C: int, groups: int, kmax: int, split: int, block_c: int) -> tuple:
    """Grid of the dw_taps kernel-gradient kernel: (channel block, (group, tap row), split) with
    the tap row fastest on axis 1, as ``dw._dw_taps_bwd_dk`` decodes it; every program loops
    over its share of the (n, pixel block) pairs, so the image size is not on the grid."""
    return checked_grid("dw_taps dkernels", triton.cdiv(C, block_c), groups * kmax, split)


def epi_grid(hw: int, n: int, blocks: int, block_p: int) -> tuple:
    """Grid of the epilogue forward and dz kernels: (pixel block, image, output-channel or K
    block). The pixel blocks are on axis 0; the batch must fit axis 1 (65535 images)."""
    return checked_grid("pw_epilogue", triton.cdiv(hw, block_p), n, blocks)


def check_index_range(kernel: str, planes: int, hw: int) -> None:
    """A ValueError naming ``kernel`` when ``planes`` or the pixels per plane ``hw`` reach
    INDEX_LIMIT (the kernels index them with int32)."""
    if planes >= INDEX_LIMIT or hw >= INDEX_LIMIT:
        raise ValueError(f"{kernel}: {planes} planes of {hw} pixels each exceed the kernels' "
                         f"int32 indexing (both must stay below {INDEX_LIMIT})")


def plane_offsets_fit(shape, strides) -> bool:
    """True when every offset within one (H, W) plane, ``h * stride_h + w * stride_w``, fits in
    int32 (the kernels compute it in int32; the plane's start is int64)."""
    H, W = shape[-2:]
    return (H - 1) * strides[-2] + (W - 1) * strides[-1] <= INT32_MAX


def int32_planes(t):
    """``t``, or a contiguous copy of it when its in-plane offsets would overflow int32 (a
    channels-last or transposed view of a very large image); None stays None."""
    if t is None or plane_offsets_fit(t.shape, t.stride()):
        return t
    return t.contiguous()


@lru_cache(maxsize=256)
def _tables_host(taps: tuple, dilations: tuple):
    return (torch.tensor(taps, dtype=torch.int32), torch.tensor(dilations, dtype=torch.int32))


_DEV_TABLES: dict = {}


def _tables(taps, dilations, device):
    key = (tuple(taps), tuple(dilations), str(device))
    t = _DEV_TABLES.get(key)
    if t is None:
        th, dh = _tables_host(tuple(taps), tuple(dilations))
        t = (th.to(device), dh.to(device))
        if len(_DEV_TABLES) < 1024:
            _DEV_TABLES[key] = t
    return t


def check_taps_args(x, kernels, taps, dilations, shared_input):
    """Clear errors before a launch."""
    check_input(x, "dw_taps: ")
    if kernels.dim() != 4 or kernels.shape[-1] != kernels.shape[-2] or kernels.shape[-1] % 2 == 0:
        raise ValueError(f"dw_taps: kernels must be (G, C, KMAX, KMAX) with odd KMAX, got "
                         f"{tuple(kernels.shape)}")
    G, C, K, _ = kernels.shape
    if len(taps) != G * K * K or len(dilations) != G:
        raise ValueError(f"dw_taps: {G} groups of {K}x{K} need {G * K * K} tap flags and {G} "
                         f"dilations, got {len(taps)} and {len(dilations)}")
    if any(d < 1 for d in dilations):
        raise ValueError(f"dw_taps: dilations must be >= 1, got {tuple(dilations)}")
    check_input_matches(x, kernels, shared_input, "dw_taps: ")
    if x.device.type == "cpu" and not interpreting():
        raise ValueError("dw_taps: CPU tensors need TRITON_INTERPRET=1 set before hdnas.kernels "
                         "is imported")


def _launch_fwd(x, kernels, taps, dilations, relu_input, shared_input):
    N, _, H, W = x.shape
    G, C, K, _ = kernels.shape
    y = torch.empty((N, G * C, H, W), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    check_index_range("dw_taps", max(N * C, G * C), H * W)
    x = int32_planes(x)
    kc = kernels.contiguous()
    tt, dd = _tables(taps, dilations, x.device)
    cfg = _fwd_cfg(N * C, H * W)
    grid = dw_grid(N * C, 1 if shared_input else G, H * W, cfg["BLOCK_R"], cfg["BLOCK_S"])
    _dw._dw_taps_fwd[grid](x, kc, tt, dd, y, N, C, H, W, *x.stride(), G,
                           KMAX=K, RELU=bool(relu_input), SHARED=bool(shared_input),
                           ACC=_acc_dtype(x.dtype), **cfg)
    return y


def _launch_bwd(gy, x, kernels, taps, dilations, relu_input, shared_input):
    N, Cin, H, W = x.shape
    G, C, K, _ = kernels.shape
    gy = gy.contiguous()
    kc = kernels.contiguous()
    tt, dd = _tables(taps, dilations, x.device)
    dx = torch.empty((N, Cin, H, W), device=x.device, dtype=x.dtype)
    if dx.numel() == 0:
        return dx, torch.zeros_like(kernels)
    check_index_range("dw_taps_backward", max(N * C, G * C), H * W)
    x = int32_planes(x)
    acc = _acc_dtype(x.dtype)
    cfg = _fwd_cfg(N * C, H * W)
    grid = dw_grid(N * C, 1 if shared_input else G, H * W, cfg["BLOCK_R"], cfg["BLOCK_S"])
    _dw._dw_taps_bwd_dx[grid](gy, x, kc, tt, dd, dx, N, C, H, W, *x.stride(), G,
                              KMAX=K, RELU=bool(relu_input), SHARED=bool(shared_input),
                              ACC=acc, **cfg)
    dcfg, split = _dk_cfg(C, G * K, N, H * W, x.device)
    pdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = torch.empty((split, G, C, K * K), device=x.device, dtype=pdt)
    grid = dk_grid(C, G, K, split, dcfg["BLOCK_C"])
    _dw._dw_taps_bwd_dk[grid](gy, x, tt, dd, part, N, C, H, W, *x.stride(), G, split,
                              KMAX=K, KP=_pow2(K), RELU=bool(relu_input),
                              SHARED=bool(shared_input), ACC=acc, **dcfg)
    dk = part.sum(0).view(G, C, K, K)
    # inactive taps were never written: zero them (the table is tiny)
    mask = tt.view(G, 1, K, K) != 0
    dk = torch.where(mask, dk, torch.zeros((), dtype=pdt, device=x.device))
    return dx, dk.to(kernels.dtype)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op(f"{NS}::dw_taps", mutates_args=())
def dw_taps(x: torch.Tensor, kernels: torch.Tensor, taps: Sequence[int], dilations: Sequence[int],
            relu_input: bool, shared_input: bool) -> torch.Tensor:
    check_taps_args(x, kernels, taps, dilations, shared_input)
    return _launch_fwd(x, kernels, list(taps), list(dilations), relu_input, shared_input)


@dw_taps.register_fake
def _(x, kernels, taps, dilations, relu_input, shared_input):
    G, C = kernels.shape[:2]
    N, _, H, W = x.shape
    return x.new_empty((N, G * C, H, W))


@torch.library.custom_op(f"{NS}::dw_taps_backward", mutates_args=())
def dw_taps_backward(gy: torch.Tensor, x: torch.Tensor, kernels: torch.Tensor, taps: Sequence[int],
                     dilations: Sequence[int], relu_input: bool, shared_input: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd(gy, x, kernels, list(taps), list(dilations), relu_input, shared_input)


@dw_taps_backward.register_fake
def _(gy, x, kernels, taps, dilations, relu_input, shared_input):
    return x.new_empty(x.shape), kernels.new_empty(kernels.shape)


def _setup(ctx, inputs, output):
    x, kernels, taps, dilations, relu_input, shared_input = inputs
    ctx.save_for_backward(x, kernels)
    ctx.args = (list(taps), list(dilations), relu_input, shared_input)


def _backward(ctx, gy):
    x, kernels = ctx.saved_tensors
    dx, dk = dw_taps_backward(gy, x, kernels, *ctx.args)
    return dx, dk, None, None, None, None


dw_taps.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- primitives
def grouped_dw(x, kernels, ksizes, dilations, relu_input, shared_input):
    check_dw_args(x, kernels, ksizes, dilations, shared_input)
    return dw_taps(x, kernels, square_taps(ksizes, kernels.shape[-1]), list(dilations),
                   bool(relu_input), bool(shared_input))


def mixed_dw(x, weights, kernels, ksizes, dilations, relu_input, skip_weight=None):
    check_dw_args(x, kernels, ksizes, dilations, True, weights)
    G, C, kmax, _ = kernels.shape
    fold_skip = skip_weight is not None and not relu_input  # skip = centre tap of W_eff
    S, active, scat = union_layout(tuple(ksizes), tuple(dilations), kmax, fold_skip)
    scat = scat.to(device=x.device, dtype=x.dtype)
    wk = weights.to(x.dtype).view(G, 1, 1) * kernels.reshape(G, C, kmax * kmax)
    weff = torch.einsum("gck,gku->cu", wk, scat)  # (C, S*S)
    if fold_skip:
        onehot = torch.zeros(S * S, dtype=x.dtype, device=x.device)
        onehot[(S // 2) * S + S // 2] = 1
        weff = weff + torch.as_tensor(skip_weight, dtype=x.dtype, device=x.device) * onehot
    y = dw_taps(x, weff.view(1, C, S, S), list(active), [1], bool(relu_input), True)
    if skip_weight is not None and not fold_skip:
        y = y + skip_weight * x
    return y


# ----------------------------------------------------------------------------- pw epilogue
from hdnas.kernels import epilogue as _epi  # noqa: E402

GPU_EPI_FWD_CFG = dict(BLOCK_CO=64, BLOCK_P=64, BLOCK_K=32, num_warps=8)
#: dz: BLOCK_CO 16, not 32: at 32 the fp32 LeakyReLU variant spills on sm_90 (255 registers and
#: a 72-byte stack frame; 16 needs 153 registers and no stack), same output tile (K x pixels).
GPU_EPI_DZ_CFG = dict(BLOCK_CO=16, BLOCK_P=64, BLOCK_K=32, num_warps=8)
GPU_EPI_DW_CFG = dict(BLOCK_CO=64, BLOCK_P=32, BLOCK_K=32, num_warps=4)


def _ip(dtype):
    return "ieee" if dtype == torch.float32 else None


def _epi_cfg(kind, C, K, HW):
    if interpreting():
        return dict(BLOCK_CO=max(16, _pow2(C)), BLOCK_P=max(16, min(_pow2(HW), 1024)),
                    BLOCK_K=max(16, min(_pow2(K), 256)), num_warps=4)
    return dict({"fwd": GPU_EPI_FWD_CFG, "dz": GPU_EPI_DZ_CFG, "dw": GPU_EPI_DW_CFG}[kind])


def _strides4(t):
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def check_epilogue_args(z1, w1, z2, w2, add, res):
    if z1.dim() != 4 or w1.dim() != 2 or w1.shape[1] != z1.shape[1]:
        raise ValueError(f"pw_epilogue: z1 {tuple(z1.shape)} and w1 {tuple(w1.shape)} do not match")
    N, _, H, W = z1.shape
    C = w1.shape[0]
    if (z2 is None) != (w2 is None):
        raise ValueError("pw_epilogue: z2 and w2 go together")
    if z2 is not None and (z2.dim() != 4 or w2.dim() != 2 or w2.shape != (C, z2.shape[1])
                           or z2.shape[0] != N or z2.shape[2:] != z1.shape[2:]):
        raise ValueError(f"pw_epilogue: z2 {tuple(z2.shape)} and w2 {tuple(w2.shape)} do not match")
    for name, t in (("add", add), ("res", res)):
        if t is not None and tuple(t.shape) != (N, C, H, W):
            raise ValueError(f"pw_epilogue: {name} has shape {tuple(t.shape)}, expected {(N, C, H, W)}")
    for t in (w1, z2, w2, add, res):
        if t is not None and (t.dtype != z1.dtype or t.device != z1.device):
            raise ValueError("pw_epilogue: all tensors must share dtype and device")


@torch.library.custom_op(f"{NS}::pw_epilogue", mutates_args=())
def pw_epilogue(z1: torch.Tensor, w1: torch.Tensor, z2: torch.Tensor | None, w2: torch.Tensor | None,
                add: torch.Tensor | None, res: torch.Tensor | None, lrelu: bool) -> torch.Tensor:
    check_epilogue_args(z1, w1, z2, w2, add, res)
    N, K1, H, W = z1.shape
    C = w1.shape[0]
    out = torch.empty((N, C, H, W), device=z1.device, dtype=z1.dtype)
    if out.numel() == 0:
        return out
    K2 = w2.shape[1] if w2 is not None else 0
    check_index_range("pw_epilogue", max(C, K1, K2), H * W)
    z1, z2, add, res = (int32_planes(t) for t in (z1, z2, add, res))
    cfg = _epi_cfg("fwd", C, max(K1, K2), H * W)
    grid = epi_grid(H * W, N, triton.cdiv(C, cfg["BLOCK_CO"]), cfg["BLOCK_P"])
    w1c = w1.contiguous()
    w2c = w2.contiguous() if w2 is not None else w1c
    _epi._epi_fwd[grid](z1, w1c, z2 if z2 is not None else z1, w2c,
                        add if add is not None else out, res if res is not None else out, out,
                        C, K1, K2, H, W, *z1.stride(), *_strides4(z2), *_strides4(add), *_strides4(res),
                        HAS2=z2 is not None, HAS_ADD=add is not None, HAS_RES=res is not None,
                        LRELU=bool(lrelu), ACC=_acc_dtype(z1.dtype), IP=_ip(z1.dtype), **cfg)
    return out


@pw_epilogue.register_fake
def _(z1, w1, z2, w2, add, res, lrelu):
    N, _, H, W = z1.shape
    return z1.new_empty((N, w1.shape[0], H, W))


def _epi_dzgrad(g, out, w, lrelu, gpre):
    N, C, H, W = g.shape
    K = w.shape[1]
    dz = torch.empty((N, K, H, W), device=g.device, dtype=g.dtype)
    cfg = _epi_cfg("dz", C, K, H * W)
    grid = epi_grid(H * W, N, triton.cdiv(K, cfg["BLOCK_K"]), cfg["BLOCK_P"])
    _epi._epi_bwd_dz[grid](g, out, w.contiguous(), dz, gpre if gpre is not None else g, C, K, H * W,
                           LRELU=bool(lrelu), STORE_GPRE=gpre is not None, ACC=_acc_dtype(g.dtype),
                           IP=_ip(g.dtype), **cfg)
    return dz


def _epi_dwgrad(gpre, z):
    z = int32_planes(z)
    N, C, H, W = gpre.shape
    K = z.shape[1]
    cfg = _epi_cfg("dw", C, K, H * W)
    progs = triton.cdiv(C, cfg["BLOCK_CO"]) * triton.cdiv(K, cfg["BLOCK_K"])
    nblk = N * triton.cdiv(H * W, cfg["BLOCK_P"])
    if interpreting() or gpre.device.type != "cuda":
        split = 1
    else:
        sms = torch.cuda.get_device_properties(gpre.device).multi_processor_count
        split = max(1, min(nblk, (4 * sms + progs - 1) // progs))
    pdt = torch.float64 if gpre.dtype == torch.float64 else torch.float32
    part = torch.empty((split, C, K), device=gpre.device, dtype=pdt)
    grid = checked_grid("pw_epilogue dW", triton.cdiv(C, cfg["BLOCK_CO"]), triton.cdiv(K, cfg["BLOCK_K"]),
                        split)
    _epi._epi_bwd_dw[grid](gpre, z, part, N, C, K, H, W, split, *z.stride(),
                           ACC=_acc_dtype(gpre.dtype), IP=_ip(gpre.dtype), **cfg)
    return part.sum(0).to(gpre.dtype)


@torch.library.custom_op(f"{NS}::pw_epilogue_backward", mutates_args=())
def pw_epilogue_backward(g: torch.Tensor, out: torch.Tensor, z1: torch.Tensor, w1: torch.Tensor,
                         z2: torch.Tensor | None, w2: torch.Tensor | None, lrelu: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gpre, dz1, dw1, dz2, dw2); gpre is empty without lrelu (it is g), dz2/dw2 are empty
    when z2 is None."""
    g = g.contiguous()
    if g.numel() == 0:  # empty batch or image: no launch (a 0-sized grid is invalid on CUDA)
        e = g.new_empty(0)
        return (torch.zeros_like(g) if lrelu else e, torch.zeros_like(z1), torch.zeros_like(w1),
                torch.zeros_like(z2) if z2 is not None else e,
                torch.zeros_like(w2) if w2 is not None else e)
    gpre = torch.empty_like(g) if lrelu else None
    dz1 = _epi_dzgrad(g, out, w1, lrelu, gpre)
    gp = gpre if lrelu else g
    dw1 = _epi_dwgrad(gp, z1)
    if z2 is not None:
        dz2 = _epi_dzgrad(gp, out, w2, False, None)
        dw2 = _epi_dwgrad(gp, z2)
    else:
        dz2, dw2 = g.new_empty(0), g.new_empty(0)
    return (gpre if lrelu else g.new_empty(0)), dz1, dw1, dz2, dw2


@pw_epilogue_backward.register_fake
def _(g, out, z1, w1, z2, w2, lrelu):
    e = g.new_empty(0)
    return (g.new_empty(g.shape) if lrelu else e, z1.new_empty(z1.shape), w1.new_empty(w1.shape),
            z2.new_empty(z2.shape) if z2 is not None else e, w2.new_empty(w2.shape) if w2 is not None else e)


def _epi_setup(ctx, inputs, output):
    z1, w1, z2, w2, add, res, lrelu = inputs
    ctx.save_for_backward(z1, w1, z2, w2, output)
    ctx.flags = (add is not None, res is not None, bool(lrelu))


def _epi_backward(ctx, g):
    z1, w1, z2, w2, out = ctx.saved_tensors
    has_add, has_res, lrelu = ctx.flags
    gpre, dz1, dw1, dz2, dw2 = pw_epilogue_backward(g, out, z1, w1, z2, w2, lrelu)
    if not lrelu:
        gpre = g
    return (dz1, dw1, dz2 if z2 is not None else None, dw2 if w2 is not None else None,
            gpre if has_add else None, gpre if has_res else None, None)


pw_epilogue.register_autograd(_epi_backward, setup_context=_epi_setup)
