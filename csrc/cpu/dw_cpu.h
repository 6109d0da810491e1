// CPU side of the hdnas native depthwise engine (see ../hdnas_dw.h for the math).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace hdnas {

// Tap table on the CPU: no size limits (the CUDA path has them, see TapTable).
struct CpuTaps {
  int64_t G = 0, T = 0, radius = 0;
  std::vector<int64_t> ntaps;   // [G]
  std::vector<int64_t> dy, dx;  // [G * T]
};

// Validates the arguments shared by the forward and backward ops and builds the tap table.
// Returns C (channels per group).
int64_t check_and_build_taps(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef offs,
                             at::IntArrayRef ntaps, bool shared_input, CpuTaps& taps,
                             const char* op);

at::Tensor dw_fwd_cpu(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef offs,
                      at::IntArrayRef ntaps, bool relu_input, bool shared_input);

std::tuple<at::Tensor, at::Tensor> dw_bwd_cpu(const at::Tensor& gy, const at::Tensor& x,
                                              const at::Tensor& w, at::IntArrayRef offs,
                                              at::IntArrayRef ntaps, bool relu_input,
                                              bool shared_input, bool need_gx, bool need_gw);

// Copies act(plane) (H x W) into the centre of a zeroed (H+2P) x (W+2P) buffer.
template <typename scalar_t, typename acc_t>
inline void fill_padded(acc_t* __restrict pad, const scalar_t* __restrict src, int64_t H,
                        int64_t W, int64_t P, bool relu) {
  const int64_t Wp = W + 2 * P;
  std::fill(pad, pad + P * Wp, acc_t(0));
  std::fill(pad + (P + H) * Wp, pad + (H + 2 * P) * Wp, acc_t(0));
  for (int64_t h = 0; h < H; ++h) {
    acc_t* __restrict row = pad + (h + P) * Wp;
    const scalar_t* __restrict s = src + h * W;
    for (int64_t i = 0; i < P; ++i) row[i] = acc_t(0);
    if (relu) {
      for (int64_t i = 0; i < W; ++i) {
        acc_t v = static_cast<acc_t>(s[i]);
        row[P + i] = v > acc_t(0) ? v : acc_t(0);
      }
    } else {
      for (int64_t i = 0; i < W; ++i) row[P + i] = static_cast<acc_t>(s[i]);
    }
    for (int64_t i = P + W; i < Wp; ++i) row[i] = acc_t(0);
  }
}

}  // namespace hdnas
