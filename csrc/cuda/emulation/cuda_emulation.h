// A CPU emulation of the few CUDA features the kernels of csrc/cuda use, so that tests can run
// them where there is no GPU (tests/test_cuda_sources.py). Not part of any build of the extension.
//
// How: the .cu files are compiled as C++ by the host compiler with -DMMKD_CPU_EMULATION and
// -include this header (and emulation/ ahead on the include path, for mma.h). A launch runs its
// blocks one after another; the threads of a block are cooperative fibers (ucontext) on the
// calling thread, switched only at __syncthreads and at warp shuffles, so the emulation is
// deterministic and has no data races. What it checks beyond the numbers (a broken rule is said
// on stderr and the launch returns cudaErrorLaunchFailure):
//   - every thread of a block reaches the same barriers (else: "deadlock");
//   - threads run in order in even blocks and in reverse in odd ones, so a barrier missing between
//     one thread's write to shared memory and another's read shows in one order or the other;
//   - blocks run first to last, or last to first (MMKD_EMULATION_BLOCK_ORDER=reverse), so results
//     that depend on the order of the blocks (one reads what another writes, or two write one place)
//     differ between the two orders. A block runs whole before the next starts, so a plain
//     read-modify-write that two blocks race on (a lost update) is never interleaved, and not seen;
//   - shared memory starts each block poisoned with NaN bytes, so a read of an unwritten buffer
//     shows up as NaN in the results;
//   - WMMA pointers are 32-byte aligned and leading dimensions legal (mma.h);
//   - dynamic shared memory stays within the launch's size: the buffer ends on an inaccessible
//     page, so an access past it crashes the process (SIGSEGV) instead of passing unnoticed.
// What it cannot check: timing, occupancy, register limits, and the tensor cores' own rounding
// (the WMMA emulation multiplies exactly and accumulates in float32, k in order).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __launch_bounds__(...)

// The built-in index variables, set by the scheduler for the fiber that runs.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace mmkd_emulation {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emulation: %s\n", what);
  std::abort();
}

struct Barrier {
  int participants = 0;
  int arrived = 0;
  unsigned long generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;  // kept across launches: allocating 256 of them is slow
  bool done = false;
};

constexpr size_t kStackBytes = 256 * 1024;

struct State {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  unsigned current = 0;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<float> exchange;  // one float per thread, for shuffles
  unsigned long events = 0;     // barriers completed and fibers finished: progress
  const std::function<void()>* body = nullptr;
  unsigned char* shared = nullptr;  // the block's dynamic shared memory, `shared_bytes` long
  size_t shared_bytes = 0;
  void* mapping = nullptr;
  size_t mapping_bytes = 0;
  const char* error = nullptr;  // the first rule a launch broke: it then returns an error
};

inline State& state() {
  static State s;
  return s;
}

inline unsigned char* shared_memory() { return state().shared; }

// A broken rule (misaligned WMMA pointer, partial-warp shuffle, divergent barriers): said on stderr
// with the block and thread, and the launch returns cudaErrorLaunchFailure.
inline void report(const char* what) {
  State& s = state();
  std::fprintf(stderr, "cuda_emulation: %s (block %u,%u thread %u)\n", what, blockIdx.x, blockIdx.y, threadIdx.x);
  if (s.error == nullptr) s.error = what;
}

inline void yield() {
  State& s = state();
  swapcontext(&s.fibers[s.current].context, &s.scheduler);
}

inline void wait(Barrier& barrier) {
  State& s = state();
  const unsigned long generation = barrier.generation;
  if (++barrier.arrived == barrier.participants) {
    barrier.arrived = 0;
    ++barrier.generation;
    ++s.events;
    return;
  }
  while (barrier.generation == generation) yield();
}

inline void fiber_entry() {
  State& s = state();
  (*s.body)();
  s.fibers[s.current].done = true;
  ++s.events;
  // Returning resumes uc_link: the scheduler.
}

