// CUDA codebook_search: one fused SIMT kernel computes 128 x 128 tiles of x.c products in registers and
// folds them straight into a running argmin; the N x K matrix never exists. Exact fp32 FMA arithmetic
// (fp64 for fp64 inputs). K is split across blocks when there are too few row tiles to fill the GPU;
// a small merge kernel then picks the lowest k among equal minima (with one split the tile kernel writes
// the indices itself).
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>

#include "codebook_search.h"
#include "common/codebook_rows.h"
#include "cuda/cuda_common.cuh"

namespace tokenflow_ext {
namespace {

constexpr int kThreads = 256;       // 16 x 16 threads
constexpr int kThreadGrid = 16;
constexpr int kPerThread = 8;       // each thread owns 8 rows x 8 codes of the tile
constexpr int kTileRows = kThreadGrid * kPerThread;   // 128
constexpr int kTileCodes = kThreadGrid * kPerThread;  // 128
constexpr int kDepthChunk = 8;      // channels staged in shared memory per step
// Staging rows are padded so that the transposed stores of one warp (8 depths x 4 rows) hit 32 banks.
constexpr int kStagePad = 4;
constexpr int32_t kNoIndex = -1;
// Blocks per SM the launch plan assumes: __launch_bounds__ holds fp32 to 128 registers (64 accumulators,
// 8 best scores, 8 int32 best indices, 16 staged operands); fp64 needs twice the registers, one block.
template <typename acc_t>
constexpr int kSearchBlocksPerSM = sizeof(acc_t) == 4 ? 2 : 1;

// out(r) = [v_s, pixel_scale * v_p], bias(r) = ||v_s||^2 + pixel_weight ||v_p||^2 (v normalised if l2_norm).
// One thread per row: O((N + K) * D) work next to the O(N * K * D) search.
template <typename scalar_t, typename acc_t>
__global__ void prepare_rows_kernel(const scalar_t* __restrict__ semantic, int64_t semantic_stride,
                                    const scalar_t* __restrict__ pixel, int64_t pixel_stride, int64_t rows, int Ds,
                                    int Dp, bool l2_norm, acc_t pixel_scale, acc_t pixel_weight, acc_t* __restrict__ out,
                                    acc_t* __restrict__ bias) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t row_bias = prepare_code_row<scalar_t, acc_t>(semantic + r * semantic_stride,
                                                             pixel == nullptr ? nullptr : pixel + r * pixel_stride, Ds,
                                                             Dp, l2_norm, pixel_scale, pixel_weight,
                                                             out + r * (Ds + Dp));
    if (bias != nullptr) bias[r] = row_bias;
  }
}

// Candidate merge that also handles "no candidate yet" (index kNoIndex).
template <typename acc_t, typename index_t>
__device__ __forceinline__ bool takes_over(acc_t score, index_t index, acc_t best, index_t best_index) {
  if (index == kNoIndex) return false;
  if (best_index == kNoIndex) return true;
  return better_candidate(score, index, best, best_index);
}

template <typename acc_t>
struct SearchTileParams {
  const acc_t* x_unit;          // (N, D)
  const acc_t* codes_weighted;  // (K, D): [c_s, w c_p]
  const acc_t* code_bias;       // (K): ||c_s||^2 + w ||c_p||^2
  int64_t N, K;
  int D;
  int64_t tiles_per_split;      // code tiles per blockIdx.y
  acc_t* split_score;           // (splits, N), or null with one split (no merge follows)
  int64_t* split_index;         // (splits, N); with one split, the output indices
};

