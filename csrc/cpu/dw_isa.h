// The CPU kernels of the tap-table depthwise engine (../hdnas_dw.h), one set per vector
// instruction set, chosen at run time.  Torch-free on purpose (see dw_simd_impl.h).
//
// How one build carries several ISA variants
// ------------------------------------------
// dw_simd_impl.h holds the kernels once, written with GCC/Clang vector extensions whose width
// (HDNAS_VBYTES) and register blocking (rows x vectors of the stencil tiles, taps per weight-
// gradient pass) are macros.  Three translation units include it:
//
//   dw_isa_portable.cpp  16-byte vectors, no target flags: baseline code for any CPU (SSE2 on
//                        x86-64, NEON on aarch64, plain scalar code where there are no vectors)
//   dw_isa_avx2.cpp      32-byte vectors under  #pragma GCC target("avx2,fma")            (16 ymm)
//   dw_isa_avx512.cpp    64-byte vectors under  #pragma GCC target("avx512f,...,avx512dq")  (32 zmm)
//
// The target is set by a pragma, not by -m flags, so every file of the library is compiled with
// the same command-line flags (setup.py and the JIT build both pass one flag list) and no
// -march=native is needed: the library runs on any CPU of its machine type.  The ISA files
// include no C++ library or torch header and keep everything in an anonymous namespace, so no
// inline function compiled with AVX-512 can be merged by the linker into code that runs on an
// AVX2 machine (the usual trap of per-ISA translation units).  Only the table getters below are
// visible outside them.  dw_dispatch.cpp picks a table with __builtin_cpu_supports (x86) or
// takes the portable one (elsewhere); HDNAS_NATIVE_ISA=portable|avx2|avx512 forces one.
#pragma once

#include <stdint.h>

namespace hdnas {
namespace cpu {

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kNumIsa = 3 };

// One forward or backward call.  Pointers are contiguous NCHW (x, y, gy, gx: storage dtype),
// w [G, C, T] (storage dtype), part [N, G, C, T] in the accumulation type (float; double for
// fp64 storage).  Null gx / part: that gradient is not wanted.  Tap t of group g reads
// act(x)[.., h + dy[g*T+t], w + dx[g*T+t]] for t < ntaps[g].
struct DwArgs {
  int dtype;  // hdnas::DType (../hdnas_dw.h)
  const void* x;
  const void* w;
  const void* gy;
  void* y;
  void* gx;
  void* part;
  int64_t N, C, H, W, G, T, P;  // P: the largest |dy|, |dx|
  int64_t S, Ho, Wo;             // output stride (1 or 2) and size: Ho = (H - 1) / S + 1
  int relu, shared;
  const int64_t* ntaps;  // [G]
  const int64_t* dy;     // [G*T]
  const int64_t* dx;     // [G*T]
};

// One pointwise (1x1) convolution of channel groups, forward or weight gradient (pw.cpp):
//   forward  y[n, g, o, p]  = sum_i w[g, o, i] x[n, g, i, p]
//   gradient gw[g, o, i]    = sum_{n, p} gy[n, g, o, p] x[n, g, i, p]
// Pointers are contiguous, float32 or float64 (dtype: hdnas::DType).  P = H * W pixels per
// plane.
struct PwArgs {
  int dtype;
  const void* x;   // [N, G, Ci, P]
  const void* w;   // [G, Co, Ci] (forward)
  const void* gy;  // [N, G, Co, P] (gradient)
  void* y;         // [N, G, Co, P] (forward)
  void* gw;        // [G, Co, Ci] (gradient)
  int64_t N, G, Ci, Co, P;
};

// The kernels of one ISA.  The depthwise ones run the tasks [begin, end) of N * Cin, one task
// per (n, input plane); the pointwise forward the tasks of N * G, one per (n, group), its
// gradient pw_wgrad_ntasks(a), one per tile of the result (dw_simd_impl.h): the caller
// splits the range over threads (a task's result does not depend on the split).  Return 0, -1
// when scratch memory could not be allocated, -2 for a dtype the kernel does not take.
struct IsaKernels {
  const char* name;
  int (*fwd)(const DwArgs& a, int64_t begin, int64_t end);
  int (*bwd)(const DwArgs& a, int64_t begin, int64_t end);
  int (*pw)(const PwArgs& a, int64_t begin, int64_t end);
  int (*pw_wgrad)(const PwArgs& a, int64_t begin, int64_t end);
  int64_t (*pw_wgrad_ntasks)(const PwArgs& a);
};

// Null where the variant is not compiled in (non-x86 targets, compilers without the pragmas).
const IsaKernels* kernels_portable();
const IsaKernels* kernels_avx2();
const IsaKernels* kernels_avx512();

}  // namespace cpu
}  // namespace hdnas
