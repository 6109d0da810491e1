// CPU backward of the tap-table depthwise engine.
//   grad input:  one task per (n, input plane): sum over the groups reading the plane of the
//                flipped-tap correlation with their output gradient, times ReLU'(x).
//   grad taps:   the same task writes partials[n, g, c, t] = sum_p act(x)[p + off_t] * gy[p]
//                (row-wise accumulators summed in a fixed order), then a second pass sums the
//                partials over n in order.  Deterministic and independent of the thread count.
#include "dw_cpu.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>

namespace hdnas {

template <typename scalar_t>
static void dw_bwd_kernel(const scalar_t* gy, const scalar_t* x, const scalar_t* w, scalar_t* gx,
                          at::opmath_type<scalar_t>* part, const CpuTaps& tp, int64_t N,
                          int64_t C, int64_t H, int64_t W, bool relu, bool shared) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = tp.G, T = tp.T, P = tp.radius;
  const int64_t Hp = H + 2 * P, Wp = W + 2 * P;
  const int64_t Cin = shared ? C : G * C;
  const bool need_gx = gx != nullptr, need_gw = part != nullptr;
  at::parallel_for(0, N * Cin, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gpad(Hp * Wp), xpad(need_gw ? Hp * Wp : 0), gacc(need_gx ? H * W : 0),
        wt(T);
    std::vector<int64_t> off(T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / Cin, ci = task % Cin;
      if (need_gw) fill_padded(xpad.data(), x + task * H * W, H, W, P, relu);
      if (need_gx) std::fill(gacc.begin(), gacc.end(), acc_t(0));
      const int64_t g0 = shared ? 0 : ci / C, g1 = shared ? G : g0 + 1;
      const int64_t c = shared ? ci : ci % C;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t nt = tp.ntaps[g];
        const int64_t oplane = (n * G + g) * C + c;
        fill_padded(gpad.data(), gy + oplane * H * W, H, W, P, false);
        if (need_gx) {
          const scalar_t* wp = w + (g * C + c) * T;
          for (int64_t t = 0; t < nt; ++t) {
            wt[t] = static_cast<acc_t>(wp[t]);
            off[t] = (P - tp.dy[g * T + t]) * Wp + P - tp.dx[g * T + t];
          }
          for (int64_t h = 0; h < H; ++h)
            stencil_row<acc_t, true>(gacc.data() + h * W, gpad.data() + h * Wp, off.data(),
                                     wt.data(), nt, W);
        }
        if (need_gw) {
          acc_t* pp = part + oplane * T;
          for (int64_t t = 0; t < T; ++t) {
            if (t >= nt) {
              pp[t] = acc_t(0);
              continue;
            }
            const int64_t o = (P + tp.dy[g * T + t]) * Wp + P + tp.dx[g * T + t];
            const acc_t s = tap_dot(xpad.data() + o, gpad.data() + P * Wp + P, H, W, Wp);
            pp[t] = s;
          }
        }
      }
      if (need_gx) {
        scalar_t* __restrict gp = gx + task * H * W;
        const scalar_t* __restrict xp = x + task * H * W;
        const acc_t* __restrict a = gacc.data();
        if (relu) {
          for (int64_t i = 0; i < H * W; ++i)
            gp[i] = static_cast<acc_t>(xp[i]) > acc_t(0) ? static_cast<scalar_t>(a[i]) : scalar_t(0);
        } else {
          for (int64_t i = 0; i < H * W; ++i) gp[i] = static_cast<scalar_t>(a[i]);
        }
      }
    }
  });
}

template <typename scalar_t>
static void reduce_partials(const at::opmath_type<scalar_t>* part, scalar_t* gw, int64_t N,
                            int64_t M) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      acc_t s = 0;
      for (int64_t n = 0; n < N; ++n) s += part[n * M + m];
      gw[m] = static_cast<scalar_t>(s);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dw_bwd_cpu(const at::Tensor& gy_, const at::Tensor& x_,
                                              const at::Tensor& w_, at::IntArrayRef offs,
                                              at::IntArrayRef ntaps, bool relu_input,
                                              bool shared_input, bool need_gx, bool need_gw) {
  TORCH_CHECK(x_.device().is_cpu(), "hdnas_native::dw_bwd (CPU): input on ", x_.device());
  CpuTaps tp;
  const int64_t C = check_and_build_taps(x_, w_, offs, ntaps, shared_input, tp, "hdnas_native::dw_bwd");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous(), gy = gy_.contiguous();
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  TORCH_CHECK(gy.scalar_type() == x.scalar_type() && gy.device() == x.device(),
              "hdnas_native::dw_bwd: grad_output dtype/device differ from the input's");
  TORCH_CHECK(gy.dim() == 4 && gy.size(0) == N && gy.size(1) == tp.G * C && gy.size(2) == H &&
                  gy.size(3) == W,
              "hdnas_native::dw_bwd: grad_output has shape ", gy.sizes(), ", expected ",
              at::IntArrayRef({N, tp.G * C, H, W}));
  // Gradients not asked for come back as empty (0-element) tensors.
  at::Tensor gx = need_gx ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor gw = need_gw ? at::empty_like(w) : at::empty({0}, w.options());
  if (x.numel() == 0) {
    if (need_gw) gw.zero_();
    return {gx, gw};
  }
  const auto acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor part = need_gw ? at::empty({N, tp.G, C, tp.T}, x.options().dtype(acc_type)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hdnas_dw_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dw_bwd_kernel<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                            need_gx ? gx.data_ptr<scalar_t>() : nullptr,
                            need_gw ? part.data_ptr<acc_t>() : nullptr, tp, N, C, H, W,
                            relu_input, shared_input);
    if (need_gw) reduce_partials<scalar_t>(part.data_ptr<acc_t>(), gw.data_ptr<scalar_t>(), N,
                                           tp.G * C * tp.T);
  });
  return {gx, gw};
}

}  // namespace hdnas
