// CPU side of the hdnas native depthwise engine (see ../hdnas_dw.h for the math): the torch
// ops (dw_fwd.cpp, dw_bwd.cpp) and the run-time choice of the kernel variant (dw_dispatch.cpp);
// the kernels themselves are torch-free (dw_isa.h, dw_simd_impl.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <set>
#include <string>
#include <vector>

#include "dw_isa.h"

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

// The DwArgs of a call (no tensor pointers yet).
cpu::DwArgs make_args(const at::Tensor& x, const CpuTaps& tp, int64_t C, bool relu_input,
                      bool shared_input, int64_t stride);

// Runs kernel `fn` of the active variant over the N * Cin tasks, split over torch's threads.
void run_tasks(int (*const cpu::IsaKernels::*fn)(const cpu::DwArgs&, int64_t, int64_t),
               const cpu::DwArgs& a, const char* op);

at::Tensor dw_fwd_cpu(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef offs,
                      at::IntArrayRef ntaps, bool relu_input, bool shared_input, int64_t stride);

std::tuple<at::Tensor, at::Tensor> dw_bwd_cpu(const at::Tensor& gy, const at::Tensor& x,
                                              const at::Tensor& w, at::IntArrayRef offs,
                                              at::IntArrayRef ntaps, bool relu_input,
                                              bool shared_input, bool need_gx, bool need_gw,
                                              int64_t stride);

namespace cpu {

// The variant that runs (chosen at the first call: HDNAS_NATIVE_ISA, else the best this CPU
// runs); raises for a bad HDNAS_NATIVE_ISA.
const IsaKernels& active_kernels();
// This CPU's features among those the variants need (empty off x86).
std::set<std::string> cpu_features();
// The variants compiled into this library, worst first.
std::vector<std::string> compiled_isas();
// The variant to run given the CPU's `features`, the `compiled` variants and a `forced` name
// ("" or "auto": the best runnable one); "" and *error set when `forced` cannot run.
std::string choose_isa(const std::set<std::string>& features,
                       const std::vector<std::string>& compiled, const std::string& forced,
                       std::string* error);

// The ops hdnas_native::isa, set_isa, isa_supported, choose_isa, cpu_features.
std::string isa_op();
std::string set_isa_op(const std::string& name);
std::vector<std::string> isa_supported_op();
std::string choose_isa_op(const std::vector<std::string>& features, const std::string& forced);
std::vector<std::string> cpu_features_op();

}  // namespace cpu
}  // namespace hdnas
