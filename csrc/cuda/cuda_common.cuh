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
#include <cstdint>

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

inline int multiprocessor_count(const at::Device& device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()));
  return count;
}

}  // namespace tokenflow_ext
