"""Byte and FLOP model of one DLSR mixed op (9 candidates) per backend; prints bench/BYTES.md's
tables. Every stock kernel is counted as reading its inputs once and writing its outputs once
from DRAM (L2 hits, im2col workspaces and weight traffic ignored), in units of M = N*C*H*W
elements. Run: python bench/bytes_model.py [N C H W] [bytes_per_element]."""
from __future__ import annotations

import sys

# (step, elements read, elements written) in units of M; per call of the mixed op
REFERENCE_FWD = (
    [("conv_k(x), k=1,3,5,7", 1, 1)] * 4
    + [("sep: relu(x)", 1, 1), ("sep: dw1", 1, 1), ("sep: pw1", 1, 1), ("sep: relu", 1, 1),
       ("sep: dw2", 1, 1), ("sep: pw2", 1, 1)] * 3
    + [("dil: relu(x)", 1, 1), ("dil: dw", 1, 1), ("dil: pw", 1, 1)] * 2
    + [("w_k * o_k", 1, 1)] * 9
    + [("sum: 0 + t0", 1, 1)] + [("sum: + t_k", 2, 1)] * 8
)
REFERENCE_BWD = (
    [("MulBackward: w*g and sum(g*o_k)", 3, 1)] * 9
    + [("conv_k backward: dx, dW", 3, 1)] * 4
    + [("sep: pw backward (dx, dW)", 3, 1), ("sep: dw backward (dx, dW)", 3, 1),
       ("sep: relu backward", 2, 1)] * 6
    + [("dil: pw backward", 3, 1), ("dil: dw backward", 3, 1), ("dil: relu backward", 2, 1)] * 2
    + [("accumulate 9 dx contributions", 2, 1)] * 8
)
# merged = the composition with stock-PyTorch primitives (the _ref twins: relu, per-group conv, cat)
MERGED_FWD = [
    ("dense merged 7x7 conv", 1, 1),
    ("stage 1: relu(x)", 1, 1), ("stage 1: 5 dw convs", 5, 5), ("stage 1: cat", 5, 5),
    ("pw1 batched GEMM (3 groups)", 3, 3),
    ("stage 2: relu", 3, 3), ("stage 2: 3 dw convs", 3, 3), ("stage 2: cat", 3, 3),
    ("final GEMM sep block", 3, 1), ("final GEMM dil block", 2, 1), ("2 adds", 4, 2),
]
MERGED_BWD = [
    ("dense conv backward: dx, dW", 3, 1),
    ("final GEMMs backward: dZ, dW", 2 + 5 + 5, 5),
    ("stage 2 backward: cat split, 3 dw (dx, dW), relu", 3 + 9 + 6, 3 + 3 + 3),
    ("pw1 backward: dZ, dW", 3 + 3 + 3, 3),
    ("stage 1 backward: cat split, 5 dw (dx, dW), relu, sum over groups", 5 + 15 + 2 + 5, 5 + 5 + 1 + 1),
    ("accumulate dx contributions (dense, stage 1)", 2, 1),
]
# triton = the composition with the Triton primitives (one multi-group stencil per stage) and
# the fused alpha-block GEMM epilogue (final pw of all 5 sep/dil ops + dense output [+ x, lrelu])
TRITON_FWD = [
    ("dense merged 7x7 conv", 1, 1),
    ("stage 1 (shared read of x, relu on load)", 1, 5),
    ("pw1 batched GEMM", 3, 3),
    ("stage 2 (relu on load)", 3, 3),
    ("epilogue: Z_sep, Z_dil (in place), dense out -> y", 3 + 2 + 1, 1),
]
TRITON_BWD = [
    ("epilogue dZ_sep, dZ_dil (g read twice)", 2, 5),
    ("epilogue dW_sep, dW_dil partials (g twice, Z)", 2 + 5, 0),
    ("stage 2 dx kernel (gy, relu mask of its input)", 3 + 3, 3), ("stage 2 dk kernel (gy, input)", 3 + 3, 0),
    ("pw1 backward: dZ, dW (cuBLAS)", 9, 3),
    ("stage 1 dx kernel (5 gy, relu mask of x)", 5 + 1, 1), ("stage 1 dk kernel (5 gy, x)", 5 + 1, 0),
    ("dense conv backward: dx, dW", 3, 1),
    ("accumulate dx contributions (dense, stage 1)", 2, 1),
]
MINIMUM_FWD = [("read x, write y", 1, 1)]
MINIMUM_BWD = [("read x and g, write dx", 2, 1)]


def macs_per_pixel(C, merged):
    dense = (49 if merged else 1 + 9 + 25 + 49) * C * C
    sep = sum(2 * k * k * C + 2 * C * C for k in (3, 5, 7))
    dil = sum(k * k * C + C * C for k in (3, 5))
    return dense + sep + dil


def total(steps):
    return sum(r for _, r, _ in steps), sum(w for _, _, w in steps)


def main(argv):
    N, C, H, W = (int(v) for v in argv[:4]) if len(argv) >= 4 else (64, 48, 32, 32)
    b = int(argv[4]) if len(argv) >= 5 else 4
    M = N * C * H * W
    P = N * H * W
    print(f"shape N{N} C{C} {H}x{W}, {b} bytes/element, M = {M:,} elements = {M * b / 1e6:.1f} MB\n")
    print("| backend | fwd traffic (xM) | fwd MB | fwd+bwd traffic (xM) | fwd+bwd MB | fwd GFLOP | "
          "fwd+bwd GFLOP | fwd+bwd floor at 3.0 TB/s | fwd+bwd FLOP floor FP32 67 TF/s | steps fwd/bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = [("two-tensor minimum", MINIMUM_FWD, MINIMUM_BWD, True),
            ("reference", REFERENCE_FWD, REFERENCE_BWD, False),
            ("merged", MERGED_FWD, MERGED_BWD, True),
            ("triton", TRITON_FWD, TRITON_BWD, True)]
    for name, f, bw, merged in rows:
        fr, fw = total(f)
        br, bww = total(bw)
        fl = 2 * macs_per_pixel(C, merged) * P / 1e9
        tot = (fr + fw + br + bww) * M * b
        print(f"| {name} | {fr + fw} | {(fr + fw) * M * b / 1e6:.0f} | {fr + fw + br + bww} | "
              f"{tot / 1e6:.0f} | {fl:.1f} | {3 * fl:.1f} | {tot / 3.0e12 * 1e6:.0f} us | "
              f"{3 * fl * 1e9 / 67e12 * 1e6:.0f} us | {len(f)}/{len(bw)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
