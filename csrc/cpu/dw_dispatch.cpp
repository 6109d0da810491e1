// Run-time choice of the CPU kernel variant (see dw_isa.h for how the variants are built).
//
// The choice is a pure function of (the CPU's feature names, the variants compiled in, the
// forced name), `choose_isa`, testable with made-up feature sets (op hdnas_native::choose_isa).
// The CPU's features come from __builtin_cpu_supports (GCC/Clang on x86: CPUID plus the OS's
// XSAVE state, so AVX-512 counts only where the OS saves the zmm registers); elsewhere the set
// is empty and the portable variant runs.  HDNAS_NATIVE_ISA=portable|avx2|avx512 (read at the
// first kernel call) forces a variant; one this CPU cannot run is an error naming what it lacks.
#include "dw_cpu.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace hdnas {
namespace cpu {

namespace {

struct Variant {
  const char* name;
  std::vector<const char*> requires_;  // CPU features (names as __builtin_cpu_supports spells them)
  const IsaKernels* (*get)();
};

const std::vector<Variant>& variants() {  // best last
  static const std::vector<Variant> v = {
      {"portable", {}, &kernels_portable},
      {"avx2", {"avx2", "fma"}, &kernels_avx2},
      {"avx512", {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}, &kernels_avx512},
  };
  return v;
}

std::string join(const std::vector<std::string>& xs) {
  std::string s;
  for (const auto& x : xs) s += (s.empty() ? "" : ", ") + x;
  return s;
}

std::string lower_trim(const std::string& s) {
  std::string r;
  for (char ch : s)
    if (!std::isspace(static_cast<unsigned char>(ch))) r += static_cast<char>(std::tolower(ch));
  return r;
}

}  // namespace

std::set<std::string> cpu_features() {
  std::set<std::string> f;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#define HDNAS_FEATURE(name) \
  if (__builtin_cpu_supports(name)) f.insert(name);
  HDNAS_FEATURE("avx2")
  HDNAS_FEATURE("fma")
  HDNAS_FEATURE("avx512f")
  HDNAS_FEATURE("avx512bw")
  HDNAS_FEATURE("avx512vl")
  HDNAS_FEATURE("avx512dq")
#undef HDNAS_FEATURE
#endif
  return f;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> r;
  for (const auto& v : variants())
    if (v.get() != nullptr) r.push_back(v.name);
  return r;
}

std::string choose_isa(const std::set<std::string>& features,
                       const std::vector<std::string>& compiled, const std::string& forced,
                       std::string* error) {
  std::vector<std::string> runnable, names;
  std::string why_not;  // for the forced variant
  const std::string want = lower_trim(forced);
  for (const auto& v : variants()) {
    names.push_back(v.name);
    std::vector<std::string> missing;
    for (const char* r : v.requires_)
      if (!features.count(r)) missing.push_back(r);
    const bool built = std::find(compiled.begin(), compiled.end(), v.name) != compiled.end();
    if (built && missing.empty()) runnable.push_back(v.name);
    if (want == v.name) {
      if (!built)
        why_not = std::string("the ") + v.name +
                  " kernels are not part of this build (they need an x86 GCC or Clang build)";
      else if (!missing.empty())
        why_not = std::string("this CPU cannot run the ") + v.name + " kernels: it lacks " +
                  join(missing);
    }
  }
  if (want.empty() || want == "auto") {
    if (runnable.empty()) {  // cannot happen with the portable variant compiled in
      *error = "no CPU kernel variant is compiled in";
      return "";
    }
    return runnable.back();
  }
  if (std::find(names.begin(), names.end(), want) == names.end()) {
    *error = "'" + forced + "' is not a kernel variant (auto, " + join(names) + ")";
    return "";
  }
  if (!why_not.empty()) {
    *error = why_not + " (it runs: " + join(runnable) + ")";
    return "";
  }
  return want;
}

namespace {

std::mutex g_mutex;
std::atomic<const IsaKernels*> g_active{nullptr};
std::string g_error;  // a bad HDNAS_NATIVE_ISA: raised at every call until set_isa succeeds

const IsaKernels* table_of(const std::string& name) {
  for (const auto& v : variants())
    if (name == v.name) return v.get();
  return nullptr;
}

// The variant for `forced` (empty: the best this CPU runs), or raises naming `what` forced it.
const IsaKernels* choose_or_raise(const std::string& forced, const std::string& what) {
  std::string err;
  const std::string name = choose_isa(cpu_features(), compiled_isas(), forced, &err);
  TORCH_CHECK(err.empty(), "hdnas_native: ", what, ": ", err);
  return table_of(name);
}

}  // namespace

const IsaKernels& active_kernels() {
  const IsaKernels* k = g_active.load(std::memory_order_acquire);
  if (k != nullptr) return *k;
  std::lock_guard<std::mutex> lock(g_mutex);
  k = g_active.load();
  if (k != nullptr) return *k;
  TORCH_CHECK(g_error.empty(), g_error);  // a bad HDNAS_NATIVE_ISA: the same error every call
  const char* env = std::getenv("HDNAS_NATIVE_ISA");
  const std::string forced = env != nullptr ? env : "";
  try {
    k = choose_or_raise(forced, "HDNAS_NATIVE_ISA=" + forced);
  } catch (const c10::Error& e) {
    g_error = e.what_without_backtrace();
    throw;
  }
  g_active.store(k, std::memory_order_release);
  return *k;
}

std::string isa_op() { return active_kernels().name; }

std::string set_isa_op(const std::string& name) {
  // a refused request changes nothing; an accepted one also clears a bad HDNAS_NATIVE_ISA
  const IsaKernels* k = choose_or_raise(name, "set_isa('" + name + "')");
  std::lock_guard<std::mutex> lock(g_mutex);
  g_error.clear();
  g_active.store(k, std::memory_order_release);
  return k->name;
}

std::vector<std::string> isa_supported_op() {
  std::vector<std::string> r;
  const auto feats = cpu_features();
  const auto built = compiled_isas();
  for (const auto& v : variants()) {
    std::string err;
    choose_isa(feats, built, v.name, &err);
    if (err.empty()) r.push_back(v.name);
  }
  return r;
}

std::string choose_isa_op(const std::vector<std::string>& features, const std::string& forced) {
  std::string err;
  const std::string name =
      choose_isa(std::set<std::string>(features.begin(), features.end()), compiled_isas(), forced, &err);
  TORCH_CHECK(err.empty(), "hdnas_native: choose_isa('", forced, "'): ", err);
  return name;
}

std::vector<std::string> cpu_features_op() {
  const auto f = cpu_features();
  return std::vector<std::string>(f.begin(), f.end());
}

}  // namespace cpu
}  // namespace hdnas
