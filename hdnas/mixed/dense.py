"""The mixed op's merged dense conv ('same' padding, stride 1, groups 1): direct or by FFT.

The merged composition (hdnas.mixed.merged, step 1) runs the four dense candidates as one conv
with the alpha-weighted 7x7 kernel ``W``. In a search step that conv needs its forward, its input
gradient and its weight gradient (d alpha of the dense candidates is ``<W_k, dW>``), 3 x 49 C^2
MACs per pixel; it is the largest single cost of the step. By the convolution theorem the same
three products cost one complex C x C GEMM per frequency bin each, plus a few 2-D FFTs:

    Y_f[n, o] = sum_i K_f[o, i] X_f[n, i]      (f: the rfft2 bins of an Lh x Lw grid)

with ``Lh >= H + K//2`` (and ``Lw >= W + K//2``) so that the circular convolution equals the
zero-padded linear one on the H x W outputs, and ``K_f`` the DFT of the kernel taken straight
from its K x K taps by two small DFT-matrix products (no padded kernel planes are transformed).
At C = 48, 32 x 32 patches, K = 7 that is about 1/18 of the direct conv's real MACs; the FFTs
and two layout transposes of X_f and Y_f are the rest. The gradients come from autograd
through these ops (all differentiable), so they are exact up to round-off. The round-off of the
FFT route is bounded norm-wise (about ``eps * log2(Lh Lw)`` times the norms) rather than per
output; measured on random data it is 5-8x *smaller* than the direct conv's largest error
(fp32, C = 48, against fp64).

``dense_conv`` picks the route per call shape: FFT is eligible on a CPU for fp32/fp64, K >= 5
and a batch of at least 2 (a GEMM of one row per bin is slow); which one runs is decided once
per shape by timing both (forward, plus backward when autograd is on) on random data of that
shape, as ``torch.backends.cudnn.benchmark`` does, because which is faster depends on the CPU
(oneDNN's direct conv runs near the FMA peak, which differs far more between CPUs than the FFT
route does). ``HDNAS_DENSE_CONV=direct|fft|auto`` (default auto) forces a route (``fft``: for every fp32/fp64 call, on any device); ``choices()``
lists the decisions made so far. ``conv_same`` is the plain twin (``F.conv2d``).
"""
from __future__ import annotations

import functools
import math
import os
import threading
import time

import torch
import torch.nn.functional as F

__all__ = ["conv_same", "conv_same_fft", "dense_conv", "fft_size", "route", "choices",
           "FFT_MIN_K", "FFT_MIN_BATCH"]

FFT_MIN_K = 5       # at K = 3 the direct conv is 9 taps: measured 1.4x faster than the FFT route
FFT_MIN_BATCH = 2   # the per-bin GEMM has N rows; at N = 1 it is a slow batched GEMV
_ROUTES = ("auto", "direct", "fft")
_choices: dict[tuple, str] = {}
_lock = threading.Lock()


