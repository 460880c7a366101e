// tfx_cuda_emu.h: run CUDA kernel bodies as plain C++ on the CPU (for CI without a GPU).
// Model: one OS thread per CUDA thread of a block; the blocks of a grid run one after another (so a
// function-local `static` is exactly one block's __shared__ memory). __syncthreads is a block barrier,
// __shfl*_sync a 32-lane warp exchange with its own barrier; both check that every live thread reached the
// same call site (divergent barriers are reported), that exited threads are not named in a full mask, and
// time out instead of hanging. Lanes of a warp are NOT in lockstep, so warp-synchronous code that relies
// on implicit convergence shows up as a data race (use -fsanitize=thread to see it).
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <math.h>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __CUDA_EMU__ 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

typedef struct CUstream_st* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

using std::max;
using std::min;

namespace emu {

inline int sm_count() {
  const char* s = std::getenv("TFX_EMU_SM_COUNT");
  return s ? std::atoi(s) : 132;  // H100 SXM
}
inline double timeout_s() {
  const char* s = std::getenv("TFX_EMU_TIMEOUT_S");
  return s ? std::atof(s) : 20.0;
}

// Errors found while a kernel ran; C10_CUDA_KERNEL_LAUNCH_CHECK() throws them (like a sticky CUDA error).
inline std::mutex error_mutex;
inline std::string pending_error;
inline void report(const std::string& msg) {
  std::lock_guard<std::mutex> lock(error_mutex);
  std::fprintf(stderr, "[cuda-emu] %s\n", msg.c_str());
  if (pending_error.empty()) pending_error = msg;
}
inline std::string take_error() {
  std::lock_guard<std::mutex> lock(error_mutex);
  std::string e;
  std::swap(e, pending_error);
  return e;
}

// A barrier over the live threads of a group (block or warp) that records where each thread arrived.
class Barrier {
 public:
  void reset(int participants, const char* what) {
    expected_ = participants;
    arrived_ = 0;
    what_ = what;
  }
  void wait(int line) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (arrived_ == 0) {
      line_ = line;
    } else if (line_ != line) {
      report(std::string("divergent ") + what_ + ": threads of one group wait at lines " + std::to_string(line_) +
             " and " + std::to_string(line));
    }
    if (++arrived_ == expected_) {
      release_();
      return;
    }
    const unsigned long generation = generation_;
    if (!cv_.wait_for(lock, std::chrono::duration<double>(timeout_s()), [&] { return generation_ != generation; })) {
      report(std::string("deadlock: ") + what_ + " at line " + std::to_string(line) + " waited " +
             std::to_string(timeout_s()) + " s (" + std::to_string(arrived_) + " of " + std::to_string(expected_) +
             " threads arrived)");
      std::fflush(stderr);
      std::abort();
    }
  }
  // A thread of the group has returned from the kernel.
  void drop() {
    std::unique_lock<std::mutex> lock(mutex_);
    --expected_;
    if (arrived_ > 0) {
      report(std::string("a thread exited while others wait at ") + what_ + " (line " + std::to_string(line_) +
             "): __syncthreads/__shfl_sync reached by only part of the group");
      if (arrived_ == expected_) release_();
    }
  }

 private:
  void release_() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  int expected_ = 0;
  int arrived_ = 0;
  int line_ = -1;
  unsigned long generation_ = 0;
  const char* what_ = "";
};

struct Warp {
  Barrier barrier;
  alignas(8) unsigned char slot[32][16];
  std::atomic<unsigned int> live_mask{0};
};

struct BlockState {
  Barrier barrier;
  std::vector<Warp> warps;
  int threads = 0;
};
inline BlockState* block_state = nullptr;  // the block that runs now (blocks run one at a time)
inline thread_local int linear_tid = 0;

inline void syncthreads(int line) { block_state->barrier.wait(line); }

template <typename T>
T shfl(unsigned int mask, T value, int src_lane, int width, int line) {
  static_assert(sizeof(T) <= 16, "shuffle of a type wider than 16 bytes");
  Warp& warp = block_state->warps[linear_tid / 32];
  const int lane = linear_tid % 32;
  const unsigned int live = warp.live_mask.load();
  if ((mask & live) != live || (mask & ~live) != 0) {
    report("__shfl_sync at line " + std::to_string(line) + ": mask " + std::to_string(mask) +
           " differs from the live lanes " + std::to_string(live) + " (unsupported or undefined)");
  }
  std::memcpy(warp.slot[lane], &value, sizeof(T));
  warp.barrier.wait(line);
  const int segment = lane / width * width;
  const int src = segment + (src_lane % width);
  T result;
  std::memcpy(&result, warp.slot[src], sizeof(T));
  warp.barrier.wait(line);
  return result;
}

