// Registers the hdnas_native ops with the dispatcher (no pybind: the library is loaded with
// torch.ops.load_library).  Autograd and fake (meta) kernels are registered from Python
// (hdnas/mixed/native.py).  The CUDA implementations register from csrc/cuda/binding_cuda.cpp
// when the CUDA extension is built.
#include <torch/library.h>

#include "cpu/dw_cpu.h"

TORCH_LIBRARY(hdnas_native, m) {
  m.def("dw_fwd(Tensor x, Tensor w, int[] offs, int[] ntaps, bool relu_input, bool shared_input)"
        " -> Tensor");
  m.def("dw_bwd(Tensor grad_y, Tensor x, Tensor w, int[] offs, int[] ntaps, bool relu_input,"
        " bool shared_input, bool need_gx, bool need_gw) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hdnas_native, CPU, m) {
  m.impl("dw_fwd", &hdnas::dw_fwd_cpu);
  m.impl("dw_bwd", &hdnas::dw_bwd_cpu);
}
