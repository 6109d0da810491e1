// Device helpers shared by the CUDA depthwise kernels (torch-free: nvcc compiles these files
// standalone, `nvcc -arch=sm_90 -c dw_fwd.cu`).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "../hdnas_dw.h"

namespace hdnas {
namespace cuda_detail {

// Output tile of one CTA: kTileH x kTileW pixels, kThreadsX x kThreadsY threads; each thread
// computes kTileH / kThreadsY rows of one column.  The input tile (with a halo of `radius`
// pixels, zero outside the image) sits in shared memory as the accumulation type.
constexpr int kTileW = 32;
constexpr int kTileH = 16;
constexpr int kThreadsX = 32;
constexpr int kThreadsY = 8;
constexpr int kRowsPerThread = kTileH / kThreadsY;
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGridZ = 65535;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// Loads act(plane) rows [y0 - R, y0 + kTileH + R) x cols [x0 - R, x0 + kTileW + R) into smem
// (row stride SW = kTileW + 2R), zero outside the image.
template <typename T, typename Acc>
__device__ __forceinline__ void load_haloed_tile(Acc* smem, const T* __restrict__ plane, int H,
                                                 int W, int y0, int x0, int R, bool relu) {
  const int SH = kTileH + 2 * R, SW = kTileW + 2 * R;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int i = tid; i < SH * SW; i += kThreads) {
    const int sy = i / SW, sx = i - sy * SW;
    const int gy = y0 - R + sy, gx = x0 - R + sx;
    Acc v = Acc(0);
    if (gy >= 0 && gy < H && gx >= 0 && gx < W) {
      v = to_acc(plane[(long long)gy * W + gx]);
      if (relu && v < Acc(0)) v = Acc(0);
    }
    smem[i] = v;
  }
}

// Number of CTAs along z for `planes` planes (the kernels loop over z with a stride).
inline int grid_z(long long planes) {
  return (int)(planes < kMaxGridZ ? planes : kMaxGridZ);
}

inline bool taps_ok(const TapTable& t) {
  if (t.G < 1 || t.G > kMaxGroups || t.T < 1 || t.T > kMaxTaps) return false;
  if (t.radius < 0 || t.radius > kMaxRadius) return false;
  for (int g = 0; g < t.G; ++g) {
    if (t.ntaps[g] < 0 || t.ntaps[g] > t.T) return false;
    for (int i = 0; i < t.ntaps[g]; ++i) {
      if (t.dy[g][i] < -t.radius || t.dy[g][i] > t.radius) return false;
      if (t.dx[g][i] < -t.radius || t.dx[g][i] > t.radius) return false;
    }
  }
  return true;
}

}  // namespace cuda_detail
}  // namespace hdnas