inline void syncwarp(unsigned int /*mask*/, int line) {
  block_state->warps[linear_tid / 32].barrier.wait(line);
}

// One launch at a time: gridDim, blockDim and block_state are process-wide.
inline std::mutex launch_mutex;
inline std::atomic<unsigned long long> launches{0};

// Launch: the argument conversion of a real launch, then every block in turn on blockDim OS threads.
template <typename... Params, typename... Args>
void launch(const char* kernel_name, dim3 grid, dim3 block, size_t /*shared_bytes*/, cudaStream_t /*stream*/,
            void (*kernel)(Params...), Args&&... args) {
  const std::lock_guard<std::mutex> one_launch(launch_mutex);
  launches.fetch_add(1);
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024 || block.z > 64 ||
      grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    report(std::string("invalid configuration for ") + kernel_name + ": grid (" + std::to_string(grid.x) + ", " +
           std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" + std::to_string(block.x) + ", " +
           std::to_string(block.y) + ", " + std::to_string(block.z) + ")");
    return;
  }
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  gridDim = grid;
  blockDim = block;
  const int n = static_cast<int>(threads);
  BlockState state;
  state.threads = n;
  state.warps = std::vector<Warp>((n + 31) / 32);
  block_state = &state;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  auto reset_block = [&]() noexcept {
    state.barrier.reset(n, "__syncthreads");
    for (size_t w = 0; w < state.warps.size(); ++w) {
      const int lanes = std::min(32, n - static_cast<int>(w) * 32);
      state.warps[w].barrier.reset(lanes, "warp exchange (__shfl_sync/__syncwarp)");
      state.warps[w].live_mask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
  };
  reset_block();
  std::mutex between_mutex;
  std::condition_variable between_cv;
  int done = 0;
  unsigned long long round = 0;
  auto body = [&](int tid) {
    linear_tid = tid;
    threadIdx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
    for (unsigned long long b = 0; b < blocks; ++b) {
      blockIdx = dim3(static_cast<unsigned int>(b % grid.x), static_cast<unsigned int>((b / grid.x) % grid.y),
                      static_cast<unsigned int>(b / (1ull * grid.x * grid.y)));
      std::apply(kernel, params);
      // This thread has exited the block: leave its barriers.
      state.warps[tid / 32].live_mask.fetch_and(~(1u << (tid % 32)));
      state.warps[tid / 32].barrier.drop();
      state.barrier.drop();
      // Wait for the whole block, then the last thread resets the state for the next block.
      std::unique_lock<std::mutex> lock(between_mutex);
      if (++done == n) {
        done = 0;
        reset_block();
        ++round;
        between_cv.notify_all();
      } else {
        const unsigned long long r = round;
        between_cv.wait(lock, [&] { return round != r; });
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(n);
  for (int t = 0; t < n; ++t) pool.emplace_back(body, t);
  for (auto& t : pool) t.join();
  block_state = nullptr;
}

}  // namespace emu

// Kernel launches so far: lets the tests check that an emulated op really ran emulated kernels.
extern "C" __attribute__((used, visibility("default"))) inline unsigned long long tfx_emu_launch_count() {
  return emu::launches.load();
}

#define __syncthreads() ::emu::syncthreads(__LINE__)
#define __syncwarp(...) ::emu::syncwarp(0xffffffffu, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask, ...) \
  ::emu::shfl((mask), (value), (::emu::linear_tid % 32) ^ (lane_mask), 32, __LINE__)
#define __shfl_sync(mask, value, src, ...) ::emu::shfl((mask), (value), (src), 32, __LINE__)
#define __shfl_down_sync(mask, value, delta, ...) \
  ::emu::shfl((mask), (value), std::min(31, (::emu::linear_tid % 32) + (int)(delta)), 32, __LINE__)

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T __ldg(const T* p) { return *p; }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emu::sm_count();
  return cudaSuccess;
}
