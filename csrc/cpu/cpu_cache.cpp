// A caching CPU allocator for PyTorch's CPU tensors (opt-in, process-wide; Python side:
// hdnas/mixed/cpu_cache.py).
//
// Why: a search step allocates and frees thousands of tensor buffers of a few dozen sizes.
// glibc serves them from one heap interleaved with the tensors' small bookkeeping chunks; the
// chunks its per-thread cache keeps (marked in use) sit between freed buffers, freed space does
// not coalesce, and the heap grows from step to step (measured on DARTS' second-order step:
// the fused op's peak RSS 1.7 GB after one step, 2.5 GB after four, against a live peak of
// 0.28 GB; with this allocator 0.42-0.45 GB, steady).  Here every buffer of kMinBytes or more
// is its own anonymous mapping, rounded up to a size class (eight per power of two: at most 12.5 % padding), and a freed one
// is kept, by class, for the next request of its class: no fragmentation between classes, no
// page faults for reused buffers.
//
// Bound: a request that finds no free block of its class, and would take the mapped total (live
// + cached) above kSlack times the peak of the live total so far, first unmaps cached blocks of
// other classes (largest cached class first) to stay within it; so the mapped total never
// exceeds twice the live peak (plus one request), whatever the sequence of sizes.  (Unmapping
// as many bytes as every miss maps, a bound of 1x, thrashes: on DARTS' second-order step the
// classes' peaks fall in different phases, and it unmapped 15 GB a step.)  Smaller requests go
// to malloc.
//
// Every block starts with a 64-byte header (its class bytes, 0 for malloc'ed) before the data,
// so the deleter needs only the data pointer (raw_deleter() works) and the data keeps c10's
// 64-byte alignment.  Thread-safe (one mutex, held only to push or pop a free list); fork-safe
// (the mutex is held across fork).  Installed with c10::SetCPUAllocator; uninstalling restores
// the allocator that was there; blocks allocated before either still free correctly (each
// DataPtr carries its own deleter).  Limits: it installs with c10's highest priority (255),
// which c10 keeps after uninstalling, so a later SetCPUAllocator of lower priority is ignored;
// and it does not report to torch.profiler's memory profiling.
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <vector>

