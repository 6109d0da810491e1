// The AVX2 + FMA variant of the CPU depthwise kernels (see dw_isa.h): 32-byte vectors, blocked
// for 16 ymm registers.  The kernels are compiled under a target pragma (not -m flags), so the
// rest of the library stays baseline code; dw_dispatch.cpp runs them only where the CPU has
// AVX2 and FMA.
#include "dw_isa.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HDNAS_VBYTES 32
#define HDNAS_TILE_R 3   // 3 rows x 4 ymm (a 32-pixel fp32 row) = 12 accumulators + broadcast
#define HDNAS_TILE_NV 4
#define HDNAS_GW_M 8     // 8 accumulators + 1 gradient vector; 8 tap pointers in GPRs
#define HDNAS_GW_U 1
#define HDNAS_PW_R 4    // pointwise: 4 x 2 ymm accumulators + 2 inputs + broadcast; 3 x 3 + 3 + 1: of 16
#define HDNAS_PW_NV 2
#define HDNAS_PWW_M 3
#define HDNAS_PWW_U 3
#define HDNAS_ISA_NAME "avx2"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#include "dw_simd_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace hdnas {
namespace cpu {
const IsaKernels* kernels_avx2() { return &kTable; }  // baseline code: only hands out the table
}  // namespace cpu
}  // namespace hdnas

#else
namespace hdnas {
namespace cpu {
const IsaKernels* kernels_avx2() { return nullptr; }  // not an x86 GCC/Clang build
}  // namespace cpu
}  // namespace hdnas
#endif
