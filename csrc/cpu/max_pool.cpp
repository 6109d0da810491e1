// CPU 3x3 max pooling with padding 1 (DARTS' max_pool_3x3, stride 1 or 2) of a contiguous
// (N, C, H, W) tensor, and its backward.  Twin: F.max_pool2d(x, 3, stride, 1).
//
// Same windows and the same choice as PyTorch's CPU kernel: each output is the maximum over the
// window's real pixels (padding takes no part), scanned in row-major order, a value replacing
// the current one when it is greater or NaN (so the first maximum wins a tie, and NaN
// propagates).  The backward recomputes that choice (nothing is saved but x) and adds each
// output's gradient to its chosen pixel, outputs in row-major order (PyTorch's order: the same
// sums).  PyTorch's NCHW pool kernels are several times slower than its channels-last ones; the
// fused DARTS op used to pool a channels-last copy of x.  Here one task per image plane: the
// plane is copied into a scratch plane padded with -inf (never greater, never NaN: never
// chosen), so the window loops have no bounds checks and vectorise.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <algorithm>
#include <vector>

namespace hdnas {

namespace {

struct Geometry {
  int64_t H, W, Ho, Wo, s, Wp;  // Wp: the padded plane's row length (W + 2)
};

Geometry geometry(const at::Tensor& x, int64_t s) {
  const int64_t H = x.size(2), W = x.size(3);
  return {H, W, (H - 1) / s + 1, (W - 1) / s + 1, s, W + 2};
}

void check(const at::Tensor& x, int64_t s, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": input on ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": input must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": float32 or float64 input, got ", x.scalar_type());
  TORCH_CHECK(s == 1 || s == 2, op, ": stride 1 or 2, got ", s);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, op, ": empty image ", x.sizes());
}

// The plane p (H x W) into pad ((H + 2) x (W + 2)), borders -inf.
template <typename T>
void pad_plane(const T* p, const Geometry& g, T* pad) {
  const T lo = -std::numeric_limits<T>::infinity();
  std::fill(pad, pad + (g.H + 2) * g.Wp, lo);
  for (int64_t h = 0; h < g.H; ++h) std::copy(p + h * g.W, p + (h + 1) * g.W, pad + (h + 1) * g.Wp + 1);
}

// An unsigned integer as wide as T: the taps live in one, selected with bit masks (branch-free,
// so the window loops vectorise; a conditional select of the tap compiled to mispredicted
// branches, 7x slower than the pool itself).
template <typename T> struct Same;
template <> struct Same<float> { using U = uint32_t; };
template <> struct Same<double> { using U = uint64_t; };

// The stride-1 window maxima of the W pixel columns of window row ih0 = oh * s (its top row in
// the padded plane), scan order kept: a value replaces the current one when greater or NaN
// (padding is -inf: never replaces); with Taps also the chosen tap (kh * 3 + kw), starting from
// the first valid tap (PyTorch's choice when no value is greater than -inf).  A stride-2 row is
// the even columns of this row.
template <typename T, bool Taps>
inline void row_max(const T* __restrict__ pad, const Geometry& g, int64_t oh, T* __restrict__ best,
                    typename Same<T>::U* __restrict__ tap) {
  using U = typename Same<T>::U;
  const int64_t W = g.W, ih0 = oh * g.s;
  const T lo = -std::numeric_limits<T>::infinity();
  for (int64_t w = 0; w < W; ++w) best[w] = lo;
  if (Taps) {
    const U kh0 = (ih0 == 0) ? U(3) : U(0);  // the first window row inside the image
    for (int64_t w = 0; w < W; ++w) tap[w] = kh0;
    tap[0] += U(1);  // column -1 is padding
  }
  for (int64_t kh = 0; kh < 3; ++kh) {
    const T* __restrict__ r = pad + (ih0 + kh) * g.Wp;  // padded row ih0 - 1 + kh
    for (int64_t kw = 0; kw < 3; ++kw) {
      const U t = U(kh * 3 + kw);
      const T* __restrict__ q = r + kw;
      for (int64_t w = 0; w < W; ++w) {
        const T v = q[w];
        const bool take = (v > best[w]) | (v != v);
        best[w] = take ? v : best[w];
        if (Taps) {
          const U m = U(0) - U(take);
          tap[w] = (tap[w] & ~m) | (t & m);
        }
      }
    }
  }
  if (g.s == 2) {  // keep the even columns, in place (w <= 2 w)
    for (int64_t w = 1; w < g.Wo; ++w) {
      best[w] = best[2 * w];
      if (Taps) tap[w] = tap[2 * w];
    }
  }
}

}  // namespace

