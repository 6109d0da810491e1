// cuda_host.h: the CUDA execution model on the host, so that the torch-free kernels of csrc/cuda
// (the very source nvcc compiles) run as plain C++ in tests, under AddressSanitizer / UBSan:
//
//   g++ -std=c++17 -DHDNAS_CUDA_HOST -x c++ csrc/cuda/dw_fwd.cu ... csrc/cuda_host/cuda_host.cpp
//
// (csrc/cuda/dw_common.cuh includes this header when HDNAS_CUDA_HOST is defined; nvcc never
// sees it.)  Model:
//  * a launch runs its blocks one after another on the calling OS thread; each block runs its
//    threads as cooperative fibers (own stacks) that switch only at __syncthreads() and at warp
//    shuffles, so a run is deterministic.  The order in which the fibers (and blocks) are resumed
//    is set by set_schedule(): running a kernel under several orders and comparing the outputs
//    bitwise exposes a read and a write of the same data not separated by a barrier (a race);
//  * dynamic shared memory (HDNAS_DYNAMIC_SHARED / dynamic_shared<T>()) is a heap buffer of
//    exactly the requested size, filled with 0xFF bytes (NaN as float/double) at the start of
//    every block, so ASan catches an access past its end and a read before any write shows up;
//  * static `__shared__` arrays become function-local statics: one copy shared by the block's
//    fibers, reused by the next block (launches are serialized by a mutex).  Unlike dynamic
//    shared memory they are not poisoned between blocks;
//  * a block whose threads do not all reach the same barrier (a thread returned, or a warp waits
//    in a shuffle while the others wait in __syncthreads) is a deadlock: the launch stops and
//    cudaGetLastError() returns cudaErrorLaunchFailure, last_error_message() says why;
//  * launch configurations CUDA rejects are rejected the same way (block > 1024 threads,
//    grid.y / grid.z > 65535, a zero dimension, dynamic shared memory > 48 KiB).
// Not modelled: atomics, __syncwarp, partial-warp shuffle masks (rejected), streams
// (everything is synchronous), __launch_bounds__ (ignored), memory spaces (all pointers are
// host pointers).  Supported types: __half and __nv_bfloat16 as 16-bit storage with the
// round-to-nearest-even conversions below.
#pragma once

#if defined(__CUDACC__)
#error "cuda_host.h emulates CUDA on the host; nvcc compiles the kernels natively"
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- keywords ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // see above: one copy, shared by the fibers of the running block
// (__restrict__ is a GNU C++ keyword already.)

// ---- runtime types -------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
// The error of the last failed launch on this OS thread (then reset to cudaSuccess).
cudaError_t cudaGetLastError();

// ---- half types: 16-bit storage, conversions round to nearest even ---------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float cuda_host_bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t cuda_host_float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float __bfloat162float(__nv_bfloat16 h) {
  return cuda_host_bits_to_float(uint32_t(h.bits) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = cuda_host_float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};  // NaN stays NaN
  return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};                    // ties to even
}

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, mant = h.bits & 0x3ffu;
  if (exp == 0) {  // zero / subnormal: mant * 2^-24, exact in float
    const float v = float(mant) * 5.9604644775390625e-08f;
    return cuda_host_bits_to_float(cuda_host_float_to_bits(v) | sign);
  }
  if (exp == 31) return cuda_host_bits_to_float(sign | 0x7f800000u | (mant << 13));
  return cuda_host_bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}
inline __half __float2half_rn(float f) {
  const uint32_t u = cuda_host_float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};  // NaN
  if (a >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // >= 65520: rounds to infinity
  if (a >= 0x38800000u) {  // normal half (>= 2^-14): drop 13 mantissa bits
    uint32_t h = (a >> 13) - (112u << 10);
    const uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return {uint16_t(sign | h)};
  }
  // subnormal half: a = m * 2^(e-150) = q * 2^-24 with q = m >> (126 - e), rounded
  const uint32_t e = a >> 23;
  if (e < 102) return {sign};  // below 2^-25: rounds to zero
  const uint32_t m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return {uint16_t(sign | q)};
}

