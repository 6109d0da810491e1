// CPU forward of the tap-table depthwise engine: one task per (n, input plane); a task pads its
// plane once (ReLU applied on load) and writes every output group that reads it, so the shared
// first stage reads x once for all groups.  Inner loops run along a row and vectorise.
#include "dw_cpu.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <string>

namespace hdnas {

int64_t check_and_build_taps(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef offs,
                             at::IntArrayRef ntaps, bool shared_input, CpuTaps& taps,
                             const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": input must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(w.dim() == 3, op, ": tap weights must be (G, C, T), got ", w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), op, ": input ", x.scalar_type(),
              " and weights ", w.scalar_type(), " differ in dtype");
  TORCH_CHECK(x.device() == w.device(), op, ": input and weights on different devices");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": unsupported dtype ", st, " (float32, float64, float16, bfloat16)");
  const int64_t G = w.size(0), C = w.size(1), T = w.size(2);
  TORCH_CHECK(G >= 1 && T >= 1, op, ": empty tap table");
  TORCH_CHECK((int64_t)ntaps.size() == G, op, ": ", G, " groups but ", ntaps.size(), " tap counts");
  TORCH_CHECK((int64_t)offs.size() == G * T * 2, op, ": offsets must have G*T*2 = ", G * T * 2,
              " entries, got ", offs.size());
  const int64_t cin = shared_input ? C : G * C;
  TORCH_CHECK(x.size(1) == cin, op, ": input has ", x.size(1), " channels, expected ", cin);
  taps.G = G;
  taps.T = T;
  taps.radius = 0;
  taps.ntaps.assign(ntaps.begin(), ntaps.end());
  taps.dy.resize(G * T);
  taps.dx.resize(G * T);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(taps.ntaps[g] >= 0 && taps.ntaps[g] <= T, op, ": group ", g, " has ",
                taps.ntaps[g], " taps, the table holds ", T);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t dy = offs[(g * T + t) * 2], dx = offs[(g * T + t) * 2 + 1];
      taps.dy[g * T + t] = dy;
      taps.dx[g * T + t] = dx;
      if (t < taps.ntaps[g]) {
        taps.radius = std::max(taps.radius, std::max(std::abs(dy), std::abs(dx)));
      }
    }
  }
  TORCH_CHECK(taps.radius <= 64, op, ": tap offsets beyond 64 pixels are not supported");
  return C;
}

template <typename scalar_t>
static void dw_fwd_kernel(const scalar_t* x, const scalar_t* w, scalar_t* y, const CpuTaps& tp,
                          int64_t N, int64_t C, int64_t H, int64_t W, bool relu, bool shared) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = tp.G, T = tp.T, P = tp.radius;
  const int64_t Hp = H + 2 * P, Wp = W + 2 * P;
  const int64_t Cin = shared ? C : G * C;
  at::parallel_for(0, N * Cin, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> pad(Hp * Wp), acc(W), wt(T);
    std::vector<int64_t> off(T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / Cin, ci = task % Cin;
      fill_padded(pad.data(), x + task * H * W, H, W, P, relu);
      const int64_t g0 = shared ? 0 : ci / C, g1 = shared ? G : g0 + 1;
      const int64_t c = shared ? ci : ci % C;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t nt = tp.ntaps[g];
        const scalar_t* wp = w + (g * C + c) * T;
        for (int64_t t = 0; t < nt; ++t) {
          wt[t] = static_cast<acc_t>(wp[t]);
          off[t] = (P + tp.dy[g * T + t]) * Wp + P + tp.dx[g * T + t];
        }
        scalar_t* __restrict yp = y + ((n * G + g) * C + c) * H * W;
        for (int64_t h = 0; h < H; ++h) {
          acc_t* __restrict a = acc.data();
          stencil_row<acc_t, false>(a, pad.data() + h * Wp, off.data(), wt.data(), nt, W);
          for (int64_t i = 0; i < W; ++i) yp[h * W + i] = static_cast<scalar_t>(a[i]);
        }
      }
    }
  });
}

at::Tensor dw_fwd_cpu(const at::Tensor& x_, const at::Tensor& w_, at::IntArrayRef offs,
                      at::IntArrayRef ntaps, bool relu_input, bool shared_input) {
  TORCH_CHECK(x_.device().is_cpu(), "hdnas_native::dw_fwd (CPU): input on ", x_.device());
  CpuTaps tp;
  const int64_t C = check_and_build_taps(x_, w_, offs, ntaps, shared_input, tp, "hdnas_native::dw_fwd");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  at::Tensor y = at::empty({N, tp.G * C, H, W}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hdnas_dw_fwd", [&] {
    dw_fwd_kernel<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                            tp, N, C, H, W, relu_input, shared_input);
  });
  return y;
}

}  // namespace hdnas
