// The runtime of the host emulation of CUDA (see cuda_host.h): fibers, barriers, shuffles,
// launches.  Compiled once per program, next to the kernels.
#include "cuda_host.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_HOST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_HOST_ASAN 1
#endif
#endif
#ifdef CUDA_HOST_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if defined(__x86_64__)
// save_sp <- rsp after pushing the callee-saved registers; rsp <- load_sp; pop them; return
// into the other context.  A new context's stack holds six zero registers and the entry point.
asm(R"(
  .pushsection .text
  .p2align 4
  .globl cuda_host_switch_x86_64
  .hidden cuda_host_switch_x86_64
  .type cuda_host_switch_x86_64, @function
cuda_host_switch_x86_64:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_host_switch_x86_64, .-cuda_host_switch_x86_64
  .popsection
)");
extern "C" void cuda_host_switch_x86_64(void** save_sp, void* load_sp);
constexpr bool kHaveNativeSwitch = true;
#else
constexpr bool kHaveNativeSwitch = false;
#endif

cudaError_t cudaGetLastError();

namespace cuda_host {
namespace detail {

Current g_cur;

namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kMaxDynamicSmem = 48 * 1024;

struct Context {
  void* sp = nullptr;  // native switch
  ucontext_t uc;       // ucontext switch
};

struct Fiber {
  Context ctx;
  char* stack = nullptr;  // lowest usable byte; a guard page sits below it
  uint3 tid{0, 0, 0};
  unsigned warp = 0, lane = 0;
  unsigned shuffles = 0;  // shuffles done: selects the exchange buffer (double buffering)
  bool done = false;
  void* asan_fake_stack = nullptr;
};

struct Barrier {
  unsigned generation = 0, arrived = 0, participants = 0;
};

struct Runtime {
  std::vector<Fiber> fibers;
  Context scheduler;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  Fiber* cur = nullptr;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<unsigned char> exchange;  // [warp][2][32 lanes][8 bytes]
  unsigned long long progress = 0;      // barrier arrivals and finished fibers
  bool failed = false;
  std::string failure;
  bool use_ucontext = !kHaveNativeSwitch;
};

std::mutex g_launch_mutex;  // one launch at a time (static __shared__ arrays, g_cur)
Runtime* g_rt = nullptr;
Schedule g_schedule = Schedule::kForward;
unsigned g_seed = 0;
bool g_use_ucontext = !kHaveNativeSwitch;
std::string g_last_message;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local bool t_in_launch = false;

// ---- context switches (with the fiber annotations ASan needs to follow stack switches) --------

void asan_start(void** fake, const void* bottom, size_t size) {
#ifdef CUDA_HOST_ASAN
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}
void asan_finish(void* fake, const void** bottom, size_t* size) {
#ifdef CUDA_HOST_ASAN
  __sanitizer_finish_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}

void switch_context(Context& from, Context& to) {
#if defined(__x86_64__)
  if (!g_rt->use_ucontext) {
    cuda_host_switch_x86_64(&from.sp, to.sp);
    return;
  }
#endif
  swapcontext(&from.uc, &to.uc);
}

void fiber_entry();

void make_context(Fiber& f) {
  if (g_rt->use_ucontext) {
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = f.stack;
    f.ctx.uc.uc_stack.ss_size = kStackBytes;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, fiber_entry, 0);
    return;
  }
  // rsp at fiber_entry must be 8 mod 16, as after a call: [fake return address][entry][6 regs]
  void** sp = reinterpret_cast<void**>(
      (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15));
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  f.ctx.sp = sp;
}

// Fiber -> scheduler.  `dying`: the fiber will never be resumed.
void to_scheduler(bool dying) {
  Runtime& rt = *g_rt;
  Fiber* f = rt.cur;
  asan_start(dying ? nullptr : &f->asan_fake_stack, rt.scheduler_stack, rt.scheduler_stack_size);
  switch_context(f->ctx, rt.scheduler);
  asan_finish(f->asan_fake_stack, nullptr, nullptr);
}

// Scheduler -> fiber, until it yields or finishes.
void resume(Fiber& f) {
  Runtime& rt = *g_rt;
  rt.cur = &f;
  g_cur.thread_idx = f.tid;
  void* fake = nullptr;
  asan_start(&fake, f.stack, kStackBytes);
  switch_context(rt.scheduler, f.ctx);
  asan_finish(fake, nullptr, nullptr);
}

void fiber_entry() {
  Runtime& rt = *g_rt;
  asan_finish(nullptr, &rt.scheduler_stack, &rt.scheduler_stack_size);
  rt.body(rt.arg);
  rt.cur->done = true;
  ++rt.progress;
  to_scheduler(true);
  std::abort();  // a finished fiber is never resumed
}

// Stops the launch from inside a fiber (whose frames are abandoned, not unwound).
[[noreturn]] void fail_in_fiber(const std::string& why) {
  Runtime& rt = *g_rt;
  rt.failed = true;
  const uint3 t = rt.cur->tid, b = g_cur.block_idx;
  rt.failure = why + " (thread " + std::to_string(t.x) + "," + std::to_string(t.y) + "," +
               std::to_string(t.z) + " of block " + std::to_string(b.x) + "," +
               std::to_string(b.y) + "," + std::to_string(b.z) + ")";
  to_scheduler(true);
  std::abort();
}

void arrive_and_wait(Barrier& b) {
  Runtime& rt = *g_rt;
  const unsigned gen = b.generation;
  ++rt.progress;
  if (++b.arrived == b.participants) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  do to_scheduler(false);
  while (b.generation == gen);
}

// ---- scheduling ------------------------------------------------------------------------------

void order(std::vector<unsigned>& idx, std::mt19937& rng) {
  std::iota(idx.begin(), idx.end(), 0u);
  if (g_schedule == Schedule::kReverse) std::reverse(idx.begin(), idx.end());
  if (g_schedule == Schedule::kShuffle) std::shuffle(idx.begin(), idx.end(), rng);
}

// Runs one block to completion; false on a failure (rt.failure says why).
bool run_block(Runtime& rt, std::mt19937& rng, std::vector<unsigned>& idx, size_t shmem) {
  if (shmem) std::memset(g_cur.dynamic_smem, 0xff, shmem);
  for (Fiber& f : rt.fibers) {
    f.done = false;
    f.shuffles = 0;
    make_context(f);
  }
  rt.block.arrived = 0;
  for (Barrier& w : rt.warps) w.arrived = 0;
  size_t live = rt.fibers.size();
  while (live) {
    const unsigned long long before = rt.progress;
    order(idx, rng);
    for (unsigned i : idx) {
      Fiber& f = rt.fibers[i];
      if (f.done) continue;
      resume(f);
      if (rt.failed) return false;
      if (f.done) --live;
    }
    if (live && rt.progress == before) {
      size_t at_barrier = rt.block.arrived;
      rt.failed = true;
      rt.failure = "deadlock in block " + std::to_string(g_cur.block_idx.x) + "," +
                   std::to_string(g_cur.block_idx.y) + "," + std::to_string(g_cur.block_idx.z) +
                   ": " + std::to_string(at_barrier) + " of " + std::to_string(rt.fibers.size()) +
                   " threads wait in __syncthreads, " +
                   std::to_string(rt.fibers.size() - live) +
                   " have returned, the others wait in a warp shuffle";
      return false;
    }
  }
  return true;
}

cudaError_t check_config(dim3 grid, dim3 block, size_t shmem, std::string& why) {
  const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
  if (!grid.x || !grid.y || !grid.z || !block.x || !block.y || !block.z) {
    why = "a grid or block dimension is 0";
    return cudaErrorInvalidConfiguration;
  }
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    why = "grid too large (x <= 2^31-1, y, z <= 65535)";
    return cudaErrorInvalidConfiguration;
  }
  if (threads > 1024 || block.z > 64) {
    why = "block too large (at most 1024 threads, z <= 64)";
    return cudaErrorInvalidConfiguration;
  }
  if (shmem > kMaxDynamicSmem) {
    why = "dynamic shared memory above 48 KiB needs cudaFuncSetAttribute";
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

void set_last_error(cudaError_t e) { t_last_error = e; }

void sync_block() {
  if (g_rt == nullptr) std::abort();  // not inside a kernel
  arrive_and_wait(g_rt->block);
}

unsigned char* shuffle_begin(unsigned mask, int width, int* lane) {
  Runtime& rt = *g_rt;
  Fiber& f = *rt.cur;
  const unsigned n = rt.warps[f.warp].participants;
  const unsigned full = n == 32 ? 0xffffffffu : (1u << n) - 1;
  if (mask != full) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "shuffle mask 0x%08x is not the warp's lanes 0x%08x", mask,
                  full);
    fail_in_fiber(buf);
  }
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail_in_fiber("shuffle width " + std::to_string(width) + " is not a power of 2 up to 32");
  *lane = int(f.lane);
  // Double buffering: a lane can start shuffle k+1 while others still read shuffle k, but not
  // shuffle k+2, which waits for every lane at the barrier of shuffle k+1.
  return rt.exchange.data() + (size_t(f.warp) * 2 + (f.shuffles++ & 1u)) * 32 * 8;
}