// grid (ceil(N / 128), splits), 256 threads. Thread (ty, tx) owns rows row0 + ty + 16 i and codes
// k0 + tx + 16 j (i, j < 8): conflict-free shared-memory reads, and each thread visits its codes in
// increasing k, so a strict "better" keeps the lowest index; the 16 threads of a row merge lexicographically.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads, kSearchBlocksPerSM<acc_t>) search_tiles_kernel(SearchTileParams<acc_t> p) {
  __shared__ acc_t x_stage[kDepthChunk][kTileRows + kStagePad];
  __shared__ acc_t code_stage[kDepthChunk][kTileCodes + kStagePad];
  const int tx = threadIdx.x % kThreadGrid;
  const int ty = threadIdx.x / kThreadGrid;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  // Tile-local sizes and pointers in 32-bit terms (K < 2^31): fewer live 64-bit values, no register spills.
  const int rows_here = static_cast<int>(min(static_cast<int64_t>(kTileRows), p.N - row0));
  const acc_t* x_tile = p.x_unit + row0 * p.D;
  const int K = static_cast<int>(p.K);
  const int code_tiles = (K + kTileCodes - 1) / kTileCodes;
  const int tile_begin = static_cast<int>(blockIdx.y * p.tiles_per_split);
  const int tile_end = min(code_tiles, tile_begin + static_cast<int>(p.tiles_per_split));

  acc_t best[kPerThread];
  int32_t best_index[kPerThread];  // K < 2^31 (checked on the host): half the registers of int64
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    best[i] = std::numeric_limits<acc_t>::infinity();
    best_index[i] = kNoIndex;
  }

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int k0 = tile * kTileCodes;
    const int codes_here = min(kTileCodes, K - k0);
    const acc_t* code_tile = p.codes_weighted + static_cast<int64_t>(k0) * p.D;
    acc_t acc[kPerThread][kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) acc[i][j] = 0;

    for (int d0 = 0; d0 < p.D; d0 += kDepthChunk) {
      // Stage a 128 x 8 slice of x rows and of codes (zero-padded past N, K and D), transposed.
#pragma unroll
      for (int e = 0; e < (kTileRows * kDepthChunk) / kThreads; ++e) {
        const int linear = threadIdx.x + e * kThreads;
        const int r = linear / kDepthChunk;
        const int d = linear % kDepthChunk;
        const bool depth_ok = d0 + d < p.D;
        x_stage[d][r] = (r < rows_here && depth_ok) ? x_tile[r * p.D + d0 + d] : acc_t(0);
        code_stage[d][r] = (r < codes_here && depth_ok) ? code_tile[r * p.D + d0 + d] : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int d = 0; d < kDepthChunk; ++d) {
        acc_t b[kPerThread];
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) b[j] = code_stage[d][tx + kThreadGrid * j];
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
          const acc_t a = x_stage[d][ty + kThreadGrid * i];  // one x value live at a time: fewer registers
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) acc[i][j] = fma(a, b[j], acc[i][j]);
        }
      }
      __syncthreads();
    }

    // score = ||c||^2 - 2 x.c: d(n, k) minus the per-row constant ||x||^2.
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int32_t k = k0 + tx + kThreadGrid * j;
      if (k >= K) break;
      const acc_t bias = p.code_bias[k];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const acc_t score = bias - acc[i][j] - acc[i][j];
        if (best_index[i] == kNoIndex || better_than(score, best[i])) {
          best[i] = score;
          best_index[i] = k;
        }
      }
    }
  }

  // Merge the 16 threads that share each row (lanes differ in the low 4 bits of threadIdx.x).
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    acc_t score = best[i];
    int32_t index = best_index[i];
#pragma unroll
    for (int offset = kThreadGrid / 2; offset > 0; offset /= 2) {
      const acc_t other_score = __shfl_xor_sync(0xffffffffu, score, offset);
      const int32_t other_index = __shfl_xor_sync(0xffffffffu, index, offset);
      if (takes_over(other_score, other_index, score, index)) {
        score = other_score;
        index = other_index;
      }
    }
    const int64_t row = row0 + ty + kThreadGrid * i;
    if (tx == 0 && row < p.N) {
      if (p.split_score != nullptr) p.split_score[blockIdx.y * p.N + row] = score;
      p.split_index[blockIdx.y * p.N + row] = index;
    }
  }
}

// indices(n) = the best candidate over the K splits of row n.
template <typename acc_t>
__global__ void merge_splits_kernel(const acc_t* __restrict__ split_score, const int64_t* __restrict__ split_index,
                                    int64_t N, int splits, int64_t* __restrict__ indices) {
  for (int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t best = split_score[n];
    int64_t best_index = split_index[n];
    for (int s = 1; s < splits; ++s) {
      const acc_t score = split_score[s * N + n];
      const int64_t index = split_index[s * N + n];
      if (takes_over(score, index, best, best_index)) {
        best = score;
        best_index = index;
      }
    }
    indices[n] = best_index;
  }
}

// min_distance(n) = sum_s (x_s - c_s)^2 + w sum_p (x_p - c_p)^2 for the chosen code, from differences.
template <typename scalar_t, typename acc_t>
__global__ void exact_min_distance_kernel(const acc_t* __restrict__ x_unit, const scalar_t* __restrict__ semantic,
                                          const scalar_t* __restrict__ pixel, const int64_t* __restrict__ indices,
                                          int64_t N, int Ds, int Dp, bool l2_norm, acc_t pixel_weight,
                                          acc_t* __restrict__ out) {
  for (int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[n] = exact_code_distance<scalar_t, acc_t>(x_unit + n * (Ds + Dp), semantic, pixel, indices[n], Ds, Dp,
                                                  l2_norm, pixel_weight);
  }
}

// Splits of K across blockIdx.y, so that about one full wave of blocks (kSearchBlocksPerSM per SM) is in
// flight when there are few row tiles (small N: one image, decoding). Every split gets at least one tile.
int64_t plan_code_splits(const at::Device& device, int64_t row_tiles, int64_t code_tiles, at::ScalarType acc_type) {
  const int64_t per_sm = acc_type == at::kDouble ? kSearchBlocksPerSM<double> : kSearchBlocksPerSM<float>;
  const int64_t wanted_blocks = per_sm * multiprocessor_count(device);
  const int64_t splits = std::min<int64_t>({code_tiles, std::max<int64_t>(1, wanted_blocks / row_tiles), 65535});
  const int64_t tiles_per_split = (code_tiles + splits - 1) / splits;
  return (code_tiles + tiles_per_split - 1) / tiles_per_split;
}

