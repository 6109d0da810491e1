// The CUDA depthwise kernels (csrc/cuda, run on the host emulation) against a plain loop
// reference of the contract in ../hdnas_dw.h, on random inputs: every tap table the search uses
// (DLSR stage 1 / 2, DARTS, the union stencil of mixed_dw), radius 8, a random table at the
// limits (8 groups, 96 taps, a group without taps, unused taps pointing far outside the tile),
// odd sizes over several tiles, images smaller than the stencil, empty batches / images, and
// the argument checks.  Every buffer is a heap allocation of exactly its size (ASan catches any
// access outside), outputs start as NaN (an element the kernels skip fails the comparison).
// With --all-schedules every case also runs under the reverse and shuffled schedules and must
// give bitwise the same outputs (a missing barrier shows up as a difference), and the input and
// weight gradients computed alone must equal those computed together.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../hdnas_dw.h"
#include "cuda_host.h"

int run_kernel_checks(const char* dtype, bool all_schedules);

namespace {

using namespace hdnas;

// Storage formats: conversions, unit roundoff of the storage (u) and of the accumulation (acc_u),
// and the largest rounding error near zero (tiny).
template <typename S> struct Fmt;
template <> struct Fmt<float> {
  static constexpr DType dtype = kFloat32;
  static float from(double v) { return float(v); }
  static double to(float v) { return v; }
  static float nan() { return NAN; }
  static constexpr double u = 0x1p-24, acc_u = 0x1p-24, tiny = 0x1p-150;
};
template <> struct Fmt<double> {
  static constexpr DType dtype = kFloat64;
  static double from(double v) { return v; }
  static double to(double v) { return v; }
  static double nan() { return NAN; }
  static constexpr double u = 0x1p-53, acc_u = 0x1p-53, tiny = 0x1p-1074;
};
template <> struct Fmt<__half> {
  static constexpr DType dtype = kFloat16;
  static __half from(double v) { return __float2half_rn(float(v)); }
  static double to(__half v) { return __half2float(v); }
  static __half nan() { return {0x7e00}; }
  static constexpr double u = 0x1p-11, acc_u = 0x1p-24, tiny = 0x1p-25;
};
template <> struct Fmt<__nv_bfloat16> {
  static constexpr DType dtype = kBFloat16;
  static __nv_bfloat16 from(double v) { return __float2bfloat16_rn(float(v)); }
  static double to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __nv_bfloat16 nan() { return {0x7fc0}; }
  static constexpr double u = 0x1p-8, acc_u = 0x1p-24, tiny = 0x1p-134;
};

struct Table {
  std::string name;
  TapTable t;
};

TapTable blank_table(int G, int T) {
  TapTable t;
  std::memset(&t, 0, sizeof t);
  t.G = G;
  t.T = T;
  for (int g = 0; g < kMaxGroups; ++g)  // unused taps point far outside any tile
    for (int i = 0; i < kMaxTaps; ++i) {
      t.dy[g][i] = int8_t(i % 2 ? 100 : -100);
      t.dx[g][i] = int8_t(i % 2 ? -100 : 100);
    }
  return t;
}

void set_radius(TapTable& t) {
  t.radius = 0;
  for (int g = 0; g < t.G; ++g)
    for (int i = 0; i < t.ntaps[g]; ++i)
      t.radius = std::max({t.radius, std::abs(int(t.dy[g][i])), std::abs(int(t.dx[g][i]))});
}

// Each group's k x k taps at dilation d (hdnas.mixed.native._grouped_table).
Table grouped(const std::string& name, std::vector<int> ks, std::vector<int> ds) {
  int T = 0;
  for (int k : ks) T = std::max(T, k * k);
  TapTable t = blank_table(int(ks.size()), T);
  for (size_t g = 0; g < ks.size(); ++g) {
    const int k = ks[g], r = k / 2, d = ds[g];
    for (int i = 0; i < k * k; ++i) {
      t.dy[g][i] = int8_t((i / k - r) * d);
      t.dx[g][i] = int8_t((i % k - r) * d);
    }
    t.ntaps[g] = k * k;
  }
  set_radius(t);
  return {name, t};
}

// One group: the distinct taps of all (k, d) (hdnas.mixed.native._union_table).
Table union_of(const std::string& name, std::vector<int> ks, std::vector<int> ds) {
  std::vector<std::pair<int, int>> taps;
  for (size_t g = 0; g < ks.size(); ++g) {
    const int k = ks[g], r = k / 2;
    for (int i = 0; i < k * k; ++i) {
      const std::pair<int, int> o{(i / k - r) * ds[g], (i % k - r) * ds[g]};
      if (std::find(taps.begin(), taps.end(), o) == taps.end()) taps.push_back(o);
    }
  }
  TapTable t = blank_table(1, int(taps.size()));
  for (size_t i = 0; i < taps.size(); ++i) {
    t.dy[0][i] = int8_t(taps[i].first);
    t.dx[0][i] = int8_t(taps[i].second);
  }
  t.ntaps[0] = int(taps.size());
  set_radius(t);
  return {name, t};
}

// At the limits: kMaxGroups groups, kMaxTaps taps, offsets up to kMaxRadius; group 0 has every
// tap, group 1 none, the others a random number.
Table random_table(const std::string& name, unsigned seed) {
  std::mt19937 rng(seed);
  TapTable t = blank_table(kMaxGroups, kMaxTaps);
  std::uniform_int_distribution<int> off(-kMaxRadius, kMaxRadius), cnt(1, kMaxTaps);
  for (int g = 0; g < kMaxGroups; ++g) {
    t.ntaps[g] = g == 0 ? kMaxTaps : g == 1 ? 0 : cnt(rng);
    for (int i = 0; i < t.ntaps[g]; ++i) {
      t.dy[g][i] = int8_t(off(rng));
      t.dx[g][i] = int8_t(off(rng));
    }
  }
  t.dy[0][0] = int8_t(kMaxRadius);  // the full radius, in both directions
  t.dx[0][1] = int8_t(-kMaxRadius);
  set_radius(t);
  return {name, t};
}

struct Case {
  Table tab;
  DwShape s;
};

std::vector<Case> cases() {
  const Table st1 = grouped("dlsr_stage1", {3, 5, 7, 3, 5}, {1, 1, 1, 2, 2});
  const Table st2 = grouped("dlsr_stage2", {3, 5, 7}, {1, 1, 1});
  const Table darts = grouped("darts_stage1", {3, 5, 3, 5}, {1, 1, 2, 2});
  const Table uni = union_of("darts_union", {3, 5, 7, 3, 5, 1}, {1, 1, 1, 2, 2, 1});
  const Table small = grouped("k7_k5d2", {7, 5}, {1, 2});
  const Table r8 = grouped("k3d8_k1", {3, 1}, {8, 1});
  const Table rnd = random_table("random_limits", 1234);
  const Table k3 = grouped("k3", {3}, {1});
  // DwShape: N, C (per group), H, W, relu_input, shared_input
  return {
      {st1, {1, 3, 19, 37, 1, 1}},   // 2 x 2 tiles, odd sizes
      {st2, {2, 2, 17, 33, 1, 0}},
      {darts, {1, 3, 16, 32, 0, 1}}, // exactly one tile
      {uni, {3, 4, 11, 9, 0, 1}},
      {small, {2, 2, 5, 3, 1, 0}},   // image smaller than the stencil
      {r8, {1, 2, 20, 40, 1, 0}},
      {rnd, {1, 1, 18, 34, 1, 1}},
      {rnd, {1, 1, 7, 5, 0, 0}},
      {k3, {0, 2, 7, 7, 1, 1}},      // empty batch: the weight gradient is 0
      {k3, {2, 2, 0, 5, 1, 0}},      // empty image
  };
}

long long cin_of(const TapTable& t, const DwShape& s) {
  return s.shared_input ? s.C : (long long)t.G * s.C;
}

struct Ref {
  std::vector<double> v, abs;  // value, and sum of |products| (bounds the rounding error)
  int nterms = 0;              // most products in one element
};

// y[n, gC+c, p] = sum_t W[g,c,t] act(x)[n, cin, p + off_t]
Ref ref_fwd(const TapTable& t, const DwShape& s, const std::vector<double>& x,
            const std::vector<double>& w) {
  const int G = t.G, C = s.C, H = s.H, W = s.W;
  const long long cin = cin_of(t, s);
  Ref r;
  r.v.assign((size_t)s.N * G * C * H * W, 0.0);
  r.abs = r.v;
  for (int g = 0; g < G; ++g) r.nterms = std::max(r.nterms, t.ntaps[g]);
  for (int n = 0; n < s.N; ++n)
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < C; ++c) {
        const long long ci = s.shared_input ? c : (long long)g * C + c;
        for (int h = 0; h < H; ++h)
          for (int q = 0; q < W; ++q) {
            double a = 0, b = 0;
            for (int i = 0; i < t.ntaps[g]; ++i) {
              const int yy = h + t.dy[g][i], xx = q + t.dx[g][i];
              if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
              double v = x[((n * cin + ci) * H + yy) * W + xx];
              if (s.relu_input && v < 0) v = 0;
              const double p = w[((size_t)g * C + c) * t.T + i] * v;
              a += p;
              b += std::fabs(p);
            }
            const size_t o = ((((size_t)n * G + g) * C + c) * H + h) * W + q;
            r.v[o] = a;
            r.abs[o] = b;
          }
      }
  return r;
}