void warp_barrier() { arrive_and_wait(g_rt->warps[g_rt->cur->warp]); }

cudaError_t run_grid(dim3 grid, dim3 block, size_t shmem, void (*body)(void*), void* arg) {
  std::string why;
  cudaError_t e = check_config(grid, block, shmem, why);
  if (e != cudaSuccess) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    g_last_message = "invalid launch: " + why;
    return e;
  }
  if (t_in_launch)  // from inside a kernel
    fail_in_fiber("kernel launched from a kernel (dynamic parallelism is not emulated)");
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  t_in_launch = true;
  Runtime rt;
  rt.use_ucontext = g_use_ucontext || !kHaveNativeSwitch;
  rt.body = body;
  rt.arg = arg;
  const unsigned nthreads = block.x * block.y * block.z, nwarps = (nthreads + 31) / 32;
  rt.block.participants = nthreads;
  rt.warps.resize(nwarps);
  for (unsigned w = 0; w < nwarps; ++w) rt.warps[w].participants = std::min(32u, nthreads - 32 * w);
  rt.exchange.assign(size_t(nwarps) * 2 * 32 * 8, 0);
  // stacks: one mapping, a PROT_NONE guard page below each stack
  const size_t page = size_t(sysconf(_SC_PAGESIZE)), slot = kStackBytes + page;
  void* map = mmap(nullptr, slot * nthreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (map == MAP_FAILED) {
    g_last_message = "cannot map the fiber stacks";
    return cudaErrorLaunchFailure;
  }
  rt.fibers.resize(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = rt.fibers[t];
    char* base = static_cast<char*>(map) + slot * t;
    mprotect(base, page, PROT_NONE);
    f.stack = base + page;
    f.tid = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    f.warp = t / 32;
    f.lane = t % 32;
  }
  unsigned char* smem =
      shmem ? static_cast<unsigned char*>(::operator new(shmem, std::align_val_t(16))) : nullptr;
  g_cur.block_dim = block;
  g_cur.grid_dim = grid;
  g_cur.dynamic_smem = smem;
  std::mt19937 rng(g_seed);
  std::vector<unsigned> fiber_order(nthreads);
  const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
  std::vector<unsigned long long> block_order;
  if (g_schedule == Schedule::kShuffle) {
    block_order.resize(nblocks);
    std::iota(block_order.begin(), block_order.end(), 0ull);
    std::shuffle(block_order.begin(), block_order.end(), rng);
  }
  g_rt = &rt;
  bool ok = true;
  for (unsigned long long i = 0; i < nblocks && ok; ++i) {
    const unsigned long long b = g_schedule == Schedule::kForward   ? i
                                 : g_schedule == Schedule::kReverse ? nblocks - 1 - i
                                                                    : block_order[i];
    g_cur.block_idx = {unsigned(b % grid.x), unsigned(b / grid.x % grid.y),
                       unsigned(b / grid.x / grid.y)};
    ok = run_block(rt, rng, fiber_order, shmem);
  }
  g_rt = nullptr;
  t_in_launch = false;
  if (smem) ::operator delete(smem, std::align_val_t(16));
#ifdef CUDA_HOST_ASAN
  ASAN_UNPOISON_MEMORY_REGION(map, slot * nthreads);  // frames of fibers stopped by a failure
#endif
  munmap(map, slot * nthreads);
  g_cur = Current{};
  if (!ok) {
    g_last_message = rt.failure;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace detail

void set_schedule(Schedule s, unsigned seed) {
  std::lock_guard<std::mutex> lock(detail::g_launch_mutex);
  detail::g_schedule = s;
  detail::g_seed = seed;
}

bool set_ucontext(bool on) {
  std::lock_guard<std::mutex> lock(detail::g_launch_mutex);
  detail::g_use_ucontext = on || !kHaveNativeSwitch;
  return detail::g_use_ucontext == on;
}

const char* last_error_message() { return detail::g_last_message.c_str(); }

}  // namespace cuda_host

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_host::detail::t_last_error;
  cuda_host::detail::t_last_error = cudaSuccess;
  return e;
}
