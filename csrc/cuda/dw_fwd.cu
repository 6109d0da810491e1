// CUDA forward of the tap-table depthwise engine (see ../hdnas_dw.h).  One CTA per
// (output tile, input plane): the haloed act(x) tile is loaded into shared memory once and every
// group reading that plane is computed from it (the shared-input first stage reads x once).
// fp32 (fp64 for double) accumulation; fp16 / bf16 / fp32 / fp64 storage.
#include "dw_common.cuh"

namespace hdnas {
namespace cuda_detail {

template <typename T>
__global__ void __launch_bounds__(kThreads)
dw_fwd_kernel(const TapTable taps, const DwShape s, const T* __restrict__ x,
              const T* __restrict__ w, T* __restrict__ y) {
  using Acc = typename AccOf<T>::type;
  HDNAS_DYNAMIC_SHARED(unsigned char, smem_raw);
  Acc* tile = reinterpret_cast<Acc*>(smem_raw);
  const int R = taps.radius, SW = kTileW + 2 * R;
  const int C = s.C, H = s.H, W = s.W, G = taps.G;
  const long long cin = s.shared_input ? C : (long long)G * C;
  const long long planes = (long long)s.N * cin;
  const int x0 = blockIdx.x * kTileW, y0 = blockIdx.y * kTileH;
  const int ox = x0 + threadIdx.x;
  for (long long plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const long long n = plane / cin;
    const int ci = (int)(plane - n * cin);
    __syncthreads();  // the previous plane's readers are done with the tile
    load_haloed_tile<T, Acc>(tile, x + plane * H * W, H, W, y0, x0, R, s.relu_input != 0);
    __syncthreads();
    const int g0 = s.shared_input ? 0 : ci / C, g1 = s.shared_input ? G : g0 + 1;
    const int c = s.shared_input ? ci : ci - g0 * C;
    for (int g = g0; g < g1; ++g) {
      const T* wp = w + ((long long)g * C + c) * taps.T;
      Acc acc[kRowsPerThread];
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) acc[r] = Acc(0);
      const int nt = taps.ntaps[g];
      for (int t = 0; t < nt; ++t) {
        const Acc k = to_acc(wp[t]);
        const Acc* src = tile + (R + taps.dy[g][t]) * SW + R + taps.dx[g][t] + threadIdx.x;
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r)
          acc[r] += k * src[(threadIdx.y + r * kThreadsY) * SW];
      }
      T* yp = y + ((n * G + g) * C + c) * (long long)H * W;
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        const int oy = y0 + threadIdx.y + r * kThreadsY;
        if (oy < H && ox < W) yp[(long long)oy * W + ox] = from_acc<T>(acc[r]);
      }
    }
  }
}

template <typename T>
static int launch_fwd(const TapTable& taps, const DwShape& s, const void* x, const void* w,
                      void* y, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const long long cin = s.shared_input ? s.C : (long long)taps.G * s.C;
  const long long planes = (long long)s.N * cin;
  if (planes == 0 || s.H == 0 || s.W == 0) return 0;
  const int R = taps.radius;
  const size_t smem = sizeof(Acc) * (kTileH + 2 * R) * (kTileW + 2 * R);
  dim3 block(kThreadsX, kThreadsY);
  dim3 grid((s.W + kTileW - 1) / kTileW, (s.H + kTileH - 1) / kTileH, grid_z(planes));
  if (grid.y > 65535) return -1;
  launch(dw_fwd_kernel<T>, grid, block, smem, stream, taps, s, static_cast<const T*>(x),
         static_cast<const T*>(w), static_cast<T*>(y));
  return (int)cudaGetLastError();
}

}  // namespace cuda_detail

int dw_fwd_cuda(const TapTable& taps, const DwShape& s, DType dtype, const void* x,
                const void* w, void* y, void* stream) {
  using namespace cuda_detail;
  if (!taps_ok(taps) || s.N < 0 || s.C < 1 || s.H < 0 || s.W < 0) return -1;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return launch_fwd<float>(taps, s, x, w, y, st);
    case kFloat64: return launch_fwd<double>(taps, s, x, w, y, st);
    case kFloat16: return launch_fwd<__half>(taps, s, x, w, y, st);
    case kBFloat16: return launch_fwd<__nv_bfloat16>(taps, s, x, w, y, st);
  }
  return -1;
}

}  // namespace hdnas