// gx[n, cin, p] = relu'(x) sum_{g reading cin} sum_t W[g,c,t] gy[n, gC+c, p - off_t]
Ref ref_gx(const TapTable& t, const DwShape& s, const std::vector<double>& gy,
           const std::vector<double>& x, const std::vector<double>& w) {
  const int G = t.G, C = s.C, H = s.H, W = s.W;
  const long long cin = cin_of(t, s);
  Ref r;
  r.v.assign((size_t)s.N * cin * H * W, 0.0);
  r.abs = r.v;
  for (int g = 0; g < G; ++g) r.nterms += t.ntaps[g];
  for (int n = 0; n < s.N; ++n)
    for (long long ci = 0; ci < cin; ++ci) {
      const int g0 = s.shared_input ? 0 : int(ci / C), g1 = s.shared_input ? G : g0 + 1;
      const int c = s.shared_input ? int(ci) : int(ci % C);
      for (int h = 0; h < H; ++h)
        for (int q = 0; q < W; ++q) {
          double a = 0, b = 0;
          for (int g = g0; g < g1; ++g)
            for (int i = 0; i < t.ntaps[g]; ++i) {
              const int yy = h - t.dy[g][i], xx = q - t.dx[g][i];
              if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
              const double p = w[((size_t)g * C + c) * t.T + i] *
                               gy[((((size_t)n * G + g) * C + c) * H + yy) * W + xx];
              a += p;
              b += std::fabs(p);
            }
          const size_t o = (((size_t)n * cin + ci) * H + h) * W + q;
          if (s.relu_input && !(x[o] > 0)) a = b = 0;
          r.v[o] = a;
          r.abs[o] = b;
        }
    }
  return r;
}

