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
and two layout transposes of X_f and Y_f are the rest. The backward (``_FFTConv``) is the same
algebra transposed: dx is the 'same' conv of the output gradient with the transposed, flipped
kernel, dW is ``X_f^H G_f`` per bin taken back to the taps, so the gradients are exact up to
round-off; only x and W are saved, as the direct conv saves them. The round-off of the
FFT route is bounded norm-wise (about ``eps * log2(Lh Lw)`` times the norms) rather than per
output; measured on random data it is 5-8x *smaller* than the direct conv's largest error
(fp32, C = 48, against fp64).

``dense_conv`` picks the route per call shape: FFT is eligible on a CPU for fp32/fp64, K >= 5
and a batch of at least 2 (a GEMM of one row per bin is slow); which one runs is decided once
per shape by timing both (forward, plus backward when autograd is on) on random data of that
shape, as ``torch.backends.cudnn.benchmark`` does, because which is faster depends on the CPU
(oneDNN's direct conv runs near the FMA peak, which differs far more between CPUs than the FFT
route does). ``HDNAS_DENSE_CONV=direct|fft|auto`` (default auto) forces a route (``fft``: every
fp32/fp64 call, on any device); ``choices()`` lists the decisions made so far. A run keeps its
decisions (``export_choices`` into its checkpoint, ``load_choices`` on resume, so a resumed run
takes the same routes and stays bit-identical), and ``pin(route)`` fixes the route for the
process without timing anything (``--deterministic``; it takes precedence over the variable).
``conv_same`` is the plain twin (``F.conv2d``).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["conv_same", "conv_same_fft", "dense_conv", "fft_size", "route", "choices",
           "export_choices", "load_choices", "pin", "FFT_MIN_K", "FFT_MIN_BATCH"]