std::tuple<at::Tensor, at::Tensor> codebook_search_cuda(const at::Tensor& x, const at::Tensor& semantic_codebook,
                                                        const std::optional<at::Tensor>& pixel_codebook,
                                                        double pixel_weight, bool l2_norm) {
  SearchCall call = begin_codebook_search(x, semantic_codebook, pixel_codebook, pixel_weight);
  if (call.N == 0) return {call.indices, call.min_distance};
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const CodebookPair& books = call.books;
  const int64_t N = call.N, K = books.K;
  TORCH_CHECK(K < std::numeric_limits<int32_t>::max(), kSearchOp, ": at most 2^31 - 2 codes on CUDA, got K = ", K);
  const int Ds = checked_int(kSearchOp, "semantic width Ds", books.Ds);
  const int Dp = checked_int(kSearchOp, "pixel width Dp", books.Dp);
  const int D = checked_int(kSearchOp, "row width Ds + Dp", books.D());
  const auto acc_options = call.rows.options().dtype(call.acc_type);
  at::Tensor x_unit = at::empty({N, D}, acc_options);
  at::Tensor codes_weighted = at::empty({K, D}, acc_options);
  at::Tensor code_bias = at::empty({K}, acc_options);

  const int64_t row_tiles = (N + kTileRows - 1) / kTileRows;
  const int64_t code_tiles = (K + kTileCodes - 1) / kTileCodes;
  TORCH_CHECK(row_tiles <= std::numeric_limits<int32_t>::max(), kSearchOp, ": too many rows (", N, ")");
  const int64_t used_splits = plan_code_splits(x.device(), row_tiles, code_tiles, call.acc_type);
  const int64_t tiles_per_split = (code_tiles + used_splits - 1) / used_splits;
  // One split: the tile kernel writes the indices directly, no merge buffers or launch.
  at::Tensor split_score = used_splits > 1 ? at::empty({used_splits, N}, acc_options) : at::Tensor();
  at::Tensor split_index = used_splits > 1 ? at::empty({used_splits, N}, call.indices.options()) : call.indices;

  TFX_DISPATCH_FLOATS(x.scalar_type(), "codebook_search_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w = static_cast<acc_t>(pixel_weight);
    const scalar_t* x_ptr = call.rows.const_data_ptr<scalar_t>();
    const scalar_t* sem_ptr = books.semantic.const_data_ptr<scalar_t>();
    const scalar_t* pix_ptr = books.has_pixel() ? books.pixel.const_data_ptr<scalar_t>() : nullptr;
    prepare_rows_kernel<scalar_t, acc_t><<<grid_stride_blocks(N, 256), 256, 0, stream>>>(
        x_ptr, D, Dp > 0 ? x_ptr + Ds : nullptr, D, N, Ds, Dp, l2_norm, acc_t(1), acc_t(0),
        x_unit.data_ptr<acc_t>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    prepare_rows_kernel<scalar_t, acc_t><<<grid_stride_blocks(K, 256), 256, 0, stream>>>(
        sem_ptr, Ds, pix_ptr, Dp, K, Ds, Dp, l2_norm, w, w, codes_weighted.data_ptr<acc_t>(),
        code_bias.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    SearchTileParams<acc_t> params{x_unit.const_data_ptr<acc_t>(), codes_weighted.const_data_ptr<acc_t>(),
                                   code_bias.const_data_ptr<acc_t>(), N, K, D, tiles_per_split,
                                   used_splits > 1 ? split_score.data_ptr<acc_t>() : nullptr,
                                   split_index.data_ptr<int64_t>()};
    const dim3 grid(static_cast<unsigned int>(row_tiles), static_cast<unsigned int>(used_splits));
    search_tiles_kernel<acc_t><<<grid, kThreads, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    int64_t* idx_ptr = call.indices.data_ptr<int64_t>();
    if (used_splits > 1) {
      merge_splits_kernel<acc_t><<<grid_stride_blocks(N, 256), 256, 0, stream>>>(
          split_score.const_data_ptr<acc_t>(), split_index.const_data_ptr<int64_t>(), N,
          static_cast<int>(used_splits), idx_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    exact_min_distance_kernel<scalar_t, acc_t><<<grid_stride_blocks(N, 256), 256, 0, stream>>>(
        x_unit.const_data_ptr<acc_t>(), sem_ptr, pix_ptr, idx_ptr, N, Ds, Dp, l2_norm, w,
        call.min_distance.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {call.indices, call.min_distance};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, CUDA, m) { m.impl("codebook_search", &codebook_search_cuda); }

}  // namespace tokenflow_ext
