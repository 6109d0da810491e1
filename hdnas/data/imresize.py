"""MATLAB-compatible bicubic ``imresize`` in torch (batched, any scale, antialiased when shrinking).

Why: the published SR tables use LR images made by MATLAB's ``imresize(HR, 1/s, 'bicubic')``
and bicubic baselines upscaled the same way; PIL/OpenCV/torch bicubic differ by several grey
levels, which moves PSNR by tenths of a dB.

The algorithm follows MATLAB's ``imresize.m`` (``contributions``):

* Keys cubic kernel with a = -0.5; when shrinking with antialiasing the kernel is stretched to
  width 4/s and scaled by s;
* output pixel i (1-based) maps to ``u = i/s + 0.5*(1 - 1/s)`` in the input;
* out-of-range taps are clamped to the edge (edge replication), as ``imresize.m`` does; several
  Python ports mirror the border symmetrically instead, which changes the outermost LR rows and
  columns by up to ~10 grey levels on Set14;
* per-pixel weights are normalised to sum to 1, all-zero taps are dropped;
* the dimension with the smaller scale is resized first (height first on ties);
* with ``scale`` the output size is ``ceil(in * scale)``; with ``size`` the per-dimension
  scale is ``out / in``.

``imresize`` keeps float values unclamped (an upscaled bicubic can overshoot 0..255).
``imresize_uint8`` reproduces MATLAB on uint8 images, which rounds (half away from zero) and
saturates to uint8 after *each* one-dimensional pass, because ``imresizemex`` returns the class
of its input. With this per-pass rounding the x2 LR images made from the Set5/Set14 HR images
equal MATLAB's LR images in every value; one rounding at the end is off on about 14% of the
values (tests/test_imresize.py).
"""
from __future__ import annotations

import math

import torch

__all__ = ["imresize", "imresize_uint8", "matlab_round", "to_uint8", "output_size"]


def _cubic(x: torch.Tensor) -> torch.Tensor:
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _contributions(in_len: int, out_len: int, scale: float, antialias: bool):
    """Weights (out_len, P) and 0-based input indices (out_len, P), as MATLAB computes them."""
    kernel_width = 4.0
    shrink = scale < 1 and antialias
    if shrink:
        kernel_width = kernel_width / scale
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - kernel_width / 2)
    P = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + torch.arange(P, dtype=torch.float64)[None, :]  # 1-based
    d = u[:, None] - idx
    w = scale * _cubic(scale * d) if shrink else _cubic(d)
    w = w / w.sum(dim=1, keepdim=True)
    # MATLAB clamps out-of-range indices ("has the effect of replicating end-points")
    idx = (idx.long() - 1).clamp(0, in_len - 1)
    keep = (w != 0).any(dim=0)
    return w[:, keep], idx[:, keep]


def output_size(in_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """MATLAB's output size for a scale factor: ``ceil(in * scale)``."""
    return tuple(int(math.ceil(n * scale - 1e-9)) for n in in_hw)


def _resolve(in_hw, scale, size):
    if (scale is None) == (size is None):
        raise ValueError("imresize: give exactly one of scale or size")
    if size is not None:
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"imresize: size must be two positive ints (H, W), got {size}")
        scales = (size[0] / in_hw[0], size[1] / in_hw[1])
        return size, scales
    scale = float(scale)
    if not scale > 0:
        raise ValueError(f"imresize: scale must be positive, got {scale}")
    return output_size(in_hw, scale), (scale, scale)


def _resize_dim(x: torch.Tensor, dim: int, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Resize along ``dim`` (-2 or -1) with a gather per tap: out = sum_p w[:, p] * x[idx[:, p]]."""
    w = w.to(device=x.device, dtype=x.dtype)
    idx = idx.to(x.device)
    out = None
    for p in range(w.shape[1]):
        xi = x.index_select(dim, idx[:, p])
        wp = w[:, p].view(-1, 1) if dim == -2 else w[:, p]
        term = xi * wp
        out = term if out is None else out + term
    return out


def _plan(in_hw, scale, size, antialias):
    out_hw, scales = _resolve(in_hw, scale, size)
    order = sorted(range(2), key=lambda d: (scales[d], d))  # smaller scale first, H on ties
    steps = []
    for d in order:
        if out_hw[d] == in_hw[d] and scales[d] == 1:
            continue
        w, idx = _contributions(in_hw[d], out_hw[d], scales[d], antialias)
        steps.append((d - 2, w, idx))
    return steps


def imresize(x: torch.Tensor, scale: float | None = None, size: tuple[int, int] | None = None,
             antialias: bool = True) -> torch.Tensor:
    """Bicubic resize of a float tensor (..., H, W) exactly as MATLAB ``imresize`` (no rounding,
    no clamping). Use float64 when the result is to be rounded and compared with MATLAB."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("imresize expects a tensor of shape (..., H, W)")
    if not x.is_floating_point():
        raise TypeError(f"imresize works on float tensors, got {x.dtype}; "
                        "use imresize_uint8 for MATLAB's uint8 behaviour")
    for dim, w, idx in _plan(tuple(x.shape[-2:]), scale, size, antialias):
        x = _resize_dim(x, dim, w, idx)
    return x


def matlab_round(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (MATLAB), not half to even (torch.round)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """MATLAB's double -> uint8 conversion: round half away from zero, saturate to 0..255."""
    return matlab_round(x).clamp_(0, 255).to(torch.uint8)


def imresize_uint8(x: torch.Tensor, scale: float | None = None,
                   size: tuple[int, int] | None = None, antialias: bool = True,
                   per_pass: bool = True) -> torch.Tensor:
    """MATLAB ``imresize`` on a uint8 image (..., H, W) -> uint8, e.g. to make LR images.

    ``per_pass=True`` rounds and saturates after each 1-D pass, as MATLAB does for uint8 input;
    ``per_pass=False`` rounds once at the end (MATLAB on a double image, then ``uint8``)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        raise TypeError("imresize_uint8 expects a uint8 tensor of shape (..., H, W)")
    y = x.to(torch.float64)
    steps = _plan(tuple(x.shape[-2:]), scale, size, antialias)
    for dim, w, idx in steps:
        y = _resize_dim(y, dim, w, idx)
        if per_pass:
            y = matlab_round(y).clamp_(0, 255)
    return to_uint8(y)
