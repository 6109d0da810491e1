// CPU training-mode batch normalisation of G channel groups summed with per-channel scales:
//
//   y[n, c] = sum_g scale[g, c] * (u[n, g C + c] - mean[g C + c]) * invstd[g C + c],
//   invstd = 1 / sqrt(var + eps),
//
// for a contiguous u (N, G C, H, W) with its batch statistics (mean, biased var: float64, from
// bn_stats), and its backward, the training-mode one (the statistics' own dependence on u
// included).  The fused DARTS op sums the BN outputs of the sep candidates' second stage (and of
// the dil candidates) over the candidates, each scaled by its architecture weight: normalising G
// tensors, summing them and, in backward, making the expanded output gradient contiguous and
// normalising back G times read and write G-sized tensors that this one pass does not.
// Twin: F.batch_norm(u, None, None, scale.flatten(), None, True, 0, eps).view(N, G, C, H, W).sum(1).
//
// Forward: per output plane, the groups' a u + b (a = scale invstd, b = -mean a; the form of
// PyTorch's own CPU batch_norm) added in group order.  Backward, per channel c (one task):
//   A = sum g_y[., c],  D_g = sum g_y[., c] (u_g - mean_g)   (float64, planes in order)
//   g_u_g = (g_y - A / M) k_g - (u_g - mean_g) k_g invstd_g^2 D_g / M,   k_g = scale_g invstd_g
//   g_scale_g = invstd_g D_g
// with M = N H W.  Deterministic: nothing depends on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace hdnas {

namespace {

struct Shape {
  int64_t N, G, C, M;
};

Shape check(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& var,
            const at::Tensor& scale, int64_t groups, const char* op) {
  TORCH_CHECK(u.device().is_cpu(), op, ": input on ", u.device());
  TORCH_CHECK(u.dim() == 4, op, ": input must be (N, G*C, H, W), got ", u.sizes());
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble, op,
              ": float32 or float64 input, got ", u.scalar_type());
  TORCH_CHECK(groups >= 1 && u.size(1) % groups == 0, op, ": ", u.size(1),
              " channels are not ", groups, " equal groups");
  const int64_t GC = u.size(1);
  TORCH_CHECK(mean.scalar_type() == at::kDouble && var.scalar_type() == at::kDouble &&
                  mean.dim() == 1 && var.dim() == 1 && mean.size(0) == GC && var.size(0) == GC,
              op, ": mean and var must be float64 vectors of ", GC, " values");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == GC && scale.scalar_type() == u.scalar_type(),
              op, ": scale must be a ", u.scalar_type(), " vector of ", GC, " values, got ",
              scale.sizes(), " ", scale.scalar_type());
  const Shape s{u.size(0), groups, GC / groups, u.size(2) * u.size(3)};
  TORCH_CHECK(s.N * s.M > 1, op, ": expected more than 1 value per channel, got input ", u.sizes());
  return s;
}

template <typename T>
double dot_centred(const T* __restrict__ g, const T* __restrict__ u, double mean, int64_t m) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    s0 += static_cast<double>(g[i]) * (static_cast<double>(u[i]) - mean);
    s1 += static_cast<double>(g[i + 1]) * (static_cast<double>(u[i + 1]) - mean);
    s2 += static_cast<double>(g[i + 2]) * (static_cast<double>(u[i + 2]) - mean);
    s3 += static_cast<double>(g[i + 3]) * (static_cast<double>(u[i + 3]) - mean);
  }
  for (; i < m; ++i) s0 += static_cast<double>(g[i]) * (static_cast<double>(u[i]) - mean);
  return (s0 + s1) + (s2 + s3);
}

template <typename T>
double plane_sum(const T* __restrict__ g, int64_t m) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    s0 += g[i];
    s1 += g[i + 1];
    s2 += g[i + 2];
    s3 += g[i + 3];
  }
  for (; i < m; ++i) s0 += g[i];
  return (s0 + s1) + (s2 + s3);
}

}  // namespace

