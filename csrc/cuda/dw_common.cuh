// Device helpers shared by the CUDA depthwise kernels (torch-free: nvcc compiles these files
// standalone, `nvcc -arch=sm_90 -c dw_fwd.cu`).  The same source also compiles as plain C++ with
// -DHDNAS_CUDA_HOST: the kernels then run on the host under the emulation of
// ../cuda_host/cuda_host.h (tests, sanitizers).  Kernels are launched only through `launch`
// and take dynamic shared memory only through HDNAS_DYNAMIC_SHARED, so both builds run the very
// same launch sites.
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define HDNAS_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#elif defined(HDNAS_CUDA_HOST)
#include "../cuda_host/cuda_host.h"
#define HDNAS_DYNAMIC_SHARED(T, name) T* const name = ::cuda_host::dynamic_shared<T>()
#else
#error "compile with nvcc, or as C++ with -DHDNAS_CUDA_HOST (the host emulation, csrc/cuda_host)"
#endif

#include "../hdnas_dw.h"

namespace hdnas {
namespace cuda_detail {

// kernel<<<grid, block, shmem, stream>>>(args...); errors via cudaGetLastError().
#if defined(__CUDACC__)
template <typename... P, typename... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shmem, cudaStream_t stream,
                   A&&... args) {
  kernel<<<grid, block, shmem, stream>>>(static_cast<A&&>(args)...);
}
#else
using ::cuda_host::launch;
#endif

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
// CTAs along z (planes beyond it are looped over).  The host tests lower it to run the loop.
#ifndef HDNAS_MAX_GRID_Z
#define HDNAS_MAX_GRID_Z 65535
#endif
constexpr int kMaxGridZ = HDNAS_MAX_GRID_Z;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
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
