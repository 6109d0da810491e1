"""Triton kernels for multi-group depthwise stencils with an explicit tap table ("dw_taps").

One call computes G output groups of C channels from an NCHW input (any strides):

    y[n, g*C + c, h, w] = sum_{t in taps[g]} K[g, c, t] * act(x[n, cin, h + dy_t*d_g, w + dx_t*d_g])

with t = (ty, tx) a slot of the KMAX x KMAX kernel grid, dy_t = ty - KMAX//2, ``cin = c`` when
``SHARED`` (every group reads the same input: one read of x, one ReLU, for all first stages) or
``cin = g*C + c`` otherwise, and ``act`` = ReLU when ``RELU``. Inactive slots (taps[g, t] == 0)
are skipped at run time (a uniform branch), so a 3x3 group in a 7x7 slot costs 9 taps and a
union-of-taps kernel (the mixed_dw merge) costs |U| taps.

Backward: ``_dw_taps_bwd_dx`` (dx = relu'(x) * sum_g correlate(gy_g, K_g), no atomics) and
``_dw_taps_bwd_dk`` (per-program fp32/fp64 partials of sum_{n,p} act(x)[p+off_t] gy[p] for one
row of taps, reduced on the host with ``torch.sum``: deterministic, no float atomics).
Accumulation is fp32 (fp64 for fp64 tensors). All halo loads are masked with ``other=0.``.

Kept to the triton 3.6 .. 3.9 common subset (no tensor descriptors, no tl.range options).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_tap(xr, w, hm, ox, sxw, W, RELU: tl.constexpr, ACC: tl.constexpr):
    """The input row block shifted by ``ox`` columns (zero outside the image), ReLU'd if asked:
    one tap of the stencil, shared by the forward and the kernel-gradient kernels."""
    ww = w + ox
    m = hm & (ww >= 0) & (ww < W)
    xv = tl.load(xr + ox * sxw, mask=m[None, :], other=0.).to(ACC)
    if RELU:
        xv = tl.maximum(xv, 0.)
    return xv


@triton.jit
def _row_pixel_blocks(H, W, BLOCK_S: tl.constexpr):
    """(row block, pixel block) of this forward or dx program, from grid axis 0: pixel block
    fastest, then row block (``hdnas.kernels.ops.dw_grid``). Axis 0 allows 2**31 - 1 programs,
    axes 1 and 2 only 65535, which the pixel blocks of a large image exceed; the group is on
    axis 1."""
    pid = tl.program_id(0)
    nsb = tl.cdiv(H * W, BLOCK_S)
    return pid // nsb, pid % nsb


@triton.jit
def _plane_pixel_block(N, C, H, W, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """The (n, c) planes and pixels of this forward or dx program: (rmask, n, c, pix, smask,
    h, w). Rows past N*C are clamped (loads need no row mask; stores use ``rmask``)."""
    pid_r, pid_s = _row_pixel_blocks(H, W, BLOCK_S)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)      # (n, c) planes
    rmask = rows < N * C
    rows = tl.minimum(rows, N * C - 1)
    pix = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    return rmask, rows // C, rows % C, pix, pix < H * W, pix // W, pix % W


@triton.jit
def _dw_taps_fwd(x_ptr, k_ptr, taps_ptr, dil_ptr, y_ptr,
                 N, C, H, W,
                 sxn, sxc, sxh, sxw,
                 G,
                 KMAX: tl.constexpr, RELU: tl.constexpr, SHARED: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program: BLOCK_R (n, c) planes x BLOCK_S pixels. With SHARED, the program computes
    every group from the same input tile (grid axis 1 is 1), so the tile and its halo are
    fetched from DRAM once and re-read from L1 by the other groups' taps."""
    rmask, n, c, pix, smask, h, w = _plane_pixel_block(N, C, H, W, BLOCK_R, BLOCK_S)
    pid_g = tl.program_id(1)
    KK: tl.constexpr = KMAX * KMAX
    hw_off = (h * sxh + w * sxw)[None, :]
    omask = rmask[:, None] & smask[None, :]
    if SHARED:
        g_lo = 0
        g_hi = G
    else:
        g_lo = pid_g
        g_hi = pid_g + 1
    for g in range(g_lo, g_hi):
        if SHARED:
            cin = c
        else:
            cin = g * C + c
        xrow = n.to(tl.int64) * sxn + cin.to(tl.int64) * sxc
        # int64 scalars: per-tap offset math skips the interpreter's int32 overflow checks
        d = tl.load(dil_ptr + g).to(tl.int64)
        krow = (g * C + c) * KK
        xc = x_ptr + (xrow[:, None] + hw_off)   # centre pointers
        acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=ACC)
        for ty in tl.static_range(KMAX):
            oy = (ty - KMAX // 2) * d
            hh = h + oy
            hm = smask & (hh >= 0) & (hh < H)
            xr = xc + oy * sxh
            for tx in tl.static_range(KMAX):
                active = tl.load(taps_ptr + g * KK + (ty * KMAX + tx))
                if active != 0:
                    xv = _load_tap(xr, w, hm, (tx - KMAX // 2) * d, sxw, W, RELU, ACC)
                    kv = tl.load(k_ptr + krow + (ty * KMAX + tx)).to(ACC)
                    acc += kv[:, None] * xv
        yrow = (n.to(tl.int64) * G + g) * C + c
        tl.store(y_ptr + yrow[:, None] * (H * W) + pix[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=omask)


@triton.jit
def _dw_taps_bwd_dx(gy_ptr, x_ptr, k_ptr, taps_ptr, dil_ptr, dx_ptr,
                    N, C, H, W,
                    sxn, sxc, sxh, sxw,
                    G,
                    KMAX: tl.constexpr, RELU: tl.constexpr, SHARED: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx for the input planes of this program: sum over the groups that read them of the
    correlation of gy with the group's kernel (negated tap offsets), times relu'(x)."""
    rmask, n, c, pix, smask, h, w = _plane_pixel_block(N, C, H, W, BLOCK_R, BLOCK_S)
    pid_g = tl.program_id(1)
    KK: tl.constexpr = KMAX * KMAX
    if SHARED:
        g_lo = 0
        g_hi = G
        cin = c
        cin_tot = C
    else:
        g_lo = pid_g
        g_hi = pid_g + 1
        cin = pid_g * C + c
        cin_tot = G * C
    acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=ACC)
    for g in range(g_lo, g_hi):
        d = tl.load(dil_ptr + g).to(tl.int64)
        gyrow = ((n.to(tl.int64) * G + g) * C + c) * (H * W)
        gc = gy_ptr + (gyrow[:, None] + pix[None, :])
        krow = (g * C + c) * KK
        for ty in tl.static_range(KMAX):
            oy = (ty - KMAX // 2) * d
            hh = h - oy
            hm = smask & (hh >= 0) & (hh < H)
            gr = gc - oy * W
            for tx in tl.static_range(KMAX):
                active = tl.load(taps_ptr + g * KK + (ty * KMAX + tx))
                if active != 0:
                    ox = (tx - KMAX // 2) * d
                    ww = w - ox
                    m = hm & (ww >= 0) & (ww < W)
                    gv = tl.load(gr - ox, mask=m[None, :], other=0.).to(ACC)
                    kv = tl.load(k_ptr + krow + (ty * KMAX + tx)).to(ACC)
                    acc += kv[:, None] * gv
    omask = rmask[:, None] & smask[None, :]
    if RELU:
        xrow = n.to(tl.int64) * sxn + cin.to(tl.int64) * sxc
        xv = tl.load(x_ptr + xrow[:, None] + (h * sxh + w * sxw)[None, :], mask=omask, other=0.)
        acc = tl.where(xv > 0, acc, 0.)
    dxrow = n.to(tl.int64) * cin_tot + cin
    tl.store(dx_ptr + dxrow[:, None] * (H * W) + pix[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=omask)


@triton.jit
def _dw_taps_bwd_dk(gy_ptr, x_ptr, taps_ptr, dil_ptr, part_ptr,
                    N, C, H, W,
                    sxn, sxc, sxh, sxw,
                    G, SPLIT,
                    KMAX: tl.constexpr, KP: tl.constexpr, RELU: tl.constexpr,
                    SHARED: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Partial kernel gradients of one row of taps: program (channel block, (g, ty), split) sums
    act(x)[p + off_t] * gy[p] over its share of the (n, pixel block) pairs for the KMAX taps t
    of row ty of group g's slot and stores part[split, g, c, ty*KMAX : (ty+1)*KMAX].

    One row per program, not the whole slot: the tap flags and offsets of the unrolled taps are
    loop invariants kept in registers for the whole pair loop, and at KMAX 9 the 81 taps of a
    slot spilled on sm_90 (255 registers and a stack frame); a row needs about 110."""
    pid_c = tl.program_id(0)
    g = tl.program_id(1) // KMAX
    ty = tl.program_id(1) % KMAX
    sid = tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    cl = tl.minimum(c, C - 1)             # clamped: loads need no channel mask
    if SHARED:
        cin = cl
    else:
        cin = g * C + cl
    KK: tl.constexpr = KMAX * KMAX
    cols = tl.arange(0, KP)
    d = tl.load(dil_ptr + g).to(tl.int64)
    oy = (ty - KMAX // 2) * d
    nsb = tl.cdiv(H * W, BLOCK_S)
    acc = tl.zeros([BLOCK_C, KP], dtype=ACC)
    for j in range(sid, N * nsb, SPLIT):
        n = j // nsb
        pix = (j % nsb) * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = pix < H * W
        h = pix // W
        w = pix % W
        gyrow = ((n.to(tl.int64) * G + g) * C + cl) * (H * W)
        gv = tl.load(gy_ptr + gyrow[:, None] + pix[None, :], mask=smask[None, :], other=0.).to(ACC)
        xrow = n.to(tl.int64) * sxn + cin.to(tl.int64) * sxc
        hh = h + oy
        hm = smask & (hh >= 0) & (hh < H)
        xr = x_ptr + (xrow[:, None] + (h * sxh + w * sxw)[None, :]) + oy * sxh
        for tx in tl.static_range(KMAX):
            active = tl.load(taps_ptr + g * KK + ty * KMAX + tx)
            if active != 0:
                xv = _load_tap(xr, w, hm, (tx - KMAX // 2) * d, sxw, W, RELU, ACC)
                part = tl.sum(xv * gv, axis=1)
                acc += tl.where(cols[None, :] == tx, part[:, None], 0.)
    prow = ((sid * G + g) * C + c) * KK + ty * KMAX
    tl.store(part_ptr + prow[:, None] + cols[None, :], acc,
             mask=cmask[:, None] & (cols[None, :] < KMAX))