def conv_same(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The plain twin: ``F.conv2d(x, w, padding=K // 2)`` (odd square K)."""
    return F.conv2d(x, w, padding=w.shape[-1] // 2)


def fft_size(n: int) -> int:
    """The smallest even 5-smooth integer >= n (fast transform sizes of torch.fft)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1 and n % 2 == 0:
            return n
        n += 1


@functools.lru_cache(maxsize=64)
def _dft_mats(K: int, Lh: int, Lw: int, dtype: torch.dtype, device: torch.device):
    """``Eu[u, a] = exp(2 pi i u (a - P) / Lh)`` (Lh x K) and ``EvT[v, b]`` likewise over the
    Lw // 2 + 1 half-spectrum columns: the spectrum of a K x K correlation kernel centred at P,
    from its taps. Made in float64, then cast."""
    P = K // 2
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    a = torch.arange(K, dtype=torch.float64) - P
    u = torch.arange(Lh, dtype=torch.float64)
    v = torch.arange(Lw // 2 + 1, dtype=torch.float64)
    Eu = torch.polar(torch.ones(Lh, K, dtype=torch.float64), 2 * math.pi * u[:, None] * a / Lh)
    EvT = torch.polar(torch.ones(len(v), K, dtype=torch.float64), 2 * math.pi * v[:, None] * a / Lw)
    return Eu.to(device, cdt), EvT.to(device, cdt)


def _transpose(z: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """``z.permute(perm).contiguous()`` for a complex tensor, copied through its real view (a
    strided complex copy measured 10-20x slower)."""
    r = torch.view_as_real(z).permute(*perm, z.dim()).contiguous()
    return torch.view_as_complex(r)


def conv_same_fft(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``conv_same(x, w)`` by FFT (fp32/fp64, any device torch.fft serves); differentiable."""
    N, I, H, W = x.shape
    O, I2, K, K2 = w.shape
    if I2 != I or K != K2 or K % 2 == 0:
        raise ValueError(f"conv_same_fft: weight {tuple(w.shape)} does not fit input "
                         f"{tuple(x.shape)} (need (O, {I}, K, K), K odd)")
    if x.dtype not in (torch.float32, torch.float64) or w.dtype != x.dtype:
        raise ValueError(f"conv_same_fft: fp32/fp64 only, got {x.dtype} and {w.dtype}")
    P = K // 2
    Lh, Lw = fft_size(H + P), fft_size(W + P)
    V = Lw // 2 + 1
    Eu, EvT = _dft_mats(K, Lh, Lw, x.dtype, x.device)
    # kernel spectrum in (v, u, i, o) order: over the columns b, then the rows a
    wr = w.permute(3, 2, 1, 0).reshape(K, K * I * O).to(EvT.dtype)            # b, (a i o)
    T = torch.matmul(EvT, wr).view(V, K, I * O)                                 # v, a, (i o)
    Kf = torch.matmul(Eu, T).view(V * Lh, I, O)                                 # (v u), i, o
    Xf = _transpose(torch.fft.rfft2(x, s=(Lh, Lw)), (3, 2, 0, 1)).view(V * Lh, N, I)
    Yf = torch.bmm(Xf, Kf).view(V, Lh, N, O)
    y = torch.fft.irfft2(_transpose(Yf, (2, 3, 1, 0)), s=(Lh, Lw))
    return y[..., :H, :W]


def route() -> str:
    """``HDNAS_DENSE_CONV``: auto (default), direct or fft."""
    r = os.environ.get("HDNAS_DENSE_CONV", "auto").strip().lower() or "auto"
    if r not in _ROUTES:
        raise ValueError(f"HDNAS_DENSE_CONV={r!r}: expected one of {', '.join(_ROUTES)}")
    return r


def _eligible(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and w.dtype == x.dtype and w.shape[-1] >= FFT_MIN_K and x.shape[0] >= FFT_MIN_BATCH)


def _time(fn, x, w, backward: bool, reps: int = 2) -> float:
    xs = torch.randn_like(x).requires_grad_(backward)
    ws = (torch.randn_like(w) * 0.05).requires_grad_(backward)
    best = math.inf
    for i in range(reps + 1):
        t = time.perf_counter()
        y = fn(xs, ws)
        if backward:
            torch.autograd.grad(y, (xs, ws), torch.ones_like(y))
        if i:
            best = min(best, time.perf_counter() - t)
    return best


def _decide(x: torch.Tensor, w: torch.Tensor) -> str:
    backward = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    key = (tuple(x.shape), tuple(w.shape), x.dtype, backward, torch.get_num_threads())
    with _lock:
        hit = _choices.get(key)
    if hit is None:
        with torch.set_grad_enabled(backward):
            direct = _time(conv_same, x.detach(), w.detach(), backward)
            fft = _time(conv_same_fft, x.detach(), w.detach(), backward)
        hit = "fft" if fft < direct else "direct"
        with _lock:
            _choices[key] = hit
    return hit


def dense_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``conv_same(x, w)`` by the route ``HDNAS_DENSE_CONV`` names, or in ``auto`` by the faster
    one measured for this shape (FFT only where it is eligible, see the module doc)."""
    r = route()
    if r == "fft" and x.dtype in (torch.float32, torch.float64) and w.dtype == x.dtype:
        return conv_same_fft(x, w)
    if r == "auto" and _eligible(x, w) and _decide(x, w) == "fft":
        return conv_same_fft(x, w)
    return conv_same(x, w)


def choices() -> dict[tuple, str]:
    """The routes ``auto`` picked so far: {(x shape, w shape, dtype, backward, threads): route}."""
    with _lock:
        return dict(_choices)
