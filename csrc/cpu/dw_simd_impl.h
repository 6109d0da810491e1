// The CPU kernels of the tap-table depthwise engine, written once for every vector ISA.
//
// Included (only) by dw_isa_portable.cpp, dw_isa_avx2.cpp and dw_isa_avx512.cpp, which set:
//   HDNAS_VBYTES   vector width in bytes (16, 32, 64)
//   HDNAS_TILE_R   output rows per stencil tile        } accumulators of a tile: R * NV vectors
//   HDNAS_TILE_NV  vectors per row of a stencil tile   } (+1 broadcast weight) fit the registers
//   HDNAS_GW_M     taps per weight-gradient pass       } accumulators: M * U vectors, and M tap
//   HDNAS_GW_U     vectors per row step of that pass   } pointers in general-purpose registers
//   HDNAS_PW_R     output channels per pointwise tile   } accumulators: R * NV vectors (+ NV
//   HDNAS_PW_NV    pixel vectors per pointwise tile     } inputs and a broadcast weight)
//   HDNAS_PWW_M    output channels per pointwise-gradient tile } accumulators: M * U vectors
//   HDNAS_PWW_U    input channels per pointwise-gradient tile  } (+ M + 1 loaded vectors)
//   HDNAS_ISA_NAME the variant's name
// and wrap the include in a target pragma.  This file includes nothing but C headers and keeps
// every definition in an anonymous namespace (internal linkage): nothing compiled here for one
// ISA can stand in for another file's code at link time.  It defines `kTable`.
//
// Layout of a task (one (n, input plane)): the plane is copied (ReLU applied, converted to the
// accumulation type A: float, or double for fp64 storage) into a zeroed buffer of Hp = H + 2P
// rows of Ws = Wc + 2P values, Wc = W rounded up to the vector length L: every row of the image
// is a whole number of vectors, reads beyond it see zeros, so there is no scalar tail code.
//
//   forward  y[h, i]  = sum_t w_t xpad[h + P + dy_t, i + P + dx_t]            (stencil tiles)
//            (stride S = 2: y[h, i] of the even pixels (S h, S i): the stencil on the even rows,
//            then the even columns kept; the gradients below read the output gradient
//            scattered onto the even pixels of a zeroed plane)
//   grad x   gx[h, i] = sum_{g, t} w_gt gpad_g[h + P - dy_t, i + P - dx_t]    (same tiles over the
//                       padded output-gradient planes of all groups reading the plane)
//   grad w   part[t]  = sum_{h, i} xpad[h + P + dy_t, i + P + dx_t] gpad[h + P, i + P]
//
// A stencil tile keeps R x NV output vectors in registers over all taps (one broadcast and
// R * NV loads + FMAs per tap); a weight-gradient pass keeps M taps x U vectors of partial sums
// in registers over the whole plane (one output-gradient load feeds M FMAs).  Each value is
// summed in a fixed order that depends only on the shapes, never on threads.
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "../hdnas_dw.h"
#include "dw_isa.h"

#if defined(__clang__)
#define HDNAS_UNROLL _Pragma("unroll")
#else
#define HDNAS_UNROLL _Pragma("GCC unroll 32")
#endif

