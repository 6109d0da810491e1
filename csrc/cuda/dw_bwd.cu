// CUDA backward of the tap-table depthwise engine (see ../hdnas_dw.h).
//   dw_bwd_gx_kernel : one CTA per (tile, input plane); for each group reading the plane, the
//                      haloed grad-output tile goes to shared memory and the flipped taps are
//                      accumulated in registers; times ReLU'(x) at the end.
//   dw_bwd_gw_kernel : one CTA per (tile, output plane); per tap, each thread's products are
//                      reduced warp-by-warp (shuffles) then across warps in a fixed order, and
//                      written to a partials workspace [G*C][N*tiles][T] (fp32; fp64 for double).
//   dw_reduce_kernel : one thread per (g, c, t) sums its partials in a fixed order.
// No atomics: the weight gradient is bitwise deterministic.
#include "dw_common.cuh"

namespace hdnas {
namespace cuda_detail {

template <typename T>
__global__ void __launch_bounds__(kThreads)
dw_bwd_gx_kernel(const TapTable taps, const DwShape s, const T* __restrict__ gy,
                 const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ gx) {
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
    const int g0 = s.shared_input ? 0 : ci / C, g1 = s.shared_input ? G : g0 + 1;
    const int c = s.shared_input ? ci : ci - g0 * C;
    Acc acc[kRowsPerThread];
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) acc[r] = Acc(0);
    for (int g = g0; g < g1; ++g) {
      __syncthreads();
      load_haloed_tile<T, Acc>(tile, gy + ((n * G + g) * C + c) * (long long)H * W, H, W, y0, x0,
                               R, false);
      __syncthreads();
      const T* wp = w + ((long long)g * C + c) * taps.T;
      const int nt = taps.ntaps[g];
      for (int t = 0; t < nt; ++t) {
        const Acc k = to_acc(wp[t]);
        const Acc* src = tile + (R - taps.dy[g][t]) * SW + R - taps.dx[g][t] + threadIdx.x;
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r)
          acc[r] += k * src[(threadIdx.y + r * kThreadsY) * SW];
      }
    }
    const T* xp = x + plane * (long long)H * W;
    T* gp = gx + plane * (long long)H * W;
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int oy = y0 + threadIdx.y + r * kThreadsY;
      if (oy < H && ox < W) {
        const long long i = (long long)oy * W + ox;
        Acc v = acc[r];
        if (s.relu_input && !(to_acc(xp[i]) > Acc(0))) v = Acc(0);
        gp[i] = from_acc<T>(v);
      }
    }
  }
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
dw_bwd_gw_kernel(const TapTable taps, const DwShape s, const T* __restrict__ gy,
                 const T* __restrict__ x, typename AccOf<T>::type* __restrict__ part) {
  using Acc = typename AccOf<T>::type;
  HDNAS_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int R = taps.radius, SW = kTileW + 2 * R, SH = kTileH + 2 * R;
  Acc* tile = reinterpret_cast<Acc*>(smem_raw);
  Acc* red = tile + SH * SW;  // [kWarps][T]
  const int C = s.C, H = s.H, W = s.W, G = taps.G;
  const long long oplanes = (long long)s.N * G * C;
  const int tiles_x = gridDim.x, ntiles = gridDim.x * gridDim.y;
  const int tile_id = blockIdx.y * tiles_x + blockIdx.x;
  const int x0 = blockIdx.x * kTileW, y0 = blockIdx.y * kTileH;
  const int ox = x0 + threadIdx.x;
  const int tid = threadIdx.y * kThreadsX + threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (long long op = blockIdx.z; op < oplanes; op += gridDim.z) {
    const long long n = op / ((long long)G * C);
    const int gc = (int)(op - n * G * C), g = gc / C, c = gc - g * C;
    const long long cinp = s.shared_input ? n * C + c : n * (long long)G * C + gc;
    __syncthreads();
    load_haloed_tile<T, Acc>(tile, x + cinp * H * W, H, W, y0, x0, R, s.relu_input != 0);
    Acc gv[kRowsPerThread];
    const T* gp = gy + op * (long long)H * W;
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int oy = y0 + threadIdx.y + r * kThreadsY;
      gv[r] = (oy < H && ox < W) ? to_acc(gp[(long long)oy * W + ox]) : Acc(0);
    }
    __syncthreads();
    const int nt = taps.ntaps[g];
    for (int t = 0; t < nt; ++t) {
      const Acc* src = tile + (R + taps.dy[g][t]) * SW + R + taps.dx[g][t] + threadIdx.x;
      Acc v = Acc(0);
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) v += src[(threadIdx.y + r * kThreadsY) * SW] * gv[r];
      v = warp_sum(v);
      if (lane == 0) red[warp * taps.T + t] = v;
    }
    __syncthreads();
    for (int t = tid; t < taps.T; t += kThreads) {
      Acc v = Acc(0);
      if (t < nt) {
        for (int wi = 0; wi < kWarps; ++wi) v += red[wi * taps.T + t];
      }
      part[((long long)gc * (s.N * (long long)ntiles) + n * ntiles + tile_id) * taps.T + t] = v;
    }
  }
}

