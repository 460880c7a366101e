// Small CUDA helpers. Only ATen/ATen.h and the light c10/cuda headers: ATen/cuda/CUDAContext.h needs the
// cuBLAS/cuSPARSE headers, which an nvcc-only toolkit lacks (CI compiles every .cu against the CPU wheel).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>

namespace tokenflow_ext {

constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Blocks for a grid-stride loop over `work` items, capped so huge inputs reuse blocks.
inline unsigned int grid_stride_blocks(int64_t work, int threads_per_block) {
  const int64_t blocks = (work + threads_per_block - 1) / threads_per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535LL * 8)));
}

// The SM count of a device, asked once per device index and process.
inline int multiprocessor_count(const at::Device& device) {
  static std::array<std::atomic<int>, 64> cache{};  // 0: not asked yet
  const int index = std::max<int>(0, device.index());
  if (index >= static_cast<int>(cache.size())) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, index));
    return count;
  }
  int count = cache[index].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, index));
    cache[index].store(count, std::memory_order_relaxed);
  }
  return count;
}

// A size the kernels take as `int` (a row width), checked instead of silently narrowed.
inline int checked_int(const char* op, const char* what, int64_t value) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<int>::max(), op, ": ", what, " = ", value,
              " is larger than the CUDA kernels' 32-bit limit");
  return static_cast<int>(value);
}

// Grid-stride loops index with 32-bit integers whenever `count` plus one grid stride fits in int32: the
// per-element `e / M` of the flow and scatter kernels is then a 32-bit division (64-bit division is a long
// emulated sequence on the GPU). `f` receives a value of the chosen index type.
template <typename F>
void with_index_type(int64_t count, int threads_per_block, const F& f) {
  const int64_t largest_stride = 65535LL * 8 * threads_per_block;  // grid_stride_blocks' cap
  if (count <= std::numeric_limits<int32_t>::max() - largest_stride) {
    f(int32_t{0});
  } else {
    f(int64_t{0});
  }
}

}  // namespace tokenflow_ext