namespace hdnas {
namespace cpu {
namespace {

typedef int64_t i64;

// ---------------------------------------------------------------------------------------------
// Storage types and their conversions to/from the accumulation type

struct Half { uint16_t bits; };   // IEEE binary16 (c10::Half layout)
struct BHalf { uint16_t bits; };  // bfloat16 (c10::BFloat16 layout)

inline float f32_from_bits(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline uint32_t bits_from_f32(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}

// binary16 <-> float, exact / round-to-nearest-even (the FP16 library's bit-exact algorithms,
// as c10::Half uses them).
inline float half_to_float(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = sign | (two_w < (1u << 27) ? bits_from_f32(denormalized) : bits_from_f32(normalized));
  return f32_from_bits(r);
}
inline uint16_t float_to_half(float f) {
  const float to_inf = 0x1.0p+112f, to_zero = 0x1.0p-110f;
  const float a = __builtin_fabsf(f) * to_inf;
  float base = a * to_zero;
  const uint32_t w = bits_from_f32(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_from_f32(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
inline uint16_t float_to_bhalf(float f) {  // round to nearest even; NaN stays NaN
  if (f != f) return 0x7FC0;
  uint32_t u = bits_from_f32(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

template <typename S> struct Storage;
template <> struct Storage<float> {
  typedef float acc;
  static float get(float s) { return s; }
  static float put(float a) { return a; }
};
template <> struct Storage<double> {
  typedef double acc;
  static double get(double s) { return s; }
  static double put(double a) { return a; }
};
template <> struct Storage<Half> {
  typedef float acc;
  static float get(Half s) { return half_to_float(s.bits); }
  static Half put(float a) { return Half{float_to_half(a)}; }
};
template <> struct Storage<BHalf> {
  typedef float acc;
  static float get(BHalf s) { return f32_from_bits((uint32_t)s.bits << 16); }
  static BHalf put(float a) { return BHalf{float_to_bhalf(a)}; }
};

template <typename A, typename B> struct Same { static constexpr bool value = false; };
template <typename A> struct Same<A, A> { static constexpr bool value = true; };

// ---------------------------------------------------------------------------------------------
// Vectors

constexpr int kTileR = HDNAS_TILE_R, kTileNV = HDNAS_TILE_NV, kGwM = HDNAS_GW_M, kGwU = HDNAS_GW_U;

template <typename A> struct Vec {
  typedef A type __attribute__((vector_size(HDNAS_VBYTES)));
  static constexpr int L = HDNAS_VBYTES / (int)sizeof(A);
};

template <typename V, typename A> inline V vload(const A* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename A> inline void vstore(A* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }

// ---------------------------------------------------------------------------------------------
// Stencil tiles: out[r * os + i] = sum_t wt[t] * src[off[t] + r * ss + i], r < R, i < NV * L

template <typename A, int R, int NV>
void tile(const A* __restrict src, i64 ss, const i64* __restrict off, const A* __restrict wt,
          i64 nt, A* __restrict out, i64 os) {
  typedef typename Vec<A>::type V;
  constexpr int L = Vec<A>::L;
  V acc[R][NV];
  HDNAS_UNROLL for (int r = 0; r < R; ++r) HDNAS_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (i64 t = 0; t < nt; ++t) {
    const A* s = src + off[t];
    const V k = V{} + wt[t];
    HDNAS_UNROLL for (int r = 0; r < R; ++r)
      HDNAS_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] += k * vload<V>(s + r * ss + v * L);
  }
  HDNAS_UNROLL for (int r = 0; r < R; ++r)
    HDNAS_UNROLL for (int v = 0; v < NV; ++v) vstore(out + r * os + v * L, acc[r][v]);
}

// The last n (< NV) vectors of a row block: tile<A, R, n> (n known only at run time).
template <typename A, int R, int N>
inline void tile_cols(i64 n, const A* src, i64 ss, const i64* off, const A* wt, i64 nt, A* out,
                      i64 os) {
  if constexpr (N > 0) {
    if (n == N) return tile<A, R, N>(src, ss, off, wt, nt, out, os);
    tile_cols<A, R, N - 1>(n, src, ss, off, wt, nt, out, os);
  }
}

template <typename A, int R>
void row_block(const A* src, i64 ss, const i64* off, const A* wt, i64 nt, i64 nvec, A* out, i64 os) {
  constexpr int L = Vec<A>::L;
  i64 j = 0;
  for (; j + kTileNV <= nvec; j += kTileNV) tile<A, R, kTileNV>(src + j * L, ss, off, wt, nt, out + j * L, os);
  tile_cols<A, R, kTileNV - 1>(nvec - j, src + j * L, ss, off, wt, nt, out + j * L, os);
}

template <typename A, int N>
inline void rows_rest(i64 n, const A* src, i64 ss, const i64* off, const A* wt, i64 nt, i64 nvec,
                      A* out, i64 os) {
  if constexpr (N > 0) {
    if (n == N) return row_block<A, N>(src, ss, off, wt, nt, nvec, out, os);
    rows_rest<A, N - 1>(n, src, ss, off, wt, nt, nvec, out, os);
  }
}

// out[h * os + i] for h < H, i < nvec * L; src is the (h, i) = (0, 0) point with row stride ss.
template <typename A>
void stencil_plane(const A* src, i64 ss, const i64* off, const A* wt, i64 nt, i64 H, i64 nvec,
                   A* out, i64 os) {
  i64 h = 0;
  for (; h + kTileR <= H; h += kTileR)
    row_block<A, kTileR>(src + h * ss, ss, off, wt, nt, nvec, out + h * os, os);
  rows_rest<A, kTileR - 1>(H - h, src + h * ss, ss, off, wt, nt, nvec, out + h * os, os);
}

// ---------------------------------------------------------------------------------------------
// Weight-gradient passes: out[m] = sum_{h < H, i < nvec * L} xp[off[m] + h * ss + i] * gp[h * ss + i]
// Per tap, U lane-wise partial sums over the plane, then summed in a fixed order.

template <typename A, int M>
void gw_pass(const A* __restrict xp, const A* __restrict gp, i64 ss, i64 H, i64 nvec,
             const i64* __restrict off, A* __restrict out) {
  typedef typename Vec<A>::type V;
  constexpr int L = Vec<A>::L, U = kGwU;
  V acc[M][U];
  const A* xs[M];
  HDNAS_UNROLL for (int m = 0; m < M; ++m) {
    xs[m] = xp + off[m];
    HDNAS_UNROLL for (int u = 0; u < U; ++u) acc[m][u] = V{};
  }
  for (i64 h = 0; h < H; ++h) {
    const i64 row = h * ss;
    i64 j = 0;
    for (; j + U <= nvec; j += U) {
      V g[U];
      HDNAS_UNROLL for (int u = 0; u < U; ++u) g[u] = vload<V>(gp + row + (j + u) * L);
      HDNAS_UNROLL for (int m = 0; m < M; ++m)
        HDNAS_UNROLL for (int u = 0; u < U; ++u) acc[m][u] += g[u] * vload<V>(xs[m] + row + (j + u) * L);
    }
    for (; j < nvec; ++j) {
      const V g = vload<V>(gp + row + j * L);
      HDNAS_UNROLL for (int m = 0; m < M; ++m) acc[m][0] += g * vload<V>(xs[m] + row + j * L);
    }
  }
  HDNAS_UNROLL for (int m = 0; m < M; ++m) {
    A s = 0;
    for (int u = 0; u < U; ++u)
      for (int l = 0; l < L; ++l) s += acc[m][u][l];
    out[m] = s;
  }
}

template <typename A, int N>
inline void gw_rest(i64 n, const A* xp, const A* gp, i64 ss, i64 H, i64 nvec, const i64* off, A* out) {
  if constexpr (N > 0) {
    if (n == N) return gw_pass<A, N>(xp, gp, ss, H, nvec, off, out);
    gw_rest<A, N - 1>(n, xp, gp, ss, H, nvec, off, out);
  }
}

// All nt taps of one group, in passes of at most kGwM taps of nearly equal size.
template <typename A>
void gw_taps(const A* xp, const A* gp, i64 ss, i64 H, i64 nvec, const i64* off, i64 nt, A* out) {
  const i64 passes = (nt + kGwM - 1) / kGwM;
  i64 t = 0;
  for (i64 q = 0; q < passes; ++q) {
    const i64 m = (nt - t) / (passes - q);  // sizes differ by at most one, each <= kGwM
    gw_rest<A, kGwM>(m, xp, gp, ss, H, nvec, off + t, out + t);
    t += m;
  }
}

// ---------------------------------------------------------------------------------------------
// Tasks

// Copies act(src) (H x W) into an Hp x Ws buffer at (P, P).  Only the H x W interior is
// written: the rest (the P-wide border and the columns past W) is zeroed once, when a task loop
// allocates the buffer (zero_padded), and never written, as every task of a call has the same
// geometry.  (Zeroing the border per plane cost up to 5x the copy on 8x8 planes.)
template <typename S, typename A>
void fill_padded(A* __restrict pad, const S* __restrict src, i64 H, i64 W, i64 P, i64 Ws, bool relu) {
  for (i64 h = 0; h < H; ++h) {
    A* __restrict row = pad + (h + P) * Ws + P;
    const S* __restrict s = src + h * W;
    if (relu) {
      for (i64 i = 0; i < W; ++i) {
        const A v = Storage<S>::get(s[i]);
        row[i] = v > A(0) ? v : A(0);
      }
    } else {
      for (i64 i = 0; i < W; ++i) row[i] = Storage<S>::get(s[i]);
    }
  }
}

// Stride 2: the gradient of the even output pixels, src (Ho x Wo), into the even interior
// positions (P + 2h, P + 2i); the odd ones stay zero, as the border does (zero_padded).
template <typename S, typename A>
void fill_padded_s2(A* __restrict pad, const S* __restrict src, i64 Ho, i64 Wo, i64 P, i64 Ws) {
  for (i64 h = 0; h < Ho; ++h) {
    A* __restrict row = pad + (2 * h + P) * Ws + P;
    const S* __restrict s = src + h * Wo;
    for (i64 i = 0; i < Wo; ++i) row[2 * i] = Storage<S>::get(s[i]);
  }
}

template <typename A>
void zero_padded(A* pad, i64 n) {
  for (i64 i = 0; i < n; ++i) pad[i] = A(0);
}

struct Geometry {
  i64 nvec, Wc, Ws, Hp, plane;  // vectors per row, padded widths, padded rows, Hp * Ws
};

template <typename A>
Geometry geometry(const DwArgs& a) {
  constexpr int L = Vec<A>::L;
  Geometry g;
  g.nvec = (a.W + L - 1) / L;
  g.Wc = g.nvec * L;
  g.Ws = g.Wc + 2 * a.P;
  g.Hp = a.H + 2 * a.P;
  g.plane = g.Hp * g.Ws;
  return g;
}

template <typename S>
int fwd_tasks(const DwArgs& a, i64 begin, i64 end) {
  typedef typename Storage<S>::acc A;
  const Geometry geo = geometry<A>(a);
  const i64 G = a.G, T = a.T, P = a.P, C = a.C, H = a.H, W = a.W;
  const i64 Cin = a.shared ? C : G * C;
  const S* x = static_cast<const S*>(a.x);
  const S* w = static_cast<const S*>(a.w);
  S* y = static_cast<S*>(a.y);
  const i64 st = a.S, Ho = a.Ho, Wo = a.Wo;  // stride 2: the even rows, then the even columns
  const bool direct = Same<S, A>::value && geo.Wc == W && st == 1;  // tiles write y itself
  void* mem = malloc(sizeof(A) * (geo.plane + (direct ? 0 : Ho * geo.Wc) + T) + sizeof(i64) * T);
  if (mem == nullptr) return -1;
  A* pad = static_cast<A*>(mem);
  zero_padded(pad, geo.plane);
  A* out = pad + geo.plane;
  A* wt = out + (direct ? 0 : Ho * geo.Wc);
  i64* off = reinterpret_cast<i64*>(wt + T);
  for (i64 task = begin; task < end; ++task) {
    const i64 n = task / Cin, ci = task % Cin;
    fill_padded(pad, x + task * H * W, H, W, P, geo.Ws, a.relu != 0);
    const i64 g0 = a.shared ? 0 : ci / C, g1 = a.shared ? G : g0 + 1;
    const i64 c = a.shared ? ci : ci % C;
    for (i64 g = g0; g < g1; ++g) {
      const i64 nt = a.ntaps[g];
      const S* wp = w + (g * C + c) * T;
      for (i64 t = 0; t < nt; ++t) {
        wt[t] = Storage<S>::get(wp[t]);
        off[t] = (P + a.dy[g * T + t]) * geo.Ws + P + a.dx[g * T + t];
      }
      S* yp = y + ((n * G + g) * C + c) * Ho * Wo;
      if (direct) {
        stencil_plane(pad, geo.Ws, off, wt, nt, H, geo.nvec, reinterpret_cast<A*>(yp), W);
      } else {  // (stride 2: source rows 2 * Ws apart)
        stencil_plane(pad, st * geo.Ws, off, wt, nt, Ho, geo.nvec, out, geo.Wc);
        for (i64 h = 0; h < Ho; ++h)
          for (i64 i = 0; i < Wo; ++i) yp[h * Wo + i] = Storage<S>::put(out[h * geo.Wc + st * i]);
      }
    }
  }
  free(mem);
  return 0;
}

template <typename S>
int bwd_tasks(const DwArgs& a, i64 begin, i64 end) {
  typedef typename Storage<S>::acc A;
  const Geometry geo = geometry<A>(a);
  const i64 G = a.G, T = a.T, P = a.P, C = a.C, H = a.H, W = a.W;
  const i64 Cin = a.shared ? C : G * C;
  const i64 Gt = a.shared ? G : 1;  // groups reading one input plane
  const bool need_gx = a.gx != nullptr, need_gw = a.part != nullptr;
  const bool direct = Same<S, A>::value && geo.Wc == W && !a.relu;  // gx written in place
  const S* x = static_cast<const S*>(a.x);
  const S* w = static_cast<const S*>(a.w);
  const S* gy = static_cast<const S*>(a.gy);
  S* gx = static_cast<S*>(a.gx);
  A* part = static_cast<A*>(a.part);
  const i64 n_xpad = need_gw ? geo.plane : 0, n_acc = need_gx && !direct ? H * geo.Wc : 0;
  void* mem = malloc(sizeof(A) * (n_xpad + Gt * geo.plane + n_acc + Gt * T) + sizeof(i64) * Gt * T);
  if (mem == nullptr) return -1;
  A* xpad = static_cast<A*>(mem);
  A* gpad = xpad + n_xpad;
  zero_padded(xpad, n_xpad + Gt * geo.plane);  // both padded buffers: their borders stay zero
  A* acc = gpad + Gt * geo.plane;
  A* wt = acc + n_acc;
  i64* off = reinterpret_cast<i64*>(wt + Gt * T);
  for (i64 task = begin; task < end; ++task) {
    const i64 n = task / Cin, ci = task % Cin;
    const i64 g0 = a.shared ? 0 : ci / C;
    const i64 c = a.shared ? ci : ci % C;
    const S* xp = x + task * H * W;
    if (need_gw) fill_padded(xpad, xp, H, W, P, geo.Ws, a.relu != 0);
    for (i64 k = 0; k < Gt; ++k) {
      const S* gk = gy + ((n * G + g0 + k) * C + c) * a.Ho * a.Wo;
      if (a.S == 1) fill_padded(gpad + k * geo.plane, gk, H, W, P, geo.Ws, false);
      else fill_padded_s2(gpad + k * geo.plane, gk, a.Ho, a.Wo, P, geo.Ws);
    }
    if (need_gx) {  // one stencil over the taps of every group, flipped
      i64 nt = 0;
      for (i64 k = 0; k < Gt; ++k) {
        const i64 g = g0 + k;
        const S* wp = w + (g * C + c) * T;
        for (i64 t = 0; t < a.ntaps[g]; ++t, ++nt) {
          wt[nt] = Storage<S>::get(wp[t]);
          off[nt] = k * geo.plane + (P - a.dy[g * T + t]) * geo.Ws + P - a.dx[g * T + t];
        }
      }
      S* gp = gx + task * H * W;
      if (direct) {
        stencil_plane(gpad, geo.Ws, off, wt, nt, H, geo.nvec, reinterpret_cast<A*>(gp), W);
      } else {
        stencil_plane(gpad, geo.Ws, off, wt, nt, H, geo.nvec, acc, geo.Wc);
        for (i64 h = 0; h < H; ++h) {
          for (i64 i = 0; i < W; ++i) {
            const A v = acc[h * geo.Wc + i];
            const bool pass = !a.relu || Storage<S>::get(xp[h * W + i]) > A(0);
            gp[h * W + i] = Storage<S>::put(pass ? v : A(0));
          }
        }
      }
    }
    if (need_gw) {
      const A* x0 = xpad + P * geo.Ws + P;
      for (i64 k = 0; k < Gt; ++k) {
        const i64 g = g0 + k, nt = a.ntaps[g];
        A* pp = part + ((n * G + g) * C + c) * T;
        for (i64 t = 0; t < nt; ++t) off[t] = a.dy[g * T + t] * geo.Ws + a.dx[g * T + t];
        // (stride 2: only the even rows of the gradient are nonzero: rows 2 * Ws apart)
        gw_taps(x0, gpad + k * geo.plane + P * geo.Ws + P, a.S * geo.Ws, a.Ho, geo.nvec, off, nt, pp);
        for (i64 t = nt; t < T; ++t) pp[t] = A(0);
      }
    }
  }
  free(mem);
  return 0;
}

int fwd_entry(const DwArgs& a, i64 begin, i64 end) {
  switch (a.dtype) {
    case kFloat32: return fwd_tasks<float>(a, begin, end);
    case kFloat64: return fwd_tasks<double>(a, begin, end);
    case kFloat16: return fwd_tasks<Half>(a, begin, end);
    case kBFloat16: return fwd_tasks<BHalf>(a, begin, end);
  }
  return -2;
}

int bwd_entry(const DwArgs& a, i64 begin, i64 end) {
  switch (a.dtype) {
    case kFloat32: return bwd_tasks<float>(a, begin, end);
    case kFloat64: return bwd_tasks<double>(a, begin, end);
    case kFloat16: return bwd_tasks<Half>(a, begin, end);
    case kBFloat16: return bwd_tasks<BHalf>(a, begin, end);
  }
  return -2;
}

// ---------------------------------------------------------------------------------------------
// Pointwise (1x1) convolutions of channel groups (see PwArgs in dw_isa.h), float32 / float64.
//
//   forward  a tile of R output channels x NV vectors of pixels in registers; per input channel
//            NV loads, R broadcast weights, R * NV FMAs (the input tile stays in L1 across the
//            output-channel blocks of one pixel block)
//   gradient a tile of M output x U input channels, each a vector of lane-wise partial sums over
//            every image's pixels; per pixel vector M + U loads and M * U FMAs; then each sum's
//            lanes in a fixed order, plus the pixels past the last whole vector (one task per
//            tile: no partial sums to add, the same result on any number of threads)
// Every value is summed in an order fixed by the shapes alone.

constexpr int kPwR = HDNAS_PW_R, kPwNV = HDNAS_PW_NV, kPwwM = HDNAS_PWW_M, kPwwU = HDNAS_PWW_U;

// y[r * P + v * L + l] = sum_i w[r * Ci + i] * x[i * P + v * L + l]  (r < R, v < NV, l < L)
template <typename A, int R, int NV>
void pw_tile(const A* __restrict x, i64 P, const A* __restrict w, i64 Ci, A* __restrict y) {
  typedef typename Vec<A>::type V;
  constexpr int L = Vec<A>::L;
  V acc[R][NV];
  HDNAS_UNROLL for (int r = 0; r < R; ++r) HDNAS_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (i64 i = 0; i < Ci; ++i) {
    V xv[NV];
    HDNAS_UNROLL for (int v = 0; v < NV; ++v) xv[v] = vload<V>(x + i * P + v * L);
    HDNAS_UNROLL for (int r = 0; r < R; ++r) {
      const V k = V{} + w[r * Ci + i];
      HDNAS_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] += k * xv[v];
    }
  }
  HDNAS_UNROLL for (int r = 0; r < R; ++r)
    HDNAS_UNROLL for (int v = 0; v < NV; ++v) vstore(y + r * P + v * L, acc[r][v]);
}

// The last n (< kPwR) output channels: pw_tile<A, n, NV> (n known only at run time).
template <typename A, int NV, int N>
inline void pw_rows_rest(i64 n, const A* x, i64 P, const A* w, i64 Ci, A* y) {
  if constexpr (N > 0) {
    if (n == N) return pw_tile<A, N, NV>(x, P, w, Ci, y);
    pw_rows_rest<A, NV, N - 1>(n, x, P, w, Ci, y);
  }
}

// All Co output channels of NV vectors of pixels.
template <typename A, int NV>
void pw_block(const A* x, i64 P, const A* w, i64 Ci, i64 Co, A* y) {
  i64 r = 0;
  for (; r + kPwR <= Co; r += kPwR) pw_tile<A, kPwR, NV>(x, P, w + r * Ci, Ci, y + r * P);
  pw_rows_rest<A, NV, kPwR - 1>(Co - r, x, P, w + r * Ci, Ci, y + r * P);
}

template <typename A>
void pw_plane(const A* x, i64 P, const A* w, i64 Ci, i64 Co, A* y) {
  constexpr int L = Vec<A>::L;
  const i64 nvec = P / L;
  i64 j = 0;
  for (; j + kPwNV <= nvec; j += kPwNV) pw_block<A, kPwNV>(x + j * L, P, w, Ci, Co, y + j * L);
  for (; j < nvec; ++j) pw_block<A, 1>(x + j * L, P, w, Ci, Co, y + j * L);
  for (i64 o = 0; o < Co; ++o) {  // the pixels past the last whole vector
    for (i64 p = nvec * L; p < P; ++p) {
      A s = 0;
      for (i64 i = 0; i < Ci; ++i) s += w[o * Ci + i] * x[i * P + p];
      y[o * P + p] = s;
    }
  }
}

// out[m * Ci + u] = sum_{n < N, p < P} g[n * gs + m * P + p] * x[n * xs + u * P + p]  (m < M, u < U)
// Two-level sums (accuracy): the register partials of at most kPwwChunk pixel vectors of one
// image at a time are added to running totals, which stay in L1.
constexpr i64 kPwwChunk = 32;

template <typename A, int M, int U>
void pww_tile(const A* __restrict g, i64 gs, const A* __restrict x, i64 xs, i64 N, i64 P,
              A* __restrict out, i64 Ci) {
  typedef typename Vec<A>::type V;
  constexpr int L = Vec<A>::L;
  const i64 nvec = P / L;
  V tot[M][U];
  A tail[M][U];
  HDNAS_UNROLL for (int m = 0; m < M; ++m) HDNAS_UNROLL for (int u = 0; u < U; ++u) {
    tot[m][u] = V{};
    tail[m][u] = A(0);
  }
  for (i64 n = 0; n < N; ++n) {
    const A* gn = g + n * gs;
    const A* xn = x + n * xs;
    for (i64 j0 = 0; j0 < nvec; j0 += kPwwChunk) {
      const i64 j1 = j0 + kPwwChunk < nvec ? j0 + kPwwChunk : nvec;
      V acc[M][U];
      HDNAS_UNROLL for (int m = 0; m < M; ++m) HDNAS_UNROLL for (int u = 0; u < U; ++u) acc[m][u] = V{};
      for (i64 j = j0; j < j1; ++j) {
        V gv[M];
        HDNAS_UNROLL for (int m = 0; m < M; ++m) gv[m] = vload<V>(gn + m * P + j * L);
        HDNAS_UNROLL for (int u = 0; u < U; ++u) {
          const V xv = vload<V>(xn + u * P + j * L);
          HDNAS_UNROLL for (int m = 0; m < M; ++m) acc[m][u] += gv[m] * xv;
        }
      }
      HDNAS_UNROLL for (int m = 0; m < M; ++m) HDNAS_UNROLL for (int u = 0; u < U; ++u) tot[m][u] += acc[m][u];
    }
    for (i64 p = nvec * L; p < P; ++p)  // the pixels past the last whole vector
      HDNAS_UNROLL for (int m = 0; m < M; ++m)
        HDNAS_UNROLL for (int u = 0; u < U; ++u) tail[m][u] += gn[m * P + p] * xn[u * P + p];
  }
  HDNAS_UNROLL for (int m = 0; m < M; ++m) {
    HDNAS_UNROLL for (int u = 0; u < U; ++u) {
      A s = 0;
      for (int l = 0; l < L; ++l) s += tot[m][u][l];
      out[m * Ci + u] = s + tail[m][u];
    }
  }
}

// pww_tile<A, M, u> for u <= U known only at run time.
template <typename A, int M, int U>
inline void pww_cols(i64 u, const A* g, i64 gs, const A* x, i64 xs, i64 N, i64 P, A* out, i64 Ci) {
  if constexpr (U > 0) {
    if (u == U) return pww_tile<A, M, U>(g, gs, x, xs, N, P, out, Ci);
    pww_cols<A, M, U - 1>(u, g, gs, x, xs, N, P, out, Ci);
  }
}

// pww_tile<A, m, u> for m <= M, u <= kPwwU known only at run time.
template <typename A, int M>
inline void pww_rows(i64 m, i64 u, const A* g, i64 gs, const A* x, i64 xs, i64 N, i64 P, A* out,
                     i64 Ci) {
  if constexpr (M > 0) {
    if (m == M) return pww_cols<A, M, kPwwU>(u, g, gs, x, xs, N, P, out, Ci);
    pww_rows<A, M - 1>(m, u, g, gs, x, xs, N, P, out, Ci);
  }
}

template <typename A>
int pw_tasks(const PwArgs& a, i64 begin, i64 end) {
  const A* x = static_cast<const A*>(a.x);
  const A* w = static_cast<const A*>(a.w);
  A* y = static_cast<A*>(a.y);
  for (i64 task = begin; task < end; ++task) {  // task = n * G + g
    const i64 g = task % a.G;
    pw_plane(x + task * a.Ci * a.P, a.P, w + g * a.Co * a.Ci, a.Ci, a.Co, y + task * a.Co * a.P);
  }
  return 0;
}

// A gradient task (pw_wgrad_ntasks of them) is one tile: (g, block of kPwwM output channels, block of kPwwU input
// channels), summed over every image and pixel.
template <typename A>
int pw_wgrad_run(const PwArgs& a, i64 begin, i64 end) {
  const A* x = static_cast<const A*>(a.x);
  const A* gy = static_cast<const A*>(a.gy);
  A* out = static_cast<A*>(a.gw);
  const i64 nmb = (a.Co + kPwwM - 1) / kPwwM, nub = (a.Ci + kPwwU - 1) / kPwwU;
  for (i64 task = begin; task < end; ++task) {
    const i64 g = task / (nmb * nub), m = (task / nub) % nmb * kPwwM, u = task % nub * kPwwU;
    const i64 rows = a.Co - m < kPwwM ? a.Co - m : kPwwM, cols = a.Ci - u < kPwwU ? a.Ci - u : kPwwU;
    pww_rows<A, kPwwM>(rows, cols, gy + (g * a.Co + m) * a.P, a.G * a.Co * a.P,
                       x + (g * a.Ci + u) * a.P, a.G * a.Ci * a.P, a.N, a.P,
                       out + (g * a.Co + m) * a.Ci + u, a.Ci);
  }
  return 0;
}

int pw_entry(const PwArgs& a, i64 begin, i64 end) {
  switch (a.dtype) {
    case kFloat32: return pw_tasks<float>(a, begin, end);
    case kFloat64: return pw_tasks<double>(a, begin, end);
  }
  return -2;
}

int pw_wgrad_entry(const PwArgs& a, i64 begin, i64 end) {
  switch (a.dtype) {
    case kFloat32: return pw_wgrad_run<float>(a, begin, end);
    case kFloat64: return pw_wgrad_run<double>(a, begin, end);
  }
  return -2;
}

i64 pw_wgrad_ntasks(const PwArgs& a) {
  return a.G * ((a.Co + kPwwM - 1) / kPwwM) * ((a.Ci + kPwwU - 1) / kPwwU);
}

const IsaKernels kTable = {HDNAS_ISA_NAME, &fwd_entry, &bwd_entry, &pw_entry, &pw_wgrad_entry,
                           &pw_wgrad_ntasks};

}  // namespace
}  // namespace cpu
}  // namespace hdnas

#undef HDNAS_UNROLL
