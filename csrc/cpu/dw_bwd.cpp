// CPU backward of the tap-table depthwise engine (kernels: the active ISA variant, dw_isa.h).
//   grad input:  one task per (n, input plane): sum over the groups reading the plane of the
//                flipped-tap correlation with their output gradient, times ReLU'(x).
//   grad taps:   the same task writes partials[n, g, c, t] = sum_p act(x)[p + off_t] * gy[p]
//                (lane-wise accumulators summed in a fixed order), then a second pass here sums
//                the partials over n in order.  Deterministic and independent of the thread count.
#include "dw_cpu.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>

namespace hdnas {

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
                                              bool shared_input, bool need_gx, bool need_gw,
                                              int64_t stride) {
  TORCH_CHECK(x_.device().is_cpu(), "hdnas_native::dw_bwd (CPU): input on ", x_.device());
  TORCH_CHECK(stride == 1 || stride == 2, "hdnas_native::dw_bwd: stride 1 or 2, got ", stride);
  CpuTaps tp;
  const int64_t C = check_and_build_taps(x_, w_, offs, ntaps, shared_input, tp, "hdnas_native::dw_bwd");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous(), gy = gy_.contiguous();
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  TORCH_CHECK(gy.scalar_type() == x.scalar_type() && gy.device() == x.device(),
              "hdnas_native::dw_bwd: grad_output dtype/device differ from the input's");
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  TORCH_CHECK(gy.dim() == 4 && gy.size(0) == N && gy.size(1) == tp.G * C && gy.size(2) == Ho &&
                  gy.size(3) == Wo,
              "hdnas_native::dw_bwd: grad_output has shape ", gy.sizes(), ", expected ",
              at::IntArrayRef({N, tp.G * C, Ho, Wo}));
  // Gradients not asked for come back as empty (0-element) tensors.
  at::Tensor gx = need_gx ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor gw = need_gw ? at::empty_like(w) : at::empty({0}, w.options());
  if (x.numel() == 0) {
    if (need_gw) gw.zero_();
    return {gx, gw};
  }
  const auto acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor part = need_gw ? at::empty({N, tp.G, C, tp.T}, x.options().dtype(acc_type)) : at::Tensor();
  cpu::DwArgs a = make_args(x, tp, C, relu_input, shared_input, stride);
  a.x = x.data_ptr();
  a.w = w.data_ptr();
  a.gy = gy.data_ptr();
  a.gx = need_gx ? gx.data_ptr() : nullptr;
  a.part = need_gw ? part.data_ptr() : nullptr;
  if (need_gx || need_gw) run_tasks(&cpu::IsaKernels::bwd, a, "hdnas_native::dw_bwd");
  if (need_gw) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hdnas_dw_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      reduce_partials<scalar_t>(part.data_ptr<acc_t>(), gw.data_ptr<scalar_t>(), N, tp.G * C * tp.T);
    });
  }
  return {gx, gw};
}

}  // namespace hdnas