// gw[g, c, t] = sum_n sum_p act(x)[n, cin, p + off_t] gy[n, gC+c, p]  (0 for unused taps)
Ref ref_gw(const TapTable& t, const DwShape& s, const std::vector<double>& gy,
           const std::vector<double>& x) {
  const int G = t.G, C = s.C, H = s.H, W = s.W;
  const long long cin = cin_of(t, s);
  Ref r;
  r.v.assign((size_t)G * C * t.T, 0.0);
  r.abs = r.v;
  r.nterms = s.N * H * W;
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) {
      const long long ci = s.shared_input ? c : (long long)g * C + c;
      for (int i = 0; i < t.ntaps[g]; ++i) {
        double a = 0, b = 0;
        for (int n = 0; n < s.N; ++n)
          for (int h = 0; h < H; ++h)
            for (int q = 0; q < W; ++q) {
              const int yy = h + t.dy[g][i], xx = q + t.dx[g][i];
              if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
              double v = x[((n * cin + ci) * H + yy) * W + xx];
              if (s.relu_input && v < 0) v = 0;
              const double p = v * gy[((((size_t)n * G + g) * C + c) * H + h) * W + q];
              a += p;
              b += std::fabs(p);
            }
        r.v[((size_t)g * C + c) * t.T + i] = a;
        r.abs[((size_t)g * C + c) * t.T + i] = b;
      }
    }
  return r;
}

