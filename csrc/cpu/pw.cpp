// CPU pointwise (1x1) convolutions of channel groups, the grouped GEMMs of the fused DARTS op:
//   pw(x, w)            y[n, g*Co + o, h, w] = sum_i w[g, o, i] x[n, g*Ci + i, h, w]
//   pw_wgrad(gy, x, G)  gw[g, o, i] = sum_{n, h, w} gy[n, g*Co + o, h, w] x[n, g*Ci + i, h, w]
// float32 / float64, NCHW.  At DARTS' shapes (16-64 channels, 8x8-32x32 pixels) these are
// batches of small GEMMs that the BLAS behind torch.matmul runs far below the CPU's peak; the
// kernels (dw_simd_impl.h, one per ISA variant) keep an output tile in registers instead.  The
// forward runs one task per (n, g), the weight gradient one per tile of its result (each summed
// over all images in a fixed order), split over torch's threads: no result depends on the
// thread count.
#include "dw_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <atomic>

#include "../hdnas_dw.h"

namespace hdnas {
namespace {

int dtype_code(const at::Tensor& t, const char* op) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": unsupported dtype ", st,
              " (float32, float64)");
  return st == at::kFloat ? kFloat32 : kFloat64;
}

void run_pw(int (*const cpu::IsaKernels::*fn)(const cpu::PwArgs&, int64_t, int64_t),
            const cpu::PwArgs& a, int64_t tasks, const char* op) {
  const cpu::IsaKernels& k = cpu::active_kernels();
  std::atomic<int> failed{0};
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int rc = (k.*fn)(a, begin, end);
    if (rc != 0) failed.store(rc);
  });
  TORCH_CHECK(failed.load() == 0, op, " (", k.name, " kernels): internal error (code ",
              failed.load(), ")");
}

cpu::PwArgs make_pw_args(int dtype, const at::Tensor& x, int64_t N, int64_t G, int64_t Ci,
                         int64_t Co, int64_t P) {
  cpu::PwArgs a{};
  a.dtype = dtype;
  a.x = x.data_ptr();
  a.N = N;
  a.G = G;
  a.Ci = Ci;
  a.Co = Co;
  a.P = P;
  return a;
}

}  // namespace

at::Tensor pw_cpu(const at::Tensor& x_, const at::Tensor& w_) {
  const char* op = "hdnas_native::pw";
  TORCH_CHECK(x_.device().is_cpu() && w_.device().is_cpu(), op, " (CPU): tensors on ", x_.device(),
              " and ", w_.device());
  TORCH_CHECK(x_.dim() == 4, op, ": input must be (N, G*Ci, H, W), got ", x_.sizes());
  TORCH_CHECK(w_.dim() == 3, op, ": weights must be (G, Co, Ci), got ", w_.sizes());
  TORCH_CHECK(x_.scalar_type() == w_.scalar_type(), op, ": input ", x_.scalar_type(),
              " and weights ", w_.scalar_type(), " differ in dtype");
  const int dtype = dtype_code(x_, op);
  const int64_t G = w_.size(0), Co = w_.size(1), Ci = w_.size(2);
  TORCH_CHECK(G >= 1 && x_.size(1) == G * Ci, op, ": input has ", x_.size(1), " channels, the ",
              G, " groups of weights read ", G * Ci);
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  at::Tensor y = at::empty({N, G * Co, H, W}, x.options());
  if (y.numel() == 0) return y;
  if (Ci == 0) return y.zero_();
  cpu::PwArgs a = make_pw_args(dtype, x, N, G, Ci, Co, H * W);
  a.w = w.data_ptr();
  a.y = y.data_ptr();
  run_pw(&cpu::IsaKernels::pw, a, N * G, op);
  return y;
}

at::Tensor pw_wgrad_cpu(const at::Tensor& gy_, const at::Tensor& x_, int64_t groups) {
  const char* op = "hdnas_native::pw_wgrad";
  TORCH_CHECK(gy_.device().is_cpu() && x_.device().is_cpu(), op, " (CPU): tensors on ",
              gy_.device(), " and ", x_.device());
  TORCH_CHECK(gy_.dim() == 4 && x_.dim() == 4, op, ": grad_output and input must be 4-d, got ",
              gy_.sizes(), " and ", x_.sizes());
  TORCH_CHECK(gy_.scalar_type() == x_.scalar_type(), op, ": grad_output ", gy_.scalar_type(),
              " and input ", x_.scalar_type(), " differ in dtype");
  const int dtype = dtype_code(x_, op);
  const int64_t G = groups;
  TORCH_CHECK(G >= 1 && gy_.size(1) % G == 0 && x_.size(1) % G == 0, op, ": ", G,
              " groups do not divide the channels (", gy_.size(1), ", ", x_.size(1), ")");
  TORCH_CHECK(gy_.size(0) == x_.size(0) && gy_.size(2) == x_.size(2) && gy_.size(3) == x_.size(3),
              op, ": grad_output ", gy_.sizes(), " and input ", x_.sizes(),
              " differ in batch or pixels");
  const at::Tensor gy = gy_.contiguous(), x = x_.contiguous();
  const int64_t N = x.size(0), Co = gy.size(1) / G, Ci = x.size(1) / G, P = x.size(2) * x.size(3);
  at::Tensor gw = at::empty({G, Co, Ci}, x.options());
  if (gw.numel() == 0) return gw;
  if (N == 0 || P == 0) return gw.zero_();
  cpu::PwArgs a = make_pw_args(dtype, x, N, G, Ci, Co, P);
  a.gy = gy.data_ptr();
  a.gw = gw.data_ptr();
  run_pw(&cpu::IsaKernels::pw_wgrad, a, cpu::active_kernels().pw_wgrad_ntasks(a), op);
  return gw;
}

}  // namespace hdnas
