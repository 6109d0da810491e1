"""PSNR and SSIM on the Y channel, as the SR papers' MATLAB scripts compute them.

Why each choice:

* Y is BT.601 as MATLAB's ``rgb2ycbcr`` on [0, 255] values:
  ``16 + (65.481 R + 128.553 G + 24.966 B) / 255``, kept in float (not rounded to uint8). EDSR's
  ``calc_psnr`` uses the same coefficients x256/255 without the +16, which gives the same PSNR.
* Inputs are uint8-range images (uint8 or float arrays/tensors in 0..255, HWC numpy or
  (..., 3, H, W) torch). A float SR output is first quantised to 8 bits (clamp, round half away
  from zero) as the saved PNGs the published tables were measured on.
* A single-channel image is scored on its own values (a grey image *is* its luminance), as
  MATLAB scripts do. Two conventions meet here and both are needed: the published bicubic rows
  (docs/method.md §7c) score Set14's grey image on its own values (replicating it to RGB instead raises
  bicubic Set14 x2 by about 0.09 dB, out of tolerance), while the released tiny checkpoint's reference scores (§7b)
  come from a loader that replicates grey images to RGB, so Y = 16 + 0.859 v for both SR and HR.
  ``load_rgb(gray=...)`` picks the convention; see ``hdnas.eval.protocol``.
* ``shave`` pixels (= scale) are cut from every border before scoring.
* SSIM is Wang et al.'s ``ssim_index.m``: 11x11 Gaussian window (sigma 1.5, normalised), 'valid'
  filtering, K1 = 0.01, K2 = 0.03, L = 255, mean of the SSIM map, in float64.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hdnas.data.imresize import matlab_round

__all__ = ["rgb_to_y", "y_of", "quantize", "psnr", "ssim", "gaussian_window"]

_Y = (65.481, 128.553, 24.966)


def _as_tensor(img) -> torch.Tensor:
    """uint8-range image -> float64 tensor; numpy input is HWC (or HW), torch is (..., C, H, W)."""
    if isinstance(img, np.ndarray):  # numpy images are HWC (or HW)
        t = torch.from_numpy(np.ascontiguousarray(img))
        img = t.movedim(-1, 0) if t.dim() == 3 else t
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(img).__name__}")
    return img.to(torch.float64)


def quantize(img) -> torch.Tensor:
    """8-bit quantisation of an SR output: clamp to 0..255, round half away from zero."""
    t = _as_tensor(img)
    return matlab_round(t.clamp(0, 255))


def rgb_to_y(img) -> torch.Tensor:
    """BT.601 luma (MATLAB ``rgb2ycbcr``, with +16) of an RGB image, channel axis -3."""
    t = _as_tensor(img)
    if t.dim() < 3 or t.shape[-3] != 3:
        raise ValueError(f"rgb_to_y expects 3 channels on axis -3, got shape {tuple(t.shape)}")
    r, g, b = t.unbind(-3)
    return 16.0 + (_Y[0] * r + _Y[1] * g + _Y[2] * b) / 255.0


def y_of(img) -> torch.Tensor:
    """The channel that is scored: Y for RGB, the values themselves for a 1-channel image."""
    t = _as_tensor(img)
    if t.dim() >= 3 and t.shape[-3] == 3:
        return rgb_to_y(t)
    if t.dim() >= 3 and t.shape[-3] == 1:
        return t.squeeze(-3)
    if t.dim() == 2:
        return t
    raise ValueError(f"expected an RGB or grey image, got shape {tuple(t.shape)}")


def _prepare(sr, hr, shave: int, y_only: bool):
    sr, hr = quantize(sr), quantize(hr)
    if sr.shape != hr.shape:
        raise ValueError(f"SR {tuple(sr.shape)} and HR {tuple(hr.shape)} differ in shape")
    if y_only:
        sr, hr = y_of(sr), y_of(hr)
    if shave:
        if min(sr.shape[-2:]) <= 2 * shave:
            raise ValueError(f"image {tuple(sr.shape[-2:])} is too small for shave {shave}")
        sr = sr[..., shave:-shave, shave:-shave]
        hr = hr[..., shave:-shave, shave:-shave]
    return sr, hr


def psnr(sr, hr, shave: int = 0, y_only: bool = True) -> float:
    """PSNR in dB (peak 255) of one image pair; +inf for identical images."""
    sr, hr = _prepare(sr, hr, shave, y_only)
    mse = torch.mean((sr - hr) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """MATLAB ``fspecial('gaussian', size, sigma)``, float64."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax ** 2) / (2 * sigma ** 2))
    w = g[:, None] * g[None, :]
    return w / w.sum()


def _ssim_2d(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> float:
    """SSIM of two 2-D float64 images with a separable normalised 1-D Gaussian ``g`` ('valid')."""
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    maps = torch.stack([x, y, x * x, y * y, x * y])[None]  # (1, 5, H, W)
    k = g.numel()
    maps = F.conv2d(maps, g.view(1, 1, 1, k).expand(5, 1, 1, k), groups=5)
    mu_x, mu_y, exx, eyy, exy = F.conv2d(maps, g.view(1, 1, k, 1).expand(5, 1, k, 1), groups=5)[0]
    sxx, syy, sxy = exx - mu_x ** 2, eyy - mu_y ** 2, exy - mu_x * mu_y
    m = ((2 * mu_x * mu_y + C1) * (2 * sxy + C2)) / ((mu_x ** 2 + mu_y ** 2 + C1) * (sxx + syy + C2))
    return m.mean().item()


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax ** 2) / (2 * sigma ** 2))
    return g / g.sum()  # outer(g, g) == fspecial('gaussian', size, sigma)


def ssim(sr, hr, shave: int = 0, y_only: bool = True) -> float:
    """MATLAB-style SSIM (Gaussian 11x11, sigma 1.5) of one image pair on Y; without ``y_only``
    the mean over channels."""
    sr, hr = _prepare(sr, hr, shave, y_only)
    if min(sr.shape[-2:]) < 11:
        raise ValueError(f"image {tuple(sr.shape[-2:])} is smaller than the 11x11 SSIM window")
    w = _gaussian_1d()
    if sr.dim() == 2:
        return _ssim_2d(sr, hr, w)
    xs, ys = sr.reshape(-1, *sr.shape[-2:]), hr.reshape(-1, *hr.shape[-2:])
    return float(np.mean([_ssim_2d(a, b, w) for a, b in zip(xs, ys)]))
