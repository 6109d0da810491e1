// hdnas native depthwise kernels: the shared, torch-free contract.
//
// One "tap-table" depthwise engine serves both primitives of hdnas.mixed.primitives:
//
//   y[n, g*C + c, h, w] = sum_{t < ntaps[g]}  W[g, c, t] * act(x)[n, cin(g, c), h + dy[g][t], w + dx[g][t]]
//
// with cin(g, c) = c when shared_input (one read of x feeds every group: the fused multi-output
// first stage) and g*C + c otherwise (the second stage of the sep candidates); act = ReLU or
// identity; out-of-image reads are zero ('same' padding).  grouped_dw gathers each group's k x k
// (dilated) taps into W; mixed_dw first folds its groups into one union stencil W_eff (exact).
//
// Backward:  d act(x)[n, cin, p] = sum_{groups g reading cin} sum_t W[g,c,t] * gy[n, gC+c, p - off_t]
//            dW[g, c, t]         = sum_n sum_p act(x)[n, cin, p + off_t] * gy[n, gC+c, p]
// dW is reduced deterministically: per-(n, plane) partials in fp32/fp64, then summed over n in a
// fixed order (no float atomics, result independent of the thread count).
//
// This header is included by the CPU kernels (csrc/cpu), the CUDA kernels (csrc/cuda, compiled
// by nvcc without torch) and the torch bindings.
#pragma once

#include <stdint.h>

namespace hdnas {

// Limits of the CUDA path (tap table passed by value as a kernel argument).  The CPU path has no
// such limits; the Python side routes tables beyond them away from the CUDA kernels.
constexpr int kMaxGroups = 8;
constexpr int kMaxTaps = 96;   // >= 81: a 9x9 union stencil (radius 4)
constexpr int kMaxRadius = 8;  // |dy|, |dx| <= kMaxRadius

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct TapTable {
  int G;                                  // number of groups
  int T;                                  // stride of the tap axis of W ([G, C, T])
  int ntaps[kMaxGroups];
  int8_t dy[kMaxGroups][kMaxTaps];
  int8_t dx[kMaxGroups][kMaxTaps];
  int radius;                             // max |dy|, |dx| over all groups
};

struct DwShape {
  int N, C, H, W;   // C: channels per group
  int relu_input;   // 0 / 1
  int shared_input; // 0 / 1
};

// CUDA launchers (csrc/cuda/dw_fwd.cu, dw_bwd.cu).  Pointers are device pointers to contiguous
// NCHW tensors; `stream` is a cudaStream_t.  Return 0 on success, else a cudaError_t value (or
// -1 for unsupported arguments).
//   x: [N, Cin, H, W], w: [G, C, T], y: [N, G*C, H, W]  (all of `dtype`)
int dw_fwd_cuda(const TapTable& taps, const DwShape& s, DType dtype,
                const void* x, const void* w, void* y, void* stream);
// gx: [N, Cin, H, W] (dtype) or null; gw: [G, C, T] (dtype) or null;
// workspace: fp32 (fp64 for kFloat64) scratch of dw_bwd_cuda_workspace_elems(...) elements.
long long dw_bwd_cuda_workspace_elems(const TapTable& taps, const DwShape& s);
int dw_bwd_cuda(const TapTable& taps, const DwShape& s, DType dtype,
                const void* gy, const void* x, const void* w, void* gx, void* gw,
                void* workspace, void* stream);

}  // namespace hdnas