FFT_MIN_K = 5       # at K = 3 the direct conv is 9 taps: measured 1.4x faster than the FFT route
FFT_MIN_BATCH = 2   # the per-bin GEMM has N rows; at N = 1 it is a slow batched GEMV
_ROUTES = ("auto", "direct", "fft")
log = logging.getLogger("hdnas")
_choices: dict[tuple, str] = {}
_lock = threading.Lock()
_pinned: str | None = None


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
    from its taps; and their adjoints for the weight gradient, ``Eu^H`` and ``S = EvT^H diag(m)``
    with m the adjoint scaling of irfft2 (1 / (Lh Lw); twice that for the half-spectrum columns
    that stand for two conjugate bins, as torch's irfft backward counts them). Made in float64,
    then cast."""
    P = K // 2
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    a = torch.arange(K, dtype=torch.float64) - P
    u = torch.arange(Lh, dtype=torch.float64)
    V = Lw // 2 + 1
    v = torch.arange(V, dtype=torch.float64)
    Eu = torch.polar(torch.ones(Lh, K, dtype=torch.float64), 2 * math.pi * u[:, None] * a / Lh)
    EvT = torch.polar(torch.ones(V, K, dtype=torch.float64), 2 * math.pi * v[:, None] * a / Lw)
    m = torch.full((V,), 2.0 / (Lh * Lw), dtype=torch.float64)
    m[0] = 1.0 / (Lh * Lw)
    if Lw % 2 == 0:
        m[-1] = 1.0 / (Lh * Lw)
    return tuple(t.to(device, cdt) for t in (Eu, EvT, Eu.conj().T, EvT.conj().T * m))


def _fft_dtypes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch.fft has no half-precision CPU kernels: fp32/fp64 only, x and w alike."""
    return x.dtype in (torch.float32, torch.float64) and w.dtype == x.dtype


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    N, I, H, W = x.shape
    O, I2, K, K2 = w.shape
    if I2 != I or K != K2 or K % 2 == 0:
        raise ValueError(f"conv_same_fft: weight {tuple(w.shape)} does not fit input "
                         f"{tuple(x.shape)} (need (O, {I}, K, K), K odd)")
    if not _fft_dtypes(x, w):
        raise ValueError(f"conv_same_fft: fp32/fp64 only, got {x.dtype} and {w.dtype}")


def _grid(x: torch.Tensor, w: torch.Tensor):
    H, W, K = x.shape[-2], x.shape[-1], w.shape[-1]
    return fft_size(H + K // 2), fft_size(W + K // 2)


def _spectrum(x: torch.Tensor, Lh: int, Lw: int, adjoint: bool = False) -> torch.Tensor:
    """rfft2 of x zero-padded to Lh x Lw, as (bins (v u), N, C); ``adjoint``: its conjugate
    transpose, (bins, C, N)."""
    N, C = x.shape[:2]
    if not adjoint:
        return torch.fft.rfft2(x, s=(Lh, Lw)).permute(3, 2, 0, 1).contiguous().view(-1, N, C)
    z = torch.fft.rfft2(x, s=(Lh, Lw)).permute(3, 2, 1, 0).contiguous()
    torch.view_as_real(z)[..., 1].neg_()
    return z.view(-1, C, N)


def _kernel_spectrum(w: torch.Tensor, Lh: int, Lw: int) -> torch.Tensor:
    """The correlation kernel's spectrum from its K x K taps, as (bins (v u), I, O): two plain
    GEMMs, over the rows a by ``Eu`` and then over the columns b by ``EvT``, with one transpose
    between (a batched GEMM per column frequency instead measured 3x slower: its inner
    dimension is K)."""
    O, I, K, _ = w.shape
    Eu, EvT, _, _ = _dft_mats(K, Lh, Lw, w.dtype, w.device)
    wr = w.permute(2, 3, 1, 0).reshape(K, K * I * O).to(Eu.dtype)              # a, (b i o)
    T = torch.matmul(Eu, wr).view(Lh, K, I * O).transpose(0, 1).contiguous()   # b, u, (i o)
    return torch.matmul(EvT, T.view(K, Lh * I * O)).view(-1, I, O)             # (v u), i, o


def _kernel_spectrum_grad(dK: torch.Tensor, w: torch.Tensor, Lh: int, Lw: int) -> torch.Tensor:
    """The weight gradient from ``dK = X_f^H G_f`` (bins, I, O), G_f the plain rfft2 of the output
    gradient: the adjoint of irfft2 + crop and of ``_kernel_spectrum``, both folded into its two
    small DFT matrices (``_dft_mats``)."""
    O, I, K, _ = w.shape
    _, _, EuH, S = _dft_mats(K, Lh, Lw, w.dtype, w.device)
    gT = torch.matmul(S, dK.reshape(S.shape[1], Lh * I * O)).view(K, Lh, I * O)   # b, u, (i o)
    gT = gT.transpose(0, 1).reshape(Lh, K * I * O)                              # u, (b i o)
    gw = torch.matmul(EuH, gT).real                                             # a, (b i o)
    return gw.reshape(K, K, I, O).permute(3, 2, 0, 1).contiguous()


def _output(Yf: torch.Tensor, Lh: int, Lw: int, H: int, W: int) -> torch.Tensor:
    """irfft2 of (bins (v u), N, O) and the H x W crop."""
    _, N, O = Yf.shape
    y = torch.fft.irfft2(Yf.view(-1, Lh, N, O).permute(2, 3, 1, 0).contiguous(), s=(Lh, Lw))
    return y[..., :H, :W]


class _FFTConv(torch.autograd.Function):
    """Saves only x and w, as the direct conv does (keeping the two input spectra would add ~17 MB
    per mixed op at batch 16: +22 % of a search step's peak memory, measured). Backward: the
    input gradient is the 'same' conv of the output gradient with the transposed, flipped
    kernel (by FFT too); the weight gradient is ``X_f^H G_f`` per bin taken back to the K x K
    taps by the adjoint of the kernel spectrum (``_kernel_spectrum_grad``)."""

    @staticmethod
    def forward(ctx, x, w):
        Lh, Lw = _grid(x, w)
        ctx.save_for_backward(x, w)
        Yf = torch.bmm(_spectrum(x, Lh, Lw), _kernel_spectrum(w, Lh, Lw))
        return _output(Yf, Lh, Lw, x.shape[-2], x.shape[-1]).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        Lh, Lw = _grid(x, w)
        Gf = _spectrum(gy.contiguous(), Lh, Lw)                                   # bins, N, O
        gx = gw = None
        if need_x:
            Kt = _kernel_spectrum(w.transpose(0, 1).flip(-1, -2), Lh, Lw)          # bins, O, I
            gx = _output(torch.bmm(Gf, Kt), Lh, Lw, x.shape[-2], x.shape[-1]).contiguous()
        if need_w:
            dK = torch.bmm(_spectrum(x, Lh, Lw, adjoint=True), Gf)                  # bins, I, O
            gw = _kernel_spectrum_grad(dK, w, Lh, Lw)
        return gx, gw


def conv_same_fft(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``conv_same(x, w)`` by FFT (fp32/fp64, any device torch.fft serves); differentiable once
    (nothing in hdnas takes a second derivative: darts2 uses finite differences)."""
    _check(x, w)
    return _FFTConv.apply(x, w)


def pin(r: str | None) -> None:
    """Fix the route for this process (``direct`` or ``fft``; ``None`` returns to
    ``HDNAS_DENSE_CONV``): nothing is timed, so the choice does not depend on the machine."""
    global _pinned
    if r is not None and r not in _ROUTES:
        raise ValueError(f"dense conv route {r!r}: expected one of {', '.join(_ROUTES)}")
    _pinned = r


def route() -> str:
    """The pinned route, else ``HDNAS_DENSE_CONV``: auto (default), direct or fft."""
    if _pinned is not None:
        return _pinned
    r = os.environ.get("HDNAS_DENSE_CONV", "auto").strip().lower() or "auto"
    if r not in _ROUTES:
        raise ValueError(f"HDNAS_DENSE_CONV={r!r}: expected one of {', '.join(_ROUTES)}")
    return r


def _eligible(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and _fft_dtypes(x, w) and w.shape[-1] >= FFT_MIN_K
            and x.shape[0] >= FFT_MIN_BATCH)


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


@torch.compiler.assume_constant_result
def _threads() -> int:
    """The thread count of a route's key; a compiled forward keeps the one it was traced with
    (Dynamo cannot put an int-returning torch call into a graph)."""
    return torch.get_num_threads()


def _decide(x: torch.Tensor, w: torch.Tensor) -> str:
    backward = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    key = (tuple(x.shape), tuple(w.shape), x.dtype, backward, _threads())
    # a known route is read without the lock (one dict read is atomic), so that a compiled
    # forward traces this path without a graph break (Dynamo cannot enter a lock); a shape not
    # yet timed is timed there in a break: one eager forward of the shape first avoids it
    # (tests/engine/test_compile.py, bench/bench_compile.py)
    hit = _choices.get(key)
    if hit is None:
        with torch.set_grad_enabled(backward):
            direct = _time(conv_same, x.detach(), w.detach(), backward)
            fft = _time(conv_same_fft, x.detach(), w.detach(), backward)
        hit = "fft" if fft < direct else "direct"
        with _lock:
            _choices[key] = hit
        log.info("dense conv %s x %s (%s%s): %s (timed: direct %.1f ms, FFT %.1f ms; "
                 "HDNAS_DENSE_CONV forces one)", tuple(x.shape), tuple(w.shape),
                 str(x.dtype).replace("torch.", ""), ", fwd+bwd" if backward else ", fwd", hit,
                 direct * 1e3, fft * 1e3)
    return hit


def dense_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``conv_same(x, w)`` by the route ``HDNAS_DENSE_CONV`` names, or in ``auto`` by the faster
    one measured for this shape (FFT only where it is eligible, see the module doc)."""
    r = route()
    if r == "fft" and _fft_dtypes(x, w):
        return conv_same_fft(x, w)
    if r == "auto" and _eligible(x, w) and _decide(x, w) == "fft":
        return conv_same_fft(x, w)
    return conv_same(x, w)


def choices() -> dict[tuple, str]:
    """The routes ``auto`` picked so far: {(x shape, w shape, dtype, backward, threads): route}."""
    with _lock:
        return dict(_choices)


def export_choices() -> list[dict]:
    """The decisions so far as plain data (JSON and the safe checkpoint loader take it)."""
    return [{"x": list(k[0]), "w": list(k[1]), "dtype": str(k[2]).replace("torch.", ""),
             "backward": bool(k[3]), "threads": int(k[4]), "route": r}
            for k, r in choices().items()]


def load_choices(records) -> int:
    """Adopt decisions made earlier (``export_choices``), e.g. by the run being resumed, so the
    same shapes take the same routes without timing; returns how many were adopted. Malformed
    records raise ValueError."""
    new = {}
    for rec in records or ():
        try:
            key = (tuple(int(v) for v in rec["x"]), tuple(int(v) for v in rec["w"]),
                   getattr(torch, str(rec["dtype"])), bool(rec["backward"]), int(rec["threads"]))
            r = str(rec["route"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"a recorded dense-conv route is malformed ({rec!r}: {e})") from None
        if r not in ("direct", "fft") or not isinstance(key[2], torch.dtype):
            raise ValueError(f"a recorded dense-conv route is malformed: {rec!r}")
        new[key] = r
    with _lock:
        _choices.update(new)
    return len(new)