// Largest |got - ref| / bound (> 1 fails; NaN, i.e. an element never written, fails too).
template <typename S>
double worst(const std::vector<S>& got, const Ref& ref) {
  double w = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double bound = Fmt<S>::u * std::fabs(ref.v[i]) +
                         1.01 * ref.nterms * Fmt<S>::acc_u * ref.abs[i] * (1 + Fmt<S>::u) +
                         Fmt<S>::tiny;
    const double e = std::fabs(Fmt<S>::to(got[i]) - ref.v[i]) / bound;
    if (!(e <= w)) w = e;  // keeps NaN
    if (std::isnan(w)) break;
  }
  return w;
}

template <typename S>
std::vector<S> random_vec(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<double> d(-1.0, 1.0);
  std::vector<S> v(n);
  for (auto& e : v) e = Fmt<S>::from(d(rng));
  return v;
}

template <typename S>
std::vector<double> as_double(const std::vector<S>& v) {
  std::vector<double> d(v.size());
  for (size_t i = 0; i < v.size(); ++i) d[i] = Fmt<S>::to(v[i]);
  return d;
}

template <typename S>
bool same_bits(const std::vector<S>& a, const std::vector<S>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(S)) == 0);
}

template <typename S>
struct Outputs {
  std::vector<S> y, gx, gw, gx_only, gw_only;
};

// One run of the kernels: y, then (gx, gw) together, then (if `alone`) each alone.
template <typename S>
bool run_once(const Case& k, const std::vector<S>& x, const std::vector<S>& w,
              const std::vector<S>& gy, bool alone, Outputs<S>& o) {
  using Acc = typename std::conditional<std::is_same<S, double>::value, double, float>::type;
  const TapTable& t = k.tab.t;
  const DwShape& s = k.s;
  const DType dt = Fmt<S>::dtype;
  o.y.assign(gy.size(), Fmt<S>::nan());
  o.gx.assign(x.size(), Fmt<S>::nan());
  o.gw.assign(w.size(), Fmt<S>::nan());
  o.gx_only = o.gx;
  o.gw_only = o.gw;
  const long long ws_elems = dw_bwd_cuda_workspace_elems(t, s);
  std::vector<Acc> ws((size_t)ws_elems, Acc(NAN));  // exactly its size: ASan sees any overflow
  void* wsp = ws_elems ? ws.data() : nullptr;
  int e[4] = {0, 0, 0, 0};
  e[0] = dw_fwd_cuda(t, s, dt, x.data(), w.data(), o.y.data(), nullptr);
  e[1] = dw_bwd_cuda(t, s, dt, gy.data(), x.data(), w.data(), o.gx.data(), o.gw.data(), wsp,
                     nullptr);
  if (alone) {
    e[2] = dw_bwd_cuda(t, s, dt, gy.data(), x.data(), w.data(), o.gx_only.data(), nullptr,
                       nullptr, nullptr);
    e[3] = dw_bwd_cuda(t, s, dt, gy.data(), x.data(), w.data(), nullptr, o.gw_only.data(), wsp,
                       nullptr);
  } else {
    o.gx_only = o.gx;
    o.gw_only = o.gw;
  }
  for (int i = 0; i < 4; ++i)
    if (e[i] != 0) {
      std::printf("  call %d returned %d: %s\n", i, e[i], cuda_host::last_error_message());
      return false;
    }
  return true;
}

