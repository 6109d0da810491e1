// cuda_host_check: a torch-free test program for the host emulation of CUDA (cuda_host.h) and
// for the CUDA kernels of csrc/cuda run on it.  Built with -fsanitize=address,undefined by
// hdnas/testing/cuda_host.py and run by tests/test_cuda_host*.py.  Exit status 0: passed.
//
//   cuda_host_check emulation NAME [--ucontext]   one self-test of the emulation ("list": names)
//   cuda_host_check crash-smem-overflow            writes past the dynamic shared memory: ASan
//                                                  must stop the program (the test expects that)
//   cuda_host_check kernels DTYPE [--all-schedules] the depthwise kernels against a loop
//                                                  reference (f32, f64, f16, bf16)
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda_host.h"

int run_kernel_checks(const char* dtype, bool all_schedules);  // check_kernels.cpp

namespace {

using cuda_host::Schedule;
constexpr Schedule kSchedules[] = {Schedule::kForward, Schedule::kReverse, Schedule::kShuffle};
const char* schedule_name(Schedule s) {
  return s == Schedule::kForward ? "forward" : s == Schedule::kReverse ? "reverse" : "shuffle";
}

int g_failures = 0;
void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::printf("  FAILED: %s\n", what.c_str());
  }
}

// Launches and returns cudaGetLastError(); a failed launch prints its message.
template <typename... P, typename... A>
cudaError_t run(void (*k)(P...), dim3 grid, dim3 block, size_t shmem, A&&... args) {
  cuda_host::launch(k, grid, block, shmem, nullptr, std::forward<A>(args)...);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    std::printf("  launch: error %d: %s\n", int(e), cuda_host::last_error_message());
  return e;
}

// ---- kernels ----------------------------------------------------------------------------------

__global__ void indices_kernel(int* hits, int* code, int nthreads_total) {
  const unsigned tpb = blockDim.x * blockDim.y * blockDim.z;
  const unsigned t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const unsigned b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const unsigned g = b * tpb + t;
  if ((int)g >= nthreads_total) return;
  hits[g] += 1;
  code[g] = int(((blockIdx.z * 4 + blockIdx.y) * 4 + blockIdx.x) * 1000 +
                (threadIdx.z * 8 + threadIdx.y) * 8 + threadIdx.x);
}

// Each thread writes its slot, then reads its neighbours' slots; `barrier` separates the two.
// A second round reuses the buffer (write after the reads of round one, behind a barrier).
__global__ void neighbours_kernel(int* out, bool barrier) {
  int* const s = cuda_host::dynamic_shared<int>();
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = 7 * t + 1000 * blockIdx.x;
  if (barrier) __syncthreads();
  const int r1 = s[(t + 1) % n] + s[(t + n - 1) % n];
  if (barrier) __syncthreads();
  s[t] = r1;
  if (barrier) __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

template <typename T>
__global__ void shuffle_kernel(T* out) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, lane = tid % 32, warp = tid / 32;
  const T v = T((lane + 1) * (warp + 1));
  T sum = v;  // tree sum down to lane 0
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
  T scan = v;  // inclusive prefix sum
  for (int o = 1; o < 32; o <<= 1) {
    const T up = __shfl_up_sync(0xffffffffu, scan, o);
    if (lane >= o) scan += up;
  }
  T mx = v;  // butterfly max: every lane gets it
  for (int o = 16; o > 0; o >>= 1) {
    const T other = __shfl_xor_sync(0xffffffffu, mx, o);
    mx = other > mx ? other : mx;
  }
  const T bc = __shfl_sync(0xffffffffu, v, 5, 8);  // lane 5 of each group of 8
  const T d3 = __shfl_down_sync(0xffffffffu, v, 3);  // lanes 29..31 keep their own value
  T* o = out + 5 * tid;
  o[0] = sum;
  o[1] = scan;
  o[2] = mx;
  o[3] = bc;
  o[4] = d3;
}

__global__ void poison_kernel(unsigned* seen) {
  unsigned* const s = cuda_host::dynamic_shared<unsigned>();
  const int t = threadIdx.x;
  seen[blockIdx.x * blockDim.x + t] = s[t];  // before any write in this block
  s[t] = blockIdx.x + 1;                     // what the next block must not see
}

__global__ void static_shared_kernel(int* out) {
  __shared__ int vals[64];
  const int t = threadIdx.x;
  vals[t] = t + 100 * (int)blockIdx.x;
  __syncthreads();
  if (t == 0) {
    int s = 0;
    for (int i = 0; i < (int)blockDim.x; ++i) s += vals[i];
    out[blockIdx.x] = s;
  }
}

