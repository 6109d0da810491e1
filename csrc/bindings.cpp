// Registers the hdnas_native ops with the dispatcher (no pybind: the library is loaded with
// torch.ops.load_library).  Autograd and fake (meta) kernels are registered from Python
// (hdnas/mixed/native.py).  The CUDA implementations register from csrc/cuda/binding_cuda.cpp
// when the CUDA extension is built.
#include <torch/library.h>

#include "cpu/dw_cpu.h"

namespace hdnas {
std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x);
at::Tensor max_pool3x3_cpu(const at::Tensor& x, int64_t stride);
at::Tensor max_pool3x3_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, int64_t stride);
at::Tensor bn_sum_cpu(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& var,
                      const at::Tensor& scale, double eps, int64_t groups);
std::tuple<at::Tensor, at::Tensor> bn_sum_backward_cpu(const at::Tensor& grad_y, const at::Tensor& u,
                                                       const at::Tensor& mean, const at::Tensor& var,
                                                       const at::Tensor& scale, double eps,
                                                       int64_t groups);
at::Tensor pw_cpu(const at::Tensor& x, const at::Tensor& w);
at::Tensor pw_wgrad_cpu(const at::Tensor& grad_y, const at::Tensor& x, int64_t groups);
bool cpu_cache_enable(bool on);
bool cpu_cache_enabled();
std::vector<int64_t> cpu_cache_stats();
int64_t cpu_cache_release();
}

TORCH_LIBRARY(hdnas_native, m) {
  // stride 2 (CPU): the even output pixels, y[..., h, i] of the stride-1 op at (2h, 2i)
  m.def("dw_fwd(Tensor x, Tensor w, int[] offs, int[] ntaps, bool relu_input, bool shared_input,"
        " int stride=1) -> Tensor");
  m.def("dw_bwd(Tensor grad_y, Tensor x, Tensor w, int[] offs, int[] ntaps, bool relu_input,"
        " bool shared_input, bool need_gx, bool need_gw, int stride=1) -> (Tensor, Tensor)");
  // The CPU kernel variant (vector ISA, see csrc/cpu/dw_isa.h): the one running (chosen at the
  // first call from HDNAS_NATIVE_ISA or the CPU's features), a switch (for tests and benchmarks;
  // '' or 'auto': the best this CPU runs), the variants this CPU runs, the pure choice for a
  // given feature set (tests), and the CPU features that the choice looks at.
  // The batch statistics of training-mode BN: (mean, biased variance) per channel, float64
  // (csrc/cpu/bn_stats.cpp).
  m.def("bn_stats(Tensor x) -> (Tensor, Tensor)");
  // 3x3 max pooling, padding 1, stride 1 or 2, NCHW, and its backward (csrc/cpu/max_pool.cpp).
  m.def("max_pool3x3(Tensor x, int stride) -> Tensor");
  m.def("max_pool3x3_backward(Tensor grad_y, Tensor x, int stride) -> Tensor");
  // Training-mode BN of channel groups, scaled per channel and summed over the groups, with the
  // batch statistics given (float64), and its backward (csrc/cpu/bn_sum.cpp).
  m.def("bn_sum(Tensor u, Tensor mean, Tensor var, Tensor scale, float eps, int groups) -> Tensor");
  m.def("bn_sum_backward(Tensor grad_y, Tensor u, Tensor mean, Tensor var, Tensor scale, float eps,"
        " int groups) -> (Tensor, Tensor)");
  // Pointwise (1x1) convolutions of channel groups and their weight gradient (csrc/cpu/pw.cpp).
  m.def("pw(Tensor x, Tensor w) -> Tensor");
  m.def("pw_wgrad(Tensor grad_y, Tensor x, int groups) -> Tensor");
  // The caching CPU allocator (csrc/cpu/cpu_cache.cpp): install/uninstall (returns whether it
  // was installed), whether it is, (live, cached, peak mapped, hits, misses, unmapped), unmap the cached blocks.
  m.def("cpu_cache_enable(bool on) -> bool", &hdnas::cpu_cache_enable);
  m.def("cpu_cache_enabled() -> bool", &hdnas::cpu_cache_enabled);
  m.def("cpu_cache_stats() -> int[]", &hdnas::cpu_cache_stats);
  m.def("cpu_cache_release() -> int", &hdnas::cpu_cache_release);
  m.def("isa() -> str", &hdnas::cpu::isa_op);
  m.def("set_isa(str name) -> str", &hdnas::cpu::set_isa_op);
  m.def("isa_supported() -> str[]", &hdnas::cpu::isa_supported_op);
  m.def("choose_isa(str[] features, str forced) -> str", &hdnas::cpu::choose_isa_op);
  m.def("cpu_features() -> str[]", &hdnas::cpu::cpu_features_op);
}

TORCH_LIBRARY_IMPL(hdnas_native, CPU, m) {
  m.impl("dw_fwd", &hdnas::dw_fwd_cpu);
  m.impl("dw_bwd", &hdnas::dw_bwd_cpu);
  m.impl("bn_stats", &hdnas::bn_stats_cpu);
  m.impl("max_pool3x3", &hdnas::max_pool3x3_cpu);
  m.impl("max_pool3x3_backward", &hdnas::max_pool3x3_backward_cpu);
  m.impl("bn_sum", &hdnas::bn_sum_cpu);
  m.impl("bn_sum_backward", &hdnas::bn_sum_backward_cpu);
  m.impl("pw", &hdnas::pw_cpu);
  m.impl("pw_wgrad", &hdnas::pw_wgrad_cpu);
}
