"""Triton kernels for the alpha-block pointwise GEMM with its epilogue (docs/kernels.md §8.2 item 3):

    out[n, :, p] = act( W1 @ Z1[n, :, p] + W2 @ Z2[n, :, p] + add[n, :, p] + res[n, :, p] )

W_b = [a_1 PW_1 | ... ] (built in PyTorch), Z1 = the sep ops' second-stage output, Z2 = the dil
ops' first-stage output (a channel slice of the stage-1 buffer, read in place), add = the merged
dense-conv output (a channel slice of the dense+distill conv), res = x, act = LeakyReLU(0.05) for
a distillation step (``lrelu(mixed(x) + x)``) or identity. One pass: the per-op outputs, the
weighted sum and the residual never exist as tensors.

Backward: ``_epi_bwd_dz`` recomputes gpre = g * act'(out) (the sign of out is the sign of the
pre-activation) and computes dZ_b = W_b^T gpre (storing gpre once, it is the gradient of add and
res); ``_epi_bwd_dw`` computes per-program partials of dW_b = sum_{n,p} gpre Z_b^T (summed on the
host: deterministic). All accumulation in fp32 (fp64 for fp64); ``tl.dot`` uses IEEE fp32.
Tensors are NCHW with H*W pixels addressed as p with strides (sh, sw).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gemm_term(acc, w_ptr, zp, szc, K, co, comask, pmask, IP: tl.constexpr, ACC: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """``acc + W[co, :] @ Z[:, p]`` for one term: W (C, K) row-major, Z's pixel pointers ``zp``
    (1, BLOCK_P) with channel stride ``szc``; K in blocks of BLOCK_K."""
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        wt = tl.load(w_ptr + co[:, None] * K + k[None, :], mask=comask[:, None] & (k < K)[None, :],
                     other=0.)
        zt = tl.load(zp + k.to(tl.int64)[:, None] * szc, mask=(k < K)[:, None] & pmask[None, :],
                     other=0.)
        acc += tl.dot(wt, zt, input_precision=IP, out_dtype=ACC)
    return acc


@triton.jit
def _epi_fwd(z1_ptr, w1_ptr, z2_ptr, w2_ptr, add_ptr, res_ptr, out_ptr,
             C, K1, K2, H, W,
             sz1n, sz1c, sz1h, sz1w, sz2n, sz2c, sz2h, sz2w,
             san, sac, sah, saw, srn, src, srh, srw,
             HAS2: tl.constexpr, HAS_ADD: tl.constexpr, HAS_RES: tl.constexpr,
             LRELU: tl.constexpr, ACC: tl.constexpr, IP: tl.constexpr,
             BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_p = tl.program_id(0)           # pixel blocks on axis 0 (no 65535 limit)
    n = tl.program_id(1).to(tl.int64)
    co = tl.program_id(2) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < C
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < H * W
    h = p // W
    w = p % W
    acc = tl.zeros([BLOCK_CO, BLOCK_P], dtype=ACC)
    acc = _gemm_term(acc, w1_ptr, z1_ptr + n * sz1n + (h * sz1h + w * sz1w)[None, :], sz1c, K1,
                     co, comask, pmask, IP, ACC, BLOCK_K)
    if HAS2:
        acc = _gemm_term(acc, w2_ptr, z2_ptr + n * sz2n + (h * sz2h + w * sz2w)[None, :], sz2c, K2,
                         co, comask, pmask, IP, ACC, BLOCK_K)
    m = comask[:, None] & pmask[None, :]
    if HAS_ADD:
        acc += tl.load(add_ptr + n * san + co.to(tl.int64)[:, None] * sac + (h * sah + w * saw)[None, :],
                       mask=m, other=0.).to(ACC)
    if HAS_RES:
        acc += tl.load(res_ptr + n * srn + co.to(tl.int64)[:, None] * src + (h * srh + w * srw)[None, :],
                       mask=m, other=0.).to(ACC)
    if LRELU:
        acc = tl.where(acc > 0, acc, acc * 0.05)
    tl.store(out_ptr + (n * C + co[:, None]) * (H * W) + p[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _epi_bwd_dz(g_ptr, out_ptr, w_ptr, dz_ptr, gpre_ptr,
                C, K, HW,
                LRELU: tl.constexpr, STORE_GPRE: tl.constexpr, ACC: tl.constexpr, IP: tl.constexpr,
                BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """dz[n, k, p] = sum_co W[co, k] * gpre[n, co, p]; g, out, dz, gpre contiguous NCHW."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.program_id(1).to(tl.int64)
    pmask = p < HW
    kb = tl.program_id(2)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    cc = tl.arange(0, BLOCK_CO)
    acc = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC)
    for c0 in range(0, C, BLOCK_CO):
        co = c0 + cc
        m = (co < C)[:, None] & pmask[None, :]
        off = (n * C + co[:, None]) * HW + p[None, :]
        g = tl.load(g_ptr + off, mask=m, other=0.)
        if LRELU:
            o = tl.load(out_ptr + off, mask=m, other=0.)
            g = tl.where(o > 0, g, g * 0.05)
        if STORE_GPRE:
            if kb == 0:
                tl.store(gpre_ptr + off, g, mask=m)
        wt = tl.load(w_ptr + co[None, :] * K + k[:, None], mask=kmask[:, None] & (co < C)[None, :], other=0.)
        acc += tl.dot(wt, g.to(wt.dtype), input_precision=IP, out_dtype=ACC)
    tl.store(dz_ptr + (n * K + k[:, None]) * HW + p[None, :], acc.to(dz_ptr.dtype.element_ty),
             mask=kmask[:, None] & pmask[None, :])


@triton.jit
def _epi_bwd_dw(gpre_ptr, z_ptr, part_ptr,
                N, C, K, H, W, SPLIT,
                szn, szc, szh, szw,
                ACC: tl.constexpr, IP: tl.constexpr,
                BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[s, co, k] = sum over this program's (n, pixel block) pairs of gpre[n, co, p] z[n, k, p]."""
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    sid = tl.program_id(2)
    comask = co < C
    kmask = k < K
    pp = tl.arange(0, BLOCK_P)
    HW = H * W
    npb = tl.cdiv(HW, BLOCK_P)
    acc = tl.zeros([BLOCK_CO, BLOCK_K], dtype=ACC)
    for j in range(sid, N * npb, SPLIT):
        n = (j // npb).to(tl.int64)
        p = (j % npb) * BLOCK_P + pp
        pmask = p < HW
        g = tl.load(gpre_ptr + (n * C + co[:, None]) * HW + p[None, :],
                    mask=comask[:, None] & pmask[None, :], other=0.)
        zt = tl.load(z_ptr + n * szn + k.to(tl.int64)[None, :] * szc + ((p // W) * szh + (p % W) * szw)[:, None],
                     mask=pmask[:, None] & kmask[None, :], other=0.)
        acc += tl.dot(g, zt.to(g.dtype), input_precision=IP, out_dtype=ACC)
    tl.store(part_ptr + (sid * C + co[:, None]) * K + k[None, :], acc,
             mask=comask[:, None] & kmask[None, :])