__global__ void early_return_kernel(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void mixed_barriers_kernel(int* out) {
  if (threadIdx.x < 32) {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, (int)threadIdx.x, 1);
  } else {
    __syncthreads();
  }
}

__global__ void partial_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, (int)threadIdx.x, 1);
}

__global__ void smem_overflow_kernel(float* out) {
  float* const s = cuda_host::dynamic_shared<float>();
  s[threadIdx.x + 1] = 1.0f;  // the last thread writes one past the end
  out[threadIdx.x] = 0.0f;
}

// ---- self-tests -------------------------------------------------------------------------------

void test_indices() {
  const dim3 grid(3, 2, 2), block(5, 3, 2);  // 30 threads: one partial warp
  const int total = 12 * 30;
  for (Schedule sc : kSchedules) {
    cuda_host::set_schedule(sc, 11);
    std::vector<int> hits(total, 0), code(total, -1);
    expect(run(indices_kernel, grid, block, 0, hits.data(), code.data(), total) == cudaSuccess,
           "launch");
    for (int g = 0; g < total; ++g) {
      const int b = g / 30, t = g % 30;
      const int bx = b % 3, by = b / 3 % 2, bz = b / 6, tx = t % 5, ty = t / 5 % 3, tz = t / 15;
      const int want = ((bz * 4 + by) * 4 + bx) * 1000 + (tz * 8 + ty) * 8 + tx;
      expect(hits[g] == 1 && code[g] == want,
             std::string(schedule_name(sc)) + ": thread " + std::to_string(g) + " ran " +
                 std::to_string(hits[g]) + "x, saw " + std::to_string(code[g]) + " want " +
                 std::to_string(want));
    }
  }
}

std::vector<int> neighbours(Schedule sc, bool barrier) {
  cuda_host::set_schedule(sc, 5);
  std::vector<int> out(2 * 64, -1);
  expect(run(neighbours_kernel, dim3(2), dim3(64), 64 * sizeof(int), out.data(), barrier) ==
             cudaSuccess, "launch");
  return out;
}

void test_barrier_orders_writes_before_reads() {
  std::vector<int> want(2 * 64);
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 64; ++t) {
      auto v = [&](int i) { return 7 * i + 1000 * b; };
      auto r1 = [&](int i) { return v((i + 1) % 64) + v((i + 63) % 64); };
      want[b * 64 + t] = r1((t + 1) % 64);
    }
  for (Schedule sc : kSchedules)
    expect(neighbours(sc, true) == want, std::string(schedule_name(sc)) + ": wrong values");
}

void test_race_without_barrier_is_detected() {
  // The same kernel without its barriers: the schedules must disagree (that is how the kernel
  // checks find a missing __syncthreads) and at least one must be wrong.
  const std::vector<int> f = neighbours(Schedule::kForward, false),
                         r = neighbours(Schedule::kReverse, false),
                         good = neighbours(Schedule::kForward, true);
  expect(f != r, "forward and reverse schedules agree on a racy kernel");
  expect(f != good || r != good, "the racy kernel gave the right answer under every schedule");
  // one schedule (and seed) always gives the same run, even of a racy kernel
  expect(neighbours(Schedule::kShuffle, false) == neighbours(Schedule::kShuffle, false),
         "two runs under one shuffled schedule differ");
}

template <typename T>
void shuffles_of() {
  const dim3 block(16, 4);  // 64 threads, 2 warps: lanes follow the linear thread id
  for (Schedule sc : kSchedules) {
    cuda_host::set_schedule(sc, 3);
    std::vector<T> out(5 * 64, T(-1));
    expect(run(shuffle_kernel<T>, dim3(1), block, 0, out.data()) == cudaSuccess, "launch");
    for (int tid = 0; tid < 64; ++tid) {
      const int lane = tid % 32, w = tid / 32 + 1;
      const T* o = out.data() + 5 * tid;
      auto val = [&](int l) { return T((l + 1) * w); };
      const std::string where = std::string(schedule_name(sc)) + " thread " + std::to_string(tid);
      if (lane == 0) expect(o[0] == T(528 * w), where + ": warp sum");
      expect(o[1] == T((lane + 1) * (lane + 2) / 2 * w), where + ": inclusive scan");
      expect(o[2] == T(32 * w), where + ": butterfly max");
      expect(o[3] == val((lane & ~7) + 5), where + ": broadcast within 8 lanes");
      expect(o[4] == (lane + 3 < 32 ? val(lane + 3) : val(lane)), where + ": shift down by 3");
    }
  }
}