template <typename S>
int check_case(const Case& k, unsigned seed, bool all_schedules) {
  const TapTable& t = k.tab.t;
  const DwShape& s = k.s;
  const auto t0 = std::chrono::steady_clock::now();
  std::mt19937 rng(seed);
  const size_t nx = (size_t)s.N * cin_of(t, s) * s.H * s.W;
  const size_t ny = (size_t)s.N * t.G * s.C * s.H * s.W;
  const std::vector<S> x = random_vec<S>(nx, rng), w = random_vec<S>((size_t)t.G * s.C * t.T, rng),
                       gy = random_vec<S>(ny, rng);
  const std::vector<double> xd = as_double(x), wd = as_double(w), gyd = as_double(gy);
  cuda_host::set_schedule(cuda_host::Schedule::kForward);
  Outputs<S> o;
  if (!run_once(k, x, w, gy, all_schedules, o)) return 1;
  int fails = 0;
  const Ref ry = ref_fwd(t, s, xd, wd), rgx = ref_gx(t, s, gyd, xd, wd),
            rgw = ref_gw(t, s, gyd, xd);
  const double ey = worst(o.y, ry), egx = worst(o.gx, rgx), egw = worst(o.gw, rgw);
  const bool alone = same_bits(o.gx, o.gx_only) && same_bits(o.gw, o.gw_only);
  char line[256];
  std::snprintf(line, sizeof line,
                "%-14s N%d C%d %dx%d relu=%d shared=%d: error/bound y %.3g gx %.3g gw %.3g",
                k.tab.name.c_str(), s.N, s.C, s.H, s.W, s.relu_input, s.shared_input, ey, egx,
                egw);
  std::printf("%s (%.2f s)%s\n", line,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
              alone ? "" : "; gx / gw alone differ from gx + gw");
  fails += !(ey <= 1) + !(egx <= 1) + !(egw <= 1) + !alone;
  if (all_schedules) {
    for (auto sc : {cuda_host::Schedule::kReverse, cuda_host::Schedule::kShuffle}) {
      cuda_host::set_schedule(sc, seed);
      Outputs<S> p;
      if (!run_once(k, x, w, gy, false, p)) return fails + 1;
      const bool same = same_bits(p.y, o.y) && same_bits(p.gx, o.gx) && same_bits(p.gw, o.gw);
      if (!same) {
        std::printf("  the %s schedule changed the outputs (a race between threads)\n",
                    sc == cuda_host::Schedule::kReverse ? "reverse" : "shuffled");
        ++fails;
      }
    }
    cuda_host::set_schedule(cuda_host::Schedule::kForward);
  }
  return fails;
}

// Arguments outside the kernels' limits are refused (-1) before anything runs.
int check_rejections(DType dt) {
  const TapTable good = grouped("k3", {3}, {1}).t;
  const DwShape s{1, 2, 4, 4, 0, 1};
  std::vector<double> buf(64, 0.0);  // big enough for every call below (nothing is launched)
  void* p = buf.data();
  int fails = 0;
  auto expect_refused = [&](const char* what, const TapTable& t, const DwShape& sh, DType d) {
    const int a = dw_fwd_cuda(t, sh, d, p, p, p, nullptr);
    const int b = dw_bwd_cuda(t, sh, d, p, p, p, p, p, p, nullptr);
    if (a != -1 || b != -1) {
      std::printf("  not refused: %s (fwd %d, bwd %d)\n", what, a, b);
      ++fails;
    }
  };
  TapTable t = good;
  t.G = 0;
  expect_refused("0 groups", t, s, dt);
  t = good;
  t.G = kMaxGroups + 1;
  expect_refused("too many groups", t, s, dt);
  t = good;
  t.T = kMaxTaps + 1;
  expect_refused("too many taps", t, s, dt);
  t = good;
  t.ntaps[0] = t.T + 1;
  expect_refused("more taps than T", t, s, dt);
  t = good;
  t.dy[0][0] = 2;
  expect_refused("a tap beyond the radius", t, s, dt);
  t = good;
  t.radius = kMaxRadius + 1;
  expect_refused("radius beyond the limit", t, s, dt);
  expect_refused("0 channels", good, DwShape{1, 0, 4, 4, 0, 1}, dt);
  expect_refused("negative batch", good, DwShape{-1, 2, 4, 4, 0, 1}, dt);
  expect_refused("unknown dtype", good, s, DType(7));
  if (dw_bwd_cuda(good, s, dt, p, p, p, nullptr, p, nullptr, nullptr) != -1) {
    std::printf("  not refused: weight gradient without a workspace\n");
    ++fails;
  }
  return fails;
}

template <typename S>
int check_all(bool all_schedules) {
  int fails = check_rejections(Fmt<S>::dtype);
  unsigned seed = 1;
  for (const Case& k : cases()) fails += check_case<S>(k, seed++, all_schedules);
  return fails;
}

}  // namespace

int run_kernel_checks(const char* dtype, bool all_schedules) {
  const std::string d = dtype;
  int fails;
  if (d == "f32") fails = check_all<float>(all_schedules);
  else if (d == "f64") fails = check_all<double>(all_schedules);
  else if (d == "f16") fails = check_all<__half>(all_schedules);
  else if (d == "bf16") fails = check_all<__nv_bfloat16>(all_schedules);
  else {
    std::fprintf(stderr, "unknown dtype %s (f32, f64, f16, bf16)\n", dtype);
    return 2;
  }
  std::printf("%s: %d failure(s)\n", dtype, fails);
  return fails ? 1 : 0;
}
