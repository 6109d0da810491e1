// C entry points of the CUDA kernels run on the host emulation, for tests through ctypes
// (tests/test_cuda_host.py compares them with the PyTorch reference).  The tap table arrives as
// the torch binding (../cuda/binding_cuda.cpp) gets it: G x T (dy, dx) offsets and the taps per
// group; tensors are contiguous NCHW host buffers.  Return 0, else the launchers' error code
// (hdnas_host_last_error() says more for a failed launch).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "../hdnas_dw.h"
#include "cuda_host.h"

namespace {

// False if the table does not fit a TapTable (the launchers check the rest).
bool make_table(int G, int T, const int64_t* offs, const int64_t* ntaps, hdnas::TapTable& t) {
  using namespace hdnas;
  if (G < 1 || G > kMaxGroups || T < 1 || T > kMaxTaps) return false;
  t.G = G;
  t.T = T;
  t.radius = 0;
  for (int g = 0; g < G; ++g) {
    t.ntaps[g] = int(ntaps[g]);
    for (int i = 0; i < T; ++i) {
      const int64_t dy = offs[(g * T + i) * 2], dx = offs[(g * T + i) * 2 + 1];
      if (std::llabs(dy) > 127 || std::llabs(dx) > 127) return false;
      t.dy[g][i] = int8_t(dy);
      t.dx[g][i] = int8_t(dx);
      if (i < ntaps[g])
        t.radius = std::max(t.radius, int(std::max(std::llabs(dy), std::llabs(dx))));
    }
  }
  return true;
}

}  // namespace

extern "C" {

int hdnas_host_dw_fwd(int G, int T, const int64_t* offs, const int64_t* ntaps, int N, int C, int H,
                      int W, int relu, int shared, int dtype, const void* x, const void* w,
                      void* y) {
  hdnas::TapTable t;
  if (!make_table(G, T, offs, ntaps, t)) return -1;
  const hdnas::DwShape s{N, C, H, W, relu, shared};
  return hdnas::dw_fwd_cuda(t, s, hdnas::DType(dtype), x, w, y, nullptr);
}

// gx / gw may be null (not computed).  The workspace is allocated here.
int hdnas_host_dw_bwd(int G, int T, const int64_t* offs, const int64_t* ntaps, int N, int C, int H,
                      int W, int relu, int shared, int dtype, const void* gy, const void* x,
                      const void* w, void* gx, void* gw) {
  hdnas::TapTable t;
  if (!make_table(G, T, offs, ntaps, t)) return -1;
  const hdnas::DwShape s{N, C, H, W, relu, shared};
  const long long elems = hdnas::dw_bwd_cuda_workspace_elems(t, s);
  const size_t acc = dtype == hdnas::kFloat64 ? sizeof(double) : sizeof(float);
  std::vector<unsigned char> ws(gw != nullptr && elems > 0 ? size_t(elems) * acc : 0);
  return hdnas::dw_bwd_cuda(t, s, hdnas::DType(dtype), gy, x, w, gx, gw,
                            ws.empty() ? nullptr : ws.data(), nullptr);
}

const char* hdnas_host_last_error() { return cuda_host::last_error_message(); }

// The half-type stand-ins of cuda_host.h, to compare with torch's conversions.
void hdnas_host_to_half(const float* in, uint16_t* out, int64_t n, int bf16) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = bf16 ? __float2bfloat16_rn(in[i]).bits : __float2half_rn(in[i]).bits;
}
void hdnas_host_from_half(const uint16_t* in, float* out, int64_t n, int bf16) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = bf16 ? __bfloat162float(__nv_bfloat16{in[i]}) : __half2float(__half{in[i]});
}

}  // extern "C"