void test_shuffles() {
  shuffles_of<int>();
  shuffles_of<float>();
  shuffles_of<double>();
}

void test_shared_memory_poisoned_between_blocks() {
  for (Schedule sc : kSchedules) {
    cuda_host::set_schedule(sc, 9);
    std::vector<unsigned> seen(3 * 32, 0);
    expect(run(poison_kernel, dim3(3), dim3(32), 32 * sizeof(unsigned), seen.data()) ==
               cudaSuccess, "launch");
    for (unsigned v : seen)
      expect(v == 0xffffffffu, std::string(schedule_name(sc)) + ": a block saw " +
                                   std::to_string(v) + ", not the 0xff fill");
  }
}

void test_static_shared_per_block() {
  for (Schedule sc : kSchedules) {
    cuda_host::set_schedule(sc, 2);
    std::vector<int> out(4, -1);
    expect(run(static_shared_kernel, dim3(4), dim3(64), 0, out.data()) == cudaSuccess, "launch");
    for (int b = 0; b < 4; ++b)
      expect(out[b] == 2016 + 6400 * b, std::string(schedule_name(sc)) + ": block " +
                                            std::to_string(b) + " summed " +
                                            std::to_string(out[b]));
  }
}

bool failed_with(cudaError_t want, const char* text) {
  const cudaError_t e = cudaGetLastError();
  return e == want && std::strstr(cuda_host::last_error_message(), text) != nullptr &&
         cudaGetLastError() == cudaSuccess;  // and the error is reset once read
}

void test_deadlocks_are_reported() {
  std::vector<int> out(64, 0);
  cuda_host::launch(early_return_kernel, dim3(1), dim3(64), 0, nullptr, out.data());
  expect(failed_with(cudaErrorLaunchFailure, "deadlock"), "a thread that returned before "
         "__syncthreads: " + std::string(cuda_host::last_error_message()));
  cuda_host::launch(mixed_barriers_kernel, dim3(1), dim3(64), 0, nullptr, out.data());
  expect(failed_with(cudaErrorLaunchFailure, "deadlock"), "a warp shuffling while the others "
         "wait in __syncthreads: " + std::string(cuda_host::last_error_message()));
  cuda_host::launch(partial_mask_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
  expect(failed_with(cudaErrorLaunchFailure, "mask"), "partial shuffle mask");
  // and a good launch still works afterwards
  expect(run(static_shared_kernel, dim3(1), dim3(64), 0, out.data()) == cudaSuccess &&
             out[0] == 2016, "launch after failures");
}

void test_bad_launch_configurations() {
  std::vector<int> out(64, 0);
  struct Bad { dim3 grid, block; size_t shmem; cudaError_t want; };
  const Bad bad[] = {{dim3(1), dim3(1025), 0, cudaErrorInvalidConfiguration},
                     {dim3(1), dim3(32, 32, 2), 0, cudaErrorInvalidConfiguration},
                     {dim3(1, 65536), dim3(32), 0, cudaErrorInvalidConfiguration},
                     {dim3(1, 1, 65536), dim3(32), 0, cudaErrorInvalidConfiguration},
                     {dim3(0), dim3(32), 0, cudaErrorInvalidConfiguration},
                     {dim3(1), dim3(32), 48 * 1024 + 1, cudaErrorInvalidValue}};
  for (const Bad& b : bad) {
    cuda_host::launch(static_shared_kernel, b.grid, b.block, b.shmem, nullptr, out.data());
    expect(failed_with(b.want, "invalid launch"),
           "grid (" + std::to_string(b.grid.x) + "," + std::to_string(b.grid.y) + "," +
               std::to_string(b.grid.z) + ") block (" + std::to_string(b.block.x) + "," +
               std::to_string(b.block.y) + "," + std::to_string(b.block.z) + ") shmem " +
               std::to_string(b.shmem) + " was not rejected");
  }
  expect(run(static_shared_kernel, dim3(1), dim3(64), 48 * 1024, out.data()) == cudaSuccess,
         "48 KiB of dynamic shared memory");
}

// Exhaustive over the 16-bit formats: every value survives 16 -> 32 -> 16 bits, and the midpoint
// between two neighbours rounds to the even one (one float ulp off it: to the nearer one).
template <typename H>
void conversions_of(float (*to_f)(H), H (*from_f)(float), uint32_t exp_mask, const char* name) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const H h{uint16_t(b)};
    const float f = to_f(h);
    const bool nan = (b & exp_mask) == exp_mask && (b & ~exp_mask & 0x7fffu);
    const uint16_t back = from_f(f).bits;
    if (nan) {
      expect(std::isnan(f) && (back & exp_mask) == exp_mask && (back & ~exp_mask & 0x7fffu),
             std::string(name) + ": NaN " + std::to_string(b));
      continue;
    }
    expect(back == b, std::string(name) + ": " + std::to_string(b) + " does not round-trip");
    const uint16_t next = uint16_t(b + 1);
    if ((b & 0x7fffu) >= (exp_mask & 0x7fffu) || (next & 0x7fffu) == 0) continue;  // inf / wrap
    const float g = to_f(H{next});
    if (std::isinf(g)) continue;
    const float mid = f + (g - f) / 2;  // exact: the two differ in one bit of a 16-bit format
    const uint16_t even = (b & 1u) ? next : uint16_t(b);
    expect(from_f(mid).bits == even, std::string(name) + ": midpoint after " + std::to_string(b));
    expect(from_f(std::nextafter(mid, f)).bits == b && from_f(std::nextafter(mid, g)).bits == next,
           std::string(name) + ": near the midpoint after " + std::to_string(b));
  }
}

