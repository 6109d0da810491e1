// CPU batch statistics of an (N, C, H, W) tensor for training-mode batch normalisation: the mean
// and the biased variance of each channel over (N, H, W), accumulated in double.  One task per
// channel; per image plane (H*W contiguous values, read once from memory and a second time from
// cache) the plane's mean and centred sum of squares (two passes: no cancellation), merged over
// the planes in order (Chan et al.'s pairwise update).  Deterministic: the result does not
// depend on the thread count.  Twin: torch.var_mean(x.double(), (0, 2, 3), correction=0).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

namespace hdnas {

template <typename scalar_t>
static void plane_moments(const scalar_t* p, int64_t m, double& mean, double& m2) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
  }
  for (; i < m; ++i) s0 += p[i];
  mean = ((s0 + s1) + (s2 + s3)) / static_cast<double>(m);
  double q0 = 0, q1 = 0, q2 = 0, q3 = 0;
  i = 0;
  for (; i + 4 <= m; i += 4) {
    const double d0 = p[i] - mean, d1 = p[i + 1] - mean, d2 = p[i + 2] - mean,
                 d3 = p[i + 3] - mean;
    q0 += d0 * d0;
    q1 += d1 * d1;
    q2 += d2 * d2;
    q3 += d3 * d3;
  }
  for (; i < m; ++i) {
    const double d = p[i] - mean;
    q0 += d * d;
  }
  m2 = (q0 + q1) + (q2 + q3);
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_) {
  TORCH_CHECK(x_.device().is_cpu(), "hdnas_native::bn_stats (CPU): input on ", x_.device());
  TORCH_CHECK(x_.dim() == 4, "hdnas_native::bn_stats: input must be (N, C, H, W), got ", x_.sizes());
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble,
              "hdnas_native::bn_stats: float32 or float64 input, got ", x_.scalar_type());
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(0), C = x.size(1), M = x.size(2) * x.size(3);
  TORCH_CHECK(N * M > 0, "hdnas_native::bn_stats: no values per channel (input ", x.sizes(), ")");
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kDouble));
  at::Tensor var = at::empty({C}, x.options().dtype(at::kDouble));
  double* pm = mean.data_ptr<double>();
  double* pv = var.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hdnas_bn_stats", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double count = 0, mu = 0, m2 = 0;
        for (int64_t n = 0; n < N; ++n) {
          double pmean, pm2;
          plane_moments(px + (n * C + c) * M, M, pmean, pm2);
          const double total = count + static_cast<double>(M);
          const double delta = pmean - mu;
          mu += delta * (static_cast<double>(M) / total);
          m2 += pm2 + delta * delta * (count * static_cast<double>(M) / total);
          count = total;
        }
        pm[c] = mu;
        pv[c] = m2 / count;
      }
    });
  });
  return {mean, var};
}

}  // namespace hdnas
