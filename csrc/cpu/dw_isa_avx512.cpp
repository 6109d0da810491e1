// The AVX-512 variant of the CPU depthwise kernels (see dw_isa.h): 64-byte vectors, blocked for
// 32 zmm registers.  Compiled under a target pragma (not -m flags); dw_dispatch.cpp runs it only
// where the CPU (and OS) support AVX-512 F/BW/VL/DQ.
#include "dw_isa.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HDNAS_VBYTES 64
#define HDNAS_TILE_R 8   // 8 rows x 2 zmm (a 32-pixel fp32 row) = 16 accumulators + broadcast
#define HDNAS_TILE_NV 2
#define HDNAS_GW_M 8     // 8 taps x 2 zmm = 16 accumulators; 8 tap pointers in GPRs
#define HDNAS_GW_U 2
#define HDNAS_PW_R 8    // pointwise: 8 x 2 zmm accumulators + 2 inputs + broadcast; 4 x 4 + 4 + 1: of 32
#define HDNAS_PW_NV 2
#define HDNAS_PWW_M 4
#define HDNAS_PWW_U 4
#define HDNAS_ISA_NAME "avx512"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#endif
#include "dw_simd_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace hdnas {
namespace cpu {
const IsaKernels* kernels_avx512() { return &kTable; }  // baseline code: only hands out the table
}  // namespace cpu
}  // namespace hdnas

#else
namespace hdnas {
namespace cpu {
const IsaKernels* kernels_avx512() { return nullptr; }  // not an x86 GCC/Clang build
}  // namespace cpu
}  // namespace hdnas
#endif