namespace cuda_host {

// The order in which the fibers of a block are resumed in each scheduling round, and the order
// of the blocks: kForward (thread / block 0 first), kReverse, kShuffle (a fresh pseudo-random
// permutation every round, from `seed`).  Applies to the launches that follow, on any thread.
enum class Schedule { kForward, kReverse, kShuffle };
void set_schedule(Schedule s, unsigned seed = 0);
// Switch fibers with swapcontext (portable; a system call per switch) instead of the x86-64
// register switch; false if that choice is not available here (off x86-64: always ucontext).
bool set_ucontext(bool on);
// Why the last failed launch failed ("" if none has).
const char* last_error_message();

namespace detail {

// What the running fiber sees as threadIdx, blockIdx, blockDim, gridDim.
struct Current {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  unsigned char* dynamic_smem;
};
extern Current g_cur;

void sync_block();
// Warp shuffle plumbing: check `mask` and `width`, and return the exchange buffer (32 slots of
// 8 bytes) of this shuffle, where this lane (`*lane`) stores its value before warp_barrier().
unsigned char* shuffle_begin(unsigned mask, int width, int* lane);
void warp_barrier();
// Run `body(arg)` in every thread of every block; returns the launch's error.
cudaError_t run_grid(dim3 grid, dim3 block, size_t shmem, void (*body)(void*), void* arg);
void set_last_error(cudaError_t e);

template <typename T, typename SrcLane>
T shuffle(unsigned mask, T v, int width, SrcLane src_lane) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "shuffles move values of at most 8 bytes");
  int lane = 0;
  unsigned char* slots = shuffle_begin(mask, width, &lane);
  std::memcpy(slots + 8 * lane, &v, sizeof(T));
  warp_barrier();
  T out;
  std::memcpy(&out, slots + 8 * src_lane(lane, lane & ~(width - 1)), sizeof(T));
  return out;
}

}  // namespace detail

// The dynamic shared memory of the running block (see HDNAS_DYNAMIC_SHARED in dw_common.cuh).
template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(detail::g_cur.dynamic_smem);
}

// kernel<<<grid, block, shmem, stream>>>(args...), with the arguments converted to the kernel's
// parameter types as a launch does.  Synchronous; errors via cudaGetLastError().
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shmem, cudaStream_t /*stream*/,
            A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
  struct Pack {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
  };
  Pack pack{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  const cudaError_t e = detail::run_grid(grid, block, shmem, [](void* p) {
    Pack* pk = static_cast<Pack*>(p);
    std::apply(pk->kernel, pk->args);  // each thread gets its own copy of the parameters
  }, &pack);
  if (e != cudaSuccess) detail::set_last_error(e);
}

}  // namespace cuda_host

// ---- built-in variables and intrinsics ---------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::cuda_host::detail::g_cur.thread_idx))
#define blockIdx (static_cast<const uint3&>(::cuda_host::detail::g_cur.block_idx))
#define blockDim (static_cast<const dim3&>(::cuda_host::detail::g_cur.block_dim))
#define gridDim (static_cast<const dim3&>(::cuda_host::detail::g_cur.grid_dim))
constexpr int warpSize = 32;

inline void __syncthreads() { ::cuda_host::detail::sync_block(); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::cuda_host::detail::shuffle(mask, v, width, [&](int, int base) {
    return base + (src & (width - 1));
  });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::cuda_host::detail::shuffle(mask, v, width, [&](int lane, int base) {
    return lane - base >= int(delta) ? lane - int(delta) : lane;
  });
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::cuda_host::detail::shuffle(mask, v, width, [&](int lane, int base) {
    return lane - base + int(delta) < width ? lane + int(delta) : lane;
  });
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  // a lane may read from its own or an earlier group of `width` lanes, else keeps its value
  return ::cuda_host::detail::shuffle(mask, v, width, [&](int lane, int base) {
    const int src = lane ^ lane_mask;
    return src >= 0 && src < base + width ? src : lane;
  });
}