// Shared memory ending exactly at an inaccessible page, so that a read or write past `bytes`
// faults instead of passing unnoticed.
inline void map_shared(size_t bytes) {
  State& s = state();
  if (s.mapping != nullptr) munmap(s.mapping, s.mapping_bytes);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t data = (bytes + page - 1) / page * page;
  s.mapping_bytes = data + page;
  s.mapping = mmap(nullptr, s.mapping_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (s.mapping == MAP_FAILED) fail("mmap failed");
  unsigned char* base = static_cast<unsigned char*>(s.mapping);
  mprotect(base + data, page, PROT_NONE);
  s.shared = base + data - bytes;  // 128-byte aligned when bytes is a multiple of 128
  if (reinterpret_cast<uintptr_t>(s.shared) % 128 != 0) report("dynamic shared memory size is not a multiple of 128");
  s.shared_bytes = bytes;
}

// A fresh context for the fiber, to run the launch's body on its own stack. (Out of line: the
// launch loop then holds no state across getcontext, which returns twice in principle.)
__attribute__((noinline)) inline void start(Fiber& fiber) {
  State& s = state();
  fiber.done = false;
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = fiber.stack.get();
  fiber.context.uc_stack.ss_size = kStackBytes;
  fiber.context.uc_link = &s.scheduler;
  makecontext(&fiber.context, fiber_entry, 0);
}

// Runs kernel(args...) on a grid of blocks of `threads` fibers with `bytes` of shared memory.
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, size_t bytes, Args... args) {
  State& s = state();
  const std::function<void()> body = [&] { kernel(args...); };
  s.body = &body;
  s.error = nullptr;
  map_shared(bytes);
  if (s.fibers.size() != static_cast<size_t>(threads)) {
    s.fibers = std::vector<Fiber>(threads);
    for (Fiber& fiber : s.fibers) fiber.stack.reset(new char[kStackBytes]);
  }
  s.warps.assign((threads + 31) / 32, Barrier{});
  for (Barrier& warp : s.warps) warp.participants = 32;
  s.exchange.assign(threads, 0.0f);
  blockDim = dim3(threads, 1, 1);
  gridDim = grid;
  // The blocks run one after another, first to last, or last to first where the environment says
  // MMKD_EMULATION_BLOCK_ORDER=reverse: a kernel whose blocks depend on one another's order (one
  // reads what another writes, or two write one place) then gives other numbers in one order than
  // in the other.
  if (grid.z != 1) {
    report("only grids of one layer (gridDim.z = 1) are emulated");
    s.body = nullptr;
    return cudaErrorLaunchFailure;
  }
  const char* order = std::getenv("MMKD_EMULATION_BLOCK_ORDER");
  const bool reversed_blocks = order != nullptr && std::strcmp(order, "reverse") == 0;
  if (order != nullptr && !reversed_blocks && std::strcmp(order, "forward") != 0) {
    report("MMKD_EMULATION_BLOCK_ORDER must be forward or reverse");
    s.body = nullptr;
    return cudaErrorLaunchFailure;
  }
  const unsigned blocks = grid.x * grid.y;
  for (unsigned launched = 0; launched < blocks; ++launched) {
    const unsigned linear = reversed_blocks ? blocks - 1 - launched : launched;
    const unsigned bx = linear % grid.x, by = linear / grid.x;
    blockIdx = make_uint3(bx, by, 0);
    // Odd blocks run their threads in reverse order: a missing barrier between a write and a
    // read by another thread then shows in one order or the other.
    const bool threads_reversed = linear % 2 == 1;
    std::memset(s.shared, 0xff, bytes);  // NaN in float, half and bfloat16
    s.block = Barrier{};
    s.block.participants = threads;
    for (Barrier& warp : s.warps) warp.arrived = 0;
    for (Fiber& fiber : s.fibers) start(fiber);
    for (;;) {
      bool running = false;
      const unsigned long before = s.events;
      for (unsigned step = 0; step < static_cast<unsigned>(threads); ++step) {
        const unsigned t = threads_reversed ? threads - 1 - step : step;
        if (s.fibers[t].done) continue;
        running = true;
        s.current = t;
        threadIdx = make_uint3(t, 0, 0);
        swapcontext(&s.scheduler, &s.fibers[t].context);
      }
      if (!running) break;
      if (s.events == before) {  // the block's fibers are left suspended; the next launch restarts them
        report("deadlock: the threads of a block wait at different barriers");
        s.body = nullptr;
        return cudaErrorLaunchFailure;
      }
    }
  }
  s.body = nullptr;
  return s.error == nullptr ? cudaSuccess : cudaErrorLaunchFailure;
}

}  // namespace mmkd_emulation

inline void __syncthreads() { mmkd_emulation::wait(mmkd_emulation::state().block); }

// Fibers switch only at barriers and shuffles, so a plain read-modify-write is atomic here; blocks
// run one after another, so the order of the adds is fixed by the block order (on a GPU it is not).
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask, int width = 32) {
  using namespace mmkd_emulation;
  if (mask != 0xffffffffu || width != 32) report("__shfl_xor_sync: only full-warp shuffles are emulated");
  State& s = state();
  const unsigned t = threadIdx.x;
  const unsigned warp = t / 32;
  s.exchange[t] = value;
  wait(s.warps[warp]);
  const float other = s.exchange[warp * 32 + ((t % 32) ^ static_cast<unsigned>(lane_mask))];
  wait(s.warps[warp]);
  return other;
}