at::Tensor bn_sum_cpu(const at::Tensor& u_, const at::Tensor& mean_, const at::Tensor& var_,
                      const at::Tensor& scale_, double eps, int64_t groups) {
  const Shape s = check(u_, mean_, var_, scale_, groups, "hdnas_native::bn_sum");
  const at::Tensor u = u_.contiguous(), mean = mean_.contiguous(), var = var_.contiguous();
  const at::Tensor scale = scale_.contiguous();
  at::Tensor y = at::empty({s.N, s.C, u.size(2), u.size(3)}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "hdnas_bn_sum", [&] {
    const int64_t GC = s.G * s.C;
    std::vector<scalar_t> a(GC), b(GC);
    const double* pm = mean.const_data_ptr<double>();
    const double* pv = var.const_data_ptr<double>();
    const scalar_t* ps = scale.const_data_ptr<scalar_t>();
    for (int64_t j = 0; j < GC; ++j) {
      const double aj = static_cast<double>(ps[j]) / std::sqrt(pv[j] + eps);
      a[j] = static_cast<scalar_t>(aj);
      b[j] = static_cast<scalar_t>(-pm[j] * aj);
    }
    const scalar_t* pu = u.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t n = nc / s.C, c = nc % s.C;
        scalar_t* __restrict__ out = py + nc * s.M;
        const scalar_t* __restrict__ u0 = pu + (n * GC + c) * s.M;
        const scalar_t a0 = a[c], b0 = b[c];
        for (int64_t i = 0; i < s.M; ++i) out[i] = u0[i] * a0 + b0;
        for (int64_t g = 1; g < s.G; ++g) {
          const scalar_t* __restrict__ ug = pu + (n * GC + g * s.C + c) * s.M;
          const scalar_t ag = a[g * s.C + c], bg = b[g * s.C + c];
          for (int64_t i = 0; i < s.M; ++i) out[i] += ug[i] * ag + bg;
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bn_sum_backward_cpu(const at::Tensor& gy_, const at::Tensor& u_,
                                                       const at::Tensor& mean_, const at::Tensor& var_,
                                                       const at::Tensor& scale_, double eps,
                                                       int64_t groups) {
  const Shape s = check(u_, mean_, var_, scale_, groups, "hdnas_native::bn_sum_backward");
  TORCH_CHECK(gy_.dim() == 4 && gy_.size(0) == s.N && gy_.size(1) == s.C &&
                  gy_.size(2) == u_.size(2) && gy_.size(3) == u_.size(3) &&
                  gy_.scalar_type() == u_.scalar_type(),
              "hdnas_native::bn_sum_backward: gradient ", gy_.sizes(), " ", gy_.scalar_type(),
              " does not fit the output of ", u_.sizes(), " ", u_.scalar_type(), " in ", groups,
              " groups");
  const at::Tensor u = u_.contiguous(), gy = gy_.contiguous(), mean = mean_.contiguous();
  const at::Tensor var = var_.contiguous(), scale = scale_.contiguous();
  at::Tensor gu = at::empty_like(u, at::MemoryFormat::Contiguous);
  at::Tensor gscale = at::empty_like(scale, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "hdnas_bn_sum_backward", [&] {
    const int64_t GC = s.G * s.C;
    const double* pm = mean.const_data_ptr<double>();
    const double* pv = var.const_data_ptr<double>();
    const scalar_t* ps = scale.const_data_ptr<scalar_t>();
    const scalar_t* pu = u.const_data_ptr<scalar_t>();
    const scalar_t* pg = gy.const_data_ptr<scalar_t>();
    scalar_t* pgu = gu.mutable_data_ptr<scalar_t>();
    scalar_t* pgs = gscale.mutable_data_ptr<scalar_t>();
    const double count = static_cast<double>(s.N * s.M);
    at::parallel_for(0, s.C, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> dots(s.G);
      for (int64_t c = begin; c < end; ++c) {
        double A = 0;
        std::fill(dots.begin(), dots.end(), 0.0);
        for (int64_t n = 0; n < s.N; ++n) {
          const scalar_t* g = pg + (n * s.C + c) * s.M;
          A += plane_sum(g, s.M);
          for (int64_t k = 0; k < s.G; ++k) {
            const int64_t j = k * s.C + c;
            dots[k] += dot_centred(g, pu + (n * GC + j) * s.M, pm[j], s.M);
          }
        }
        const scalar_t gmean = static_cast<scalar_t>(A / count);
        for (int64_t k = 0; k < s.G; ++k) {
          const int64_t j = k * s.C + c;
          const double invstd = 1.0 / std::sqrt(pv[j] + eps);
          pgs[j] = static_cast<scalar_t>(invstd * dots[k]);
          const double kk = static_cast<double>(ps[j]) * invstd;
          const scalar_t kt = static_cast<scalar_t>(kk);
          const scalar_t proj = static_cast<scalar_t>(kk * invstd * invstd * dots[k] / count);
          const scalar_t mu = static_cast<scalar_t>(pm[j]);
          for (int64_t n = 0; n < s.N; ++n) {
            const scalar_t* __restrict__ g = pg + (n * s.C + c) * s.M;
            const scalar_t* __restrict__ uu = pu + (n * GC + j) * s.M;
            scalar_t* __restrict__ o = pgu + (n * GC + j) * s.M;
            for (int64_t i = 0; i < s.M; ++i) o[i] = (g[i] - gmean) * kt - (uu[i] - mu) * proj;
          }
        }
      }
    });
  });
  return {gu, gscale};
}

}  // namespace hdnas