template <typename T>
__global__ void dw_reduce_kernel(const typename AccOf<T>::type* __restrict__ part,
                                 T* __restrict__ gw, long long GC, long long nparts, int Tt) {
  using Acc = typename AccOf<T>::type;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= GC * Tt) return;
  const long long gc = i / Tt;
  const int t = (int)(i - gc * Tt);
  Acc v = Acc(0);
  const Acc* p = part + gc * nparts * Tt + t;
  for (long long j = 0; j < nparts; ++j) v += p[j * Tt];
  gw[i] = from_acc<T>(v);
}

template <typename T>
static int launch_bwd(const TapTable& taps, const DwShape& s, const void* gy, const void* x,
                      const void* w, void* gx, void* gw, void* workspace, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const int R = taps.radius;
  dim3 block(kThreadsX, kThreadsY);
  const int tx = (s.W + kTileW - 1) / kTileW, ty = (s.H + kTileH - 1) / kTileH;
  if (ty > 65535) return -1;
  const size_t tile_bytes = sizeof(Acc) * (kTileH + 2 * R) * (kTileW + 2 * R);
  const long long GC = (long long)taps.G * s.C;
  if (gx != nullptr && s.N > 0 && s.H > 0 && s.W > 0) {
    const long long cin = s.shared_input ? s.C : GC;
    dim3 grid(tx, ty, grid_z((long long)s.N * cin));
    launch(dw_bwd_gx_kernel<T>, grid, block, tile_bytes, stream, taps, s,
           static_cast<const T*>(gy), static_cast<const T*>(x), static_cast<const T*>(w),
           static_cast<T*>(gx));
    int e = (int)cudaGetLastError();
    if (e) return e;
  }
  if (gw != nullptr) {
    Acc* part = static_cast<Acc*>(workspace);
    const long long nparts = (long long)s.N * tx * ty;
    if (nparts > 0) {
      if (workspace == nullptr) return -1;
      dim3 grid(tx, ty, grid_z((long long)s.N * GC));
      const size_t bytes = tile_bytes + sizeof(Acc) * kWarps * taps.T;
      launch(dw_bwd_gw_kernel<T>, grid, block, bytes, stream, taps, s, static_cast<const T*>(gy),
             static_cast<const T*>(x), part);
      int e = (int)cudaGetLastError();
      if (e) return e;
    }
    const long long total = GC * taps.T;
    const int threads = 256;
    launch(dw_reduce_kernel<T>, dim3((unsigned)((total + threads - 1) / threads)), dim3(threads), 0,
           stream, part, static_cast<T*>(gw), GC, nparts, taps.T);
    return (int)cudaGetLastError();
  }
  return 0;
}

}  // namespace cuda_detail

long long dw_bwd_cuda_workspace_elems(const TapTable& taps, const DwShape& s) {
  using namespace cuda_detail;
  const long long tx = (s.W + kTileW - 1) / kTileW, ty = (s.H + kTileH - 1) / kTileH;
  return (long long)taps.G * s.C * s.N * tx * ty * taps.T;
}

int dw_bwd_cuda(const TapTable& taps, const DwShape& s, DType dtype, const void* gy,
                const void* x, const void* w, void* gx, void* gw, void* workspace, void* stream) {
  using namespace cuda_detail;
  if (!taps_ok(taps) || s.N < 0 || s.C < 1 || s.H < 0 || s.W < 0) return -1;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return launch_bwd<float>(taps, s, gy, x, w, gx, gw, workspace, st);
    case kFloat64: return launch_bwd<double>(taps, s, gy, x, w, gx, gw, workspace, st);
    case kFloat16: return launch_bwd<__half>(taps, s, gy, x, w, gx, gw, workspace, st);
    case kBFloat16: return launch_bwd<__nv_bfloat16>(taps, s, gy, x, w, gx, gw, workspace, st);
  }
  return -1;
}

}  // namespace hdnas