void test_half_conversions() {
  conversions_of<__half>(__half2float, __float2half_rn, 0x7c00u, "fp16");
  conversions_of<__nv_bfloat16>(__bfloat162float, __float2bfloat16_rn, 0x7f80u, "bf16");
  expect(__float2half_rn(65519.99f).bits == 0x7bffu && __float2half_rn(65520.0f).bits == 0x7c00u,
         "fp16 overflow threshold");
  expect(__float2half_rn(std::ldexp(1.0f, -25)).bits == 0 &&
             __float2half_rn(std::nextafter(std::ldexp(1.0f, -25), 1.0f)).bits == 1,
         "fp16 underflow threshold");
  expect(__float2bfloat16_rn(3.4e38f).bits == 0x7f80u, "bf16 overflow");
}

struct SelfTest {
  const char* name;
  void (*fn)();
};
const SelfTest kTests[] = {
    {"indices", test_indices},
    {"barrier_orders_writes_before_reads", test_barrier_orders_writes_before_reads},
    {"race_without_barrier_is_detected", test_race_without_barrier_is_detected},
    {"shuffles", test_shuffles},
    {"shared_memory_poisoned_between_blocks", test_shared_memory_poisoned_between_blocks},
    {"static_shared_per_block", test_static_shared_per_block},
    {"deadlocks_are_reported", test_deadlocks_are_reported},
    {"bad_launch_configurations", test_bad_launch_configurations},
    {"half_conversions", test_half_conversions},
};

int usage() {
  std::fprintf(stderr,
               "usage: cuda_host_check emulation NAME|list [--ucontext]\n"
               "       cuda_host_check crash-smem-overflow\n"
               "       cuda_host_check kernels f32|f64|f16|bf16 [--all-schedules]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // nothing lost when a sanitizer stops the program
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "emulation" && argc >= 3) {
    const std::string name = argv[2];
    if (argc > 3) {
      if (std::strcmp(argv[3], "--ucontext") != 0) return usage();
      if (!cuda_host::set_ucontext(true)) {
        std::printf("ucontext switching unavailable\n");
        return 1;
      }
    }
    for (const SelfTest& t : kTests) {
      if (name == "list") {
        std::printf("%s\n", t.name);
      } else if (name == t.name) {
        t.fn();
        std::printf("%s: %s\n", t.name, g_failures ? "FAILED" : "passed");
        return g_failures ? 1 : 0;
      }
    }
    if (name == "list") return 0;
    std::fprintf(stderr, "no self-test named %s\n", name.c_str());
    return 2;
  }
  if (cmd == "crash-smem-overflow") {
    std::vector<float> out(32);
    run(smem_overflow_kernel, dim3(1), dim3(32), 32 * sizeof(float), out.data());
    std::printf("the overflow went unnoticed\n");
    return 0;
  }
  if (cmd == "kernels" && argc >= 3) {
    const bool all = argc > 3 && std::strcmp(argv[3], "--all-schedules") == 0;
    if (argc > 3 && !all) return usage();
    return run_kernel_checks(argv[2], all);
  }
  return usage();
}
