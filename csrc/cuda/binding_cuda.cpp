// Thin torch binding of the CUDA kernels: argument checks, contiguity, the tap table, the
// current stream, and the deterministic partials workspace.  Built only with a CUDA build of
// torch (setup.py / hdnas.native_build); the op schemas come from ../bindings.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

#include "../hdnas_dw.h"

namespace hdnas {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, "hdnas_native (CUDA): unsupported dtype ", t.scalar_type());
  }
  return kFloat32;
}

void build(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef offs, at::IntArrayRef ntaps,
           bool relu, bool shared, TapTable& tt, DwShape& s, const char* op) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda(), op, ": tensors must be on a CUDA device");
  TORCH_CHECK(x.device() == w.device(), op, ": x is on ", x.device(), ", w on ", w.device());
  TORCH_CHECK(x.dim() == 4 && w.dim() == 3, op, ": expected x (N,C,H,W) and w (G,C,T)");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), op, ": x and w differ in dtype");
  const int64_t G = w.size(0), C = w.size(1), T = w.size(2);
  TORCH_CHECK(G >= 1 && G <= kMaxGroups && T >= 1 && T <= kMaxTaps, op, ": the CUDA kernels take ",
              "1..", kMaxGroups, " groups and 1..", kMaxTaps, " taps, got ", G, " and ", T);
  TORCH_CHECK((int64_t)ntaps.size() == G && (int64_t)offs.size() == G * T * 2, op,
              ": tap table sizes do not match w");
  TORCH_CHECK(x.size(1) == (shared ? C : G * C), op, ": input has ", x.size(1), " channels");
  TORCH_CHECK(x.numel() < (int64_t(1) << 40), op, ": input too large");
  tt.G = (int)G;
  tt.T = (int)T;
  tt.radius = 0;
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(ntaps[g] >= 0 && ntaps[g] <= T, op, ": bad tap count");
    tt.ntaps[g] = (int)ntaps[g];
    for (int64_t t = 0; t < T; ++t) {
      const int64_t dy = offs[(g * T + t) * 2], dx = offs[(g * T + t) * 2 + 1];
      TORCH_CHECK(std::abs(dy) <= kMaxRadius && std::abs(dx) <= kMaxRadius, op,
                  ": the CUDA kernels take tap offsets up to ", kMaxRadius);
      tt.dy[g][t] = (int8_t)dy;
      tt.dx[g][t] = (int8_t)dx;
      if (t < ntaps[g]) tt.radius = std::max<int>(tt.radius, (int)std::max(std::abs(dy), std::abs(dx)));
    }
  }
  s.N = (int)x.size(0);
  s.C = (int)C;
  s.H = (int)x.size(2);
  s.W = (int)x.size(3);
  s.relu_input = relu;
  s.shared_input = shared;
}

at::Tensor dw_fwd_cuda_op(const at::Tensor& x_, const at::Tensor& w_, at::IntArrayRef offs,
                          at::IntArrayRef ntaps, bool relu, bool shared, int64_t stride) {
  TORCH_CHECK(stride == 1, "hdnas_native::dw_fwd (CUDA): stride 1 only, got ", stride);
  TapTable tt;
  DwShape s;
  build(x_, w_, offs, ntaps, relu, shared, tt, s, "hdnas_native::dw_fwd");
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  at::Tensor y = at::empty({x.size(0), tt.G * s.C, x.size(2), x.size(3)}, x.options());
  const int e = dw_fwd_cuda(tt, s, dtype_of(x), x.data_ptr(), w.data_ptr(), y.data_ptr(),
                            at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == 0, "hdnas_native::dw_fwd (CUDA) failed: error ", e);
  return y;
}

std::tuple<at::Tensor, at::Tensor> dw_bwd_cuda_op(const at::Tensor& gy_, const at::Tensor& x_,
                                                  const at::Tensor& w_, at::IntArrayRef offs,
                                                  at::IntArrayRef ntaps, bool relu, bool shared,
                                                  bool need_gx, bool need_gw, int64_t stride) {
  TORCH_CHECK(stride == 1, "hdnas_native::dw_bwd (CUDA): stride 1 only, got ", stride);
  TapTable tt;
  DwShape s;
  build(x_, w_, offs, ntaps, relu, shared, tt, s, "hdnas_native::dw_bwd");
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), w = w_.contiguous(), gy = gy_.contiguous();
  TORCH_CHECK(gy.scalar_type() == x.scalar_type() && gy.device() == x.device() &&
                  gy.dim() == 4 && gy.size(0) == s.N && gy.size(1) == (int64_t)tt.G * s.C &&
                  gy.size(2) == s.H && gy.size(3) == s.W,
              "hdnas_native::dw_bwd (CUDA): grad_output does not match the output");
  at::Tensor gx = need_gx ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor gw = need_gw ? at::empty_like(w) : at::empty({0}, w.options());
  at::Tensor ws;
  if (need_gw) {
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    ws = at::empty({std::max<long long>(1, dw_bwd_cuda_workspace_elems(tt, s))},
                   x.options().dtype(acc));
  }
  const int e = dw_bwd_cuda(tt, s, dtype_of(x), gy.data_ptr(), x.data_ptr(), w.data_ptr(),
                            need_gx ? gx.data_ptr() : nullptr, need_gw ? gw.data_ptr() : nullptr,
                            need_gw ? ws.data_ptr() : nullptr,
                            at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == 0, "hdnas_native::dw_bwd (CUDA) failed: error ", e);
  return {gx, gw};
}

}  // namespace
}  // namespace hdnas

TORCH_LIBRARY_IMPL(hdnas_native, CUDA, m) {
  m.impl("dw_fwd", &hdnas::dw_fwd_cuda_op);
  m.impl("dw_bwd", &hdnas::dw_bwd_cuda_op);
}