at::Tensor max_pool3x3_cpu(const at::Tensor& x_, int64_t s) {
  check(x_, s, "hdnas_native::max_pool3x3");
  const at::Tensor x = x_.contiguous();
  const Geometry g = geometry(x, s);
  const int64_t planes = x.size(0) * x.size(1);
  at::Tensor y = at::empty({x.size(0), x.size(1), g.Ho, g.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hdnas_max_pool3x3", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> pad((g.H + 2) * g.Wp), best(g.W);
      for (int64_t i = b; i < e; ++i) {
        pad_plane(xp + i * g.H * g.W, g, pad.data());
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          row_max<scalar_t, false>(pad.data(), g, oh, best.data(), nullptr);
          std::copy(best.data(), best.data() + g.Wo, yp + (i * g.Ho + oh) * g.Wo);
        }
      }
    });
  });
  return y;
}

at::Tensor max_pool3x3_backward_cpu(const at::Tensor& gy_, const at::Tensor& x_, int64_t s) {
  check(x_, s, "hdnas_native::max_pool3x3_backward");
  const at::Tensor x = x_.contiguous();
  const Geometry g = geometry(x, s);
  TORCH_CHECK(gy_.dim() == 4 && gy_.size(0) == x.size(0) && gy_.size(1) == x.size(1) &&
                  gy_.size(2) == g.Ho && gy_.size(3) == g.Wo && gy_.scalar_type() == x.scalar_type(),
              "hdnas_native::max_pool3x3_backward: gradient ", gy_.sizes(), " ", gy_.scalar_type(),
              " does not fit the pool of ", x.sizes(), " ", x.scalar_type(), " at stride ", s);
  const at::Tensor gy = gy_.contiguous();
  const int64_t planes = x.size(0) * x.size(1);
  at::Tensor gx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hdnas_max_pool3x3_backward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    scalar_t* op = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t b, int64_t e) {
      using U = typename Same<scalar_t>::U;
      std::vector<scalar_t> pad((g.H + 2) * g.Wp), acc((g.H + 2) * g.Wp), best(g.W);
      std::vector<U> taps(g.Ho * g.W);  // the chosen tap of every output (rows W apart)
      int64_t off[9];  // tap -> offset in the padded plane from the window's top left
      for (int64_t t = 0; t < 9; ++t) off[t] = (t / 3) * g.Wp + t % 3;
      for (int64_t i = b; i < e; ++i) {
        pad_plane(xp + i * g.H * g.W, g, pad.data());
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        const scalar_t* gi = gp + i * g.Ho * g.Wo;
        for (int64_t oh = 0; oh < g.Ho; ++oh)
          row_max<scalar_t, true>(pad.data(), g, oh, best.data(), taps.data() + oh * g.W);
        // each output's gradient onto its chosen pixel, outputs in row-major order (PyTorch's
        // order: the same sums, bit for bit)
        for (int64_t oh = 0; oh < g.Ho; ++oh)
          for (int64_t ow = 0; ow < g.Wo; ++ow)
            acc[oh * s * g.Wp + ow * s + off[taps[oh * g.W + ow]]] += gi[oh * g.Wo + ow];
        scalar_t* o = op + i * g.H * g.W;
        for (int64_t h = 0; h < g.H; ++h)
          std::copy(acc.data() + (h + 1) * g.Wp + 1, acc.data() + (h + 1) * g.Wp + 1 + g.W, o + h * g.W);
      }
    });
  });
  return gx;
}

}  // namespace hdnas
