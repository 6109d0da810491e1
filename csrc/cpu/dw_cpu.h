// CPU side of the hdnas native depthwise engine (see ../hdnas_dw.h for the math).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

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

// 512-bit vectors of the accumulation type (GCC/Clang vector extensions: kept in registers,
// split into narrower ones on machines without AVX-512).
template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(64)));
  static constexpr int L = 64 / sizeof(acc_t);
};

template <typename V, typename acc_t>
inline V vload(const acc_t* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename acc_t>
inline void vstore(acc_t* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// Register-blocked row stencil: out[i] (= or +=) sum_t wt[t] * base[off[t] + i], i < W.
// Blocks of 2 vectors stay in registers across the taps (one load + one FMA per tap and
// vector).  Every output sums its taps in the same order whichever path computes it.
template <typename acc_t, bool ACCUM>
inline void stencil_row(acc_t* __restrict out, const acc_t* __restrict base,
                        const int64_t* __restrict off, const acc_t* __restrict wt, int64_t nt,
                        int64_t W) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::L;
  int64_t i = 0;
  for (; i + 2 * L <= W; i += 2 * L) {
    V a0 = ACCUM ? vload<V>(out + i) : V{};
    V a1 = ACCUM ? vload<V>(out + i + L) : V{};
    for (int64_t t = 0; t < nt; ++t) {
      const acc_t* s = base + off[t] + i;
      const V k = V{} + wt[t];
      a0 += k * vload<V>(s);
      a1 += k * vload<V>(s + L);
    }
    vstore(out + i, a0);
    vstore(out + i + L, a1);
  }
  for (; i + L <= W; i += L) {
    V a0 = ACCUM ? vload<V>(out + i) : V{};
    for (int64_t t = 0; t < nt; ++t) a0 += (V{} + wt[t]) * vload<V>(base + off[t] + i);
    vstore(out + i, a0);
  }
  for (; i < W; ++i) {
    acc_t a = ACCUM ? out[i] : acc_t(0);
    for (int64_t t = 0; t < nt; ++t) a += wt[t] * base[off[t] + i];
    out[i] = a;
  }
}

// Register-blocked tap correlation: sum_{h < H, i < W} xs[h * Wp + i] * gs[h * Wp + i]
// (fixed order: per-lane sums over h, then lanes and blocks in order).
template <typename acc_t>
inline acc_t tap_dot(const acc_t* __restrict xs, const acc_t* __restrict gs, int64_t H, int64_t W,
                     int64_t Wp) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::L;
  acc_t total = 0;
  int64_t i = 0;
  for (; i + 2 * L <= W; i += 2 * L) {
    V a0 = V{}, a1 = V{};
    for (int64_t h = 0; h < H; ++h) {
      a0 += vload<V>(xs + h * Wp + i) * vload<V>(gs + h * Wp + i);
      a1 += vload<V>(xs + h * Wp + i + L) * vload<V>(gs + h * Wp + i + L);
    }
    a0 += a1;
    for (int v = 0; v < L; ++v) total += a0[v];
  }
  for (; i + L <= W; i += L) {
    V a0 = V{};
    for (int64_t h = 0; h < H; ++h) a0 += vload<V>(xs + h * Wp + i) * vload<V>(gs + h * Wp + i);
    for (int v = 0; v < L; ++v) total += a0[v];
  }
  for (; i < W; ++i) {
    acc_t a = 0;
    for (int64_t h = 0; h < H; ++h) a += xs[h * Wp + i] * gs[h * Wp + i];
    total += a;
  }
  return total;
}

}  // namespace hdnas