namespace hdnas {
namespace {

constexpr size_t kHeader = 64;               // keeps the data 64-byte aligned, as c10's
constexpr size_t kMinBytes = size_t(1) << 17;  // 128 KiB, glibc's own initial mmap threshold
constexpr int64_t kSlack = 2;  // the mapped total stays within kSlack x the peak of live bytes

struct Header {
  size_t bytes;  // the mapping's length; 0: the block came from malloc
};

// The class of a block of `total` bytes: rounded up to 1/8 of its power of two (pages at least).
size_t class_bytes(size_t total) {
  const size_t top = size_t(1) << (63 - __builtin_clzll(total));
  const size_t g = std::max<size_t>(4096, top >> 3);
  return (total + g - 1) / g * g;
}

struct Cache {
  std::mutex mu;
  std::map<size_t, std::vector<void*>> free_blocks;  // by class bytes
  int64_t live = 0, cached = 0, peak_live = 0, peak_mapped = 0, hits = 0, misses = 0, unmapped = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors may be freed at exit
  return *c;
}

void unmap(void* base, size_t bytes) { munmap(base, bytes); }

// The number of cached blocks (mutex held): room to reserve before taking them out.
size_t cached_blocks(const Cache& c) {
  size_t n = 0;
  for (const auto& kv : c.free_blocks) n += kv.second.size();
  return n;
}

// Unmap cached blocks of classes other than `keep`, at least `want` bytes, largest cached
// class first.  Called with the mutex held; returns the blocks to unmap after unlocking (`out`
// has room reserved for every cached block, so nothing here allocates).
void take_for_release(Cache& c, size_t keep, int64_t want,
                      std::vector<std::pair<void*, size_t>>& out) {
  while (want > 0 && c.cached > 0) {
    auto best = c.free_blocks.end();
    size_t best_bytes = 0;
    for (auto it = c.free_blocks.begin(); it != c.free_blocks.end(); ++it) {
      const size_t b = it->first * it->second.size();
      if (it->first != keep && b > best_bytes) {
        best = it;
        best_bytes = b;
      }
    }
    if (best == c.free_blocks.end()) return;
    while (want > 0 && !best->second.empty()) {
      out.emplace_back(best->second.back(), best->first);
      best->second.pop_back();
      c.cached -= static_cast<int64_t>(best->first);
      c.unmapped += static_cast<int64_t>(best->first);
      want -= static_cast<int64_t>(best->first);
    }
  }
}

void cached_delete(void* data) noexcept {
  if (data == nullptr) return;
  char* base = static_cast<char*>(data) - kHeader;
  const size_t b = reinterpret_cast<Header*>(base)->bytes;
  if (b == 0) {
    std::free(base);
    return;
  }
  Cache& c = cache();
  bool kept = true;
  {
    std::lock_guard<std::mutex> g(c.mu);
    c.live -= static_cast<int64_t>(b);
    try {
      c.free_blocks[b].push_back(base);
      c.cached += static_cast<int64_t>(b);
    } catch (...) {  // no memory for the free list: give the block back instead
      c.unmapped += static_cast<int64_t>(b);
      kept = false;
    }
  }
  if (!kept) unmap(base, b);
}

int64_t release_all();

char* allocate_block(size_t total) {
  if (total < kMinBytes) {
    void* p = nullptr;
    if (posix_memalign(&p, kHeader, total) != 0) return nullptr;
    reinterpret_cast<Header*>(p)->bytes = 0;
    return static_cast<char*>(p);
  }
  const size_t b = class_bytes(total);
  const int64_t bi = static_cast<int64_t>(b);
  Cache& c = cache();
  char* base = nullptr;
  std::vector<std::pair<void*, size_t>> release;
  {
    std::lock_guard<std::mutex> g(c.mu);
    auto it = c.free_blocks.find(b);
    if (it != c.free_blocks.end() && !it->second.empty()) {
      base = static_cast<char*>(it->second.back());
      it->second.pop_back();
      c.cached -= bi;
      c.hits++;
      c.live += bi;
      c.peak_live = std::max(c.peak_live, c.live);
    } else {
      const int64_t over = c.live + c.cached + bi - kSlack * std::max(c.peak_live, c.live + bi);
      if (over > 0) {
        release.reserve(cached_blocks(c));  // may throw here, before anything changed
        take_for_release(c, b, over, release);
      }
    }
  }
  for (auto& r : release) unmap(r.first, r.second);
  if (base == nullptr) {
    void* p = mmap(nullptr, b, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {  // give every cached block back, then try once more
      release_all();
      p = mmap(nullptr, b, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return nullptr;
    }
    base = static_cast<char*>(p);
    std::lock_guard<std::mutex> g(c.mu);  // counted once the mapping exists
    c.misses++;
    c.live += bi;
    c.peak_live = std::max(c.peak_live, c.live);
    c.peak_mapped = std::max(c.peak_mapped, c.live + c.cached);
  }
  reinterpret_cast<Header*>(base)->bytes = b;
  return base;
}

int64_t release_all() {
  Cache& c = cache();
  std::vector<std::pair<void*, size_t>> out;
  {
    std::lock_guard<std::mutex> g(c.mu);
    out.reserve(cached_blocks(c));
    for (auto& kv : c.free_blocks) {
      for (void* p : kv.second) out.emplace_back(p, kv.first);
      kv.second.clear();
    }
    c.unmapped += c.cached;
    c.cached = 0;
  }
  int64_t total = 0;
  for (auto& r : out) {
    unmap(r.first, r.second);
    total += static_cast<int64_t>(r.second);
  }
  return total;
}

struct CachingCpuAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n == 0) return {nullptr, nullptr, &cached_delete, cpu};
    TORCH_CHECK(n <= (size_t(INT64_MAX) >> 1), "hdnas cpu_cache: cannot allocate ", n, " bytes");
    char* base = allocate_block(n + kHeader);
    TORCH_CHECK_WITH(OutOfMemoryError, base != nullptr,
                     "hdnas cpu_cache: out of memory allocating ", n, " bytes");
    void* data = base + kHeader;
    return {data, data, &cached_delete, cpu};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &cached_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// Never destroyed (as the cache): a thread may still allocate while the process exits.
CachingCpuAllocator& the_allocator() {
  static auto* a = new CachingCpuAllocator();
  return *a;
}
c10::Allocator* g_previous = nullptr;
std::mutex g_install_mu;

void fork_prepare() { cache().mu.lock(); }
void fork_release() { cache().mu.unlock(); }

}  // namespace

// Installs (on=true) or uninstalls the caching allocator; returns whether it was installed.
bool cpu_cache_enable(bool on) {
  std::lock_guard<std::mutex> g(g_install_mu);
  static bool fork_handlers = false;
  c10::Allocator* current = c10::GetCPUAllocator();
  const bool was = current == &the_allocator();
  if (on && !was) {
    if (!fork_handlers) {
      cache();
      pthread_atfork(fork_prepare, fork_release, fork_release);
      fork_handlers = true;
    }
    g_previous = current;
    c10::SetCPUAllocator(&the_allocator(), /*priority=*/UINT8_MAX);
  } else if (!on && was) {
    c10::SetCPUAllocator(g_previous, /*priority=*/UINT8_MAX);
  }
  return was;
}

bool cpu_cache_enabled() {
  std::lock_guard<std::mutex> g(g_install_mu);
  return c10::GetCPUAllocator() == &the_allocator();
}

// (live, cached, peak_mapped, hits, misses, unmapped) bytes / counts since the process began.
std::vector<int64_t> cpu_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  return {c.live, c.cached, c.peak_mapped, c.hits, c.misses, c.unmapped};
}

// Unmaps every cached (free) block; returns the bytes given back to the system.
int64_t cpu_cache_release() { return release_all(); }

}  // namespace hdnas
