// CPU forward of the tap-table depthwise engine: argument checks, the tap table, and the task
// loop over torch's threads.  One task per (n, input plane): it pads its plane once (ReLU
// applied on load) and writes every output group that reads it, so the shared first stage reads
// x once for all groups.  The kernels are those of the active ISA variant (dw_dispatch.cpp).
#include "dw_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "../hdnas_dw.h"

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

cpu::DwArgs make_args(const at::Tensor& x, const CpuTaps& tp, int64_t C, bool relu_input,
                      bool shared_input, int64_t stride) {
  cpu::DwArgs a{};
  switch (x.scalar_type()) {
    case at::kFloat: a.dtype = kFloat32; break;
    case at::kDouble: a.dtype = kFloat64; break;
    case at::kHalf: a.dtype = kFloat16; break;
    case at::kBFloat16: a.dtype = kBFloat16; break;
    default: TORCH_CHECK(false, "hdnas_native: unsupported dtype ", x.scalar_type());
  }
  a.N = x.size(0);
  a.C = C;
  a.H = x.size(2);
  a.W = x.size(3);
  a.G = tp.G;
  a.T = tp.T;
  a.P = tp.radius;
  a.S = stride;
  a.Ho = (a.H - 1) / stride + 1;
  a.Wo = (a.W - 1) / stride + 1;
  a.relu = relu_input;
  a.shared = shared_input;
  a.ntaps = tp.ntaps.data();
  a.dy = tp.dy.data();
  a.dx = tp.dx.data();
  return a;
}

void run_tasks(int (*const cpu::IsaKernels::*fn)(const cpu::DwArgs&, int64_t, int64_t),
               const cpu::DwArgs& a, const char* op) {
  const cpu::IsaKernels& k = cpu::active_kernels();
  const int64_t tasks = a.N * (a.shared ? a.C : a.G * a.C);
  std::atomic<int> failed{0};
  // one task per (n, input plane); a task's result does not depend on how tasks are split
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int rc = (k.*fn)(a, begin, end);
    if (rc != 0) failed.store(rc);
  });
  TORCH_CHECK(failed.load() == 0, op, " (", k.name, " kernels): ",
              failed.load() == -1 ? "out of memory for the per-thread scratch buffers"
                                  : "internal error (unknown dtype code)");
}

at::Tensor dw_fwd_cpu(const at::Tensor& x_, const at::Tensor& w_, at::IntArrayRef offs,
                      at::IntArrayRef ntaps, bool relu_input, bool shared_input, int64_t stride) {
  TORCH_CHECK(x_.device().is_cpu(), "hdnas_native::dw_fwd (CPU): input on ", x_.device());
  TORCH_CHECK(stride == 1 || stride == 2, "hdnas_native::dw_fwd: stride 1 or 2, got ", stride);
  CpuTaps tp;
  const int64_t C = check_and_build_taps(x_, w_, offs, ntaps, shared_input, tp, "hdnas_native::dw_fwd");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  at::Tensor y = at::empty({N, tp.G * C, (H - 1) / stride + 1, (W - 1) / stride + 1}, x.options());
  if (y.numel() == 0) return y;
  cpu::DwArgs a = make_args(x, tp, C, relu_input, shared_input, stride);
  a.x = x.data_ptr();
  a.w = w.data_ptr();
  a.y = y.data_ptr();
  run_tasks(&cpu::IsaKernels::fwd, a, "hdnas_native::dw_fwd");
  return y;
}

}  // namespace hdnas
