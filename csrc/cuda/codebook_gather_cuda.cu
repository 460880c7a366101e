// CUDA codebook_gather: one warp per gathered row (normalised on the fly), and a backward that
// accumulates each code's gradient either with atomics or, deterministically, in a fixed order after a
// stable sort of the indices: each code's rows are cut into pieces of at most kRowsPerPiece rows, one warp sums
// a piece, then one warp per code sums its pieces in order (a collapsed codebook, all rows on one code, thus
// spreads over many warps and stays bitwise reproducible); a last kernel applies the gradient of the
// l2-normalisation per code row.
//
// Out-of-range indices fire a device-side assert, as torch's own indexing does: it ends the CUDA context
// (every later CUDA call of the process fails), so check indices first when they come from untrusted input.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "codebook_gather.h"
#include "common/row_math.h"
#include "cuda/cuda_common.cuh"

namespace tokenflow_ext {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * kWarpSize;
constexpr int64_t kRowsPerPiece = 256;
constexpr const char* kGatherOp = "tokenflow_ext.codebook_gather";
constexpr const char* kGatherBackwardOp = "tokenflow_ext.codebook_gather_backward";

__device__ __forceinline__ int64_t global_warp() {
  return (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize;
}
__device__ __forceinline__ int64_t warp_count() { return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize; }

// out(n, column + j) = book(idx(n), j) / max(||book(idx(n))||, eps) (or the raw row without l2_norm).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void gather_part_warp(const scalar_t* row, int width, bool l2_norm, scalar_t* dst) {
  const int lane = threadIdx.x % kWarpSize;
  acc_t squared = 0;
  if (l2_norm) {
    for (int j = lane; j < width; j += kWarpSize) {
      const acc_t v = static_cast<acc_t>(row[j]);
      squared += v * v;
    }
    squared = warp_sum(squared);
  }
  const acc_t den = normalize_denominator<acc_t>(squared, l2_norm);
  for (int j = lane; j < width; j += kWarpSize) dst[j] = static_cast<scalar_t>(static_cast<acc_t>(row[j]) / den);
}

template <typename scalar_t, typename acc_t>
__global__ void gather_kernel(const int64_t* __restrict__ indices, const scalar_t* __restrict__ semantic,
                              const scalar_t* __restrict__ pixel, int64_t N, int64_t K, int Ds, int Dp, bool l2_norm,
                              scalar_t* __restrict__ out) {
  const int D = Ds + Dp;
  for (int64_t n = global_warp(); n < N; n += warp_count()) {
    const int64_t k = indices[n];
    CUDA_KERNEL_ASSERT(k >= 0 && k < K && "tokenflow_ext.codebook_gather: index out of range [0, K)");
    gather_part_warp<scalar_t, acc_t>(semantic + k * Ds, Ds, l2_norm, out + n * D);
    if (pixel != nullptr) gather_part_warp<scalar_t, acc_t>(pixel + k * Dp, Dp, l2_norm, out + n * D + Ds);
  }
}

// accum(idx(n), c) += grad(n, c), one thread per element.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void scatter_add_atomic_kernel(const scalar_t* __restrict__ grads, const int64_t* __restrict__ indices,
                                          index_t N, int64_t K, int D, acc_t* __restrict__ accum) {
  const index_t total = N * D;
  for (index_t e = static_cast<index_t>(blockIdx.x * blockDim.x + threadIdx.x); e < total;
       e += static_cast<index_t>(gridDim.x * blockDim.x)) {
    const index_t n = e / D;
    const int64_t k = indices[n];
    CUDA_KERNEL_ASSERT(k >= 0 && k < K && "tokenflow_ext.codebook_gather_backward: index out of range [0, K)");
    atomicAdd(accum + k * D + (e - n * D), static_cast<acc_t>(grads[e]));
  }
}

// The sorted indices must lie in [0, K): their two ends are the only candidates to fall outside.
__global__ void check_sorted_range_kernel(const int64_t* __restrict__ sorted, int64_t N, int64_t K) {
  CUDA_KERNEL_ASSERT(sorted[0] >= 0 && sorted[N - 1] < K &&
                     "tokenflow_ext.codebook_gather_backward: index out of range [0, K)");
}

// piece_counts(0) = 0, piece_counts(k + 1) = ceil(rows of code k / kRowsPerPiece); offsets(k) = first sorted
// position holding k. Their running sum gives each code's first piece.
__global__ void count_pieces_kernel(const int64_t* __restrict__ offsets, int64_t K, int64_t* __restrict__ piece_counts) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k <= K;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    piece_counts[k] = k == 0 ? 0 : (offsets[k] - offsets[k - 1] + kRowsPerPiece - 1) / kRowsPerPiece;
  }
}

// partial(piece, c) = sum over the piece's rows (at most kRowsPerPiece, increasing n) of grad(n, c); warp per
// piece. piece_starts (K + 1) is the running sum of piece_counts; pieces past the total are idle.
template <typename scalar_t, typename acc_t>
__global__ void piece_sum_kernel(const scalar_t* __restrict__ grads, const int64_t* __restrict__ order,
                                 const int64_t* __restrict__ offsets, const int64_t* __restrict__ piece_starts,
                                 int64_t K, int64_t max_pieces, int D, acc_t* __restrict__ partial) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t pieces = piece_starts[K];
  for (int64_t piece = global_warp(); piece < min(pieces, max_pieces); piece += warp_count()) {
    // The code of this piece: the last k with piece_starts[k] <= piece (codes without rows have no piece).
    int64_t low = 0, high = K;  // piece_starts[low] <= piece < piece_starts[high]
    while (high - low > 1) {
      const int64_t mid = (low + high) / 2;
      if (piece_starts[mid] <= piece) low = mid; else high = mid;
    }
    const int64_t begin = offsets[low] + (piece - piece_starts[low]) * kRowsPerPiece;
    const int64_t end = min(offsets[low + 1], begin + kRowsPerPiece);
    for (int c = lane; c < D; c += kWarpSize) {
      acc_t sum = 0;
      for (int64_t i = begin; i < end; ++i) sum += static_cast<acc_t>(grads[order[i] * D + c]);
      partial[piece * D + c] = sum;
    }
  }
}

// accum(k, c) = sum of code k's piece sums in piece order: a fixed summation order, hence bitwise reproducible.
template <typename acc_t>
__global__ void sum_pieces_kernel(const acc_t* __restrict__ partial, const int64_t* __restrict__ piece_starts,
                                  int64_t K, int D, acc_t* __restrict__ accum) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t k = global_warp(); k < K; k += warp_count()) {
    const int64_t begin = piece_starts[k];
    const int64_t end = piece_starts[k + 1];
    for (int c = lane; c < D; c += kWarpSize) {
      acc_t sum = 0;
      for (int64_t piece = begin; piece < end; ++piece) sum += partial[piece * D + c];
      accum[k * D + c] = sum;
    }
  }
}

// grad_book(k) = (g - v_hat (v_hat . g)) / ||v|| if ||v|| > eps else g / eps, g = accum(k, column : column + width).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void normalize_backward_warp(const acc_t* g, const scalar_t* row, int width, bool l2_norm,
                                                        scalar_t* dst) {
  const int lane = threadIdx.x % kWarpSize;
  if (!l2_norm) {
    for (int j = lane; j < width; j += kWarpSize) dst[j] = static_cast<scalar_t>(g[j]);
    return;
  }
  acc_t squared = 0;
  for (int j = lane; j < width; j += kWarpSize) {
    const acc_t v = static_cast<acc_t>(row[j]);
    squared += v * v;
  }
  squared = warp_sum(squared);
  const acc_t norm = sqrt(squared);
  const acc_t den = normalize_denominator<acc_t>(squared, true);
  acc_t projection = 0;
  if (norm > acc_t(kNormEps)) {
    for (int j = lane; j < width; j += kWarpSize) projection += static_cast<acc_t>(row[j]) / den * g[j];
    projection = warp_sum(projection);
  }
  for (int j = lane; j < width; j += kWarpSize) {
    const acc_t unit = static_cast<acc_t>(row[j]) / den;
    dst[j] = static_cast<scalar_t>((g[j] - unit * projection) / den);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void finalize_codebook_grads_kernel(const acc_t* __restrict__ accum, const scalar_t* __restrict__ semantic,
                                               const scalar_t* __restrict__ pixel, int64_t K, int Ds, int Dp,
                                               bool l2_norm, scalar_t* __restrict__ grad_semantic,
                                               scalar_t* __restrict__ grad_pixel) {
  const int D = Ds + Dp;
  for (int64_t k = global_warp(); k < K; k += warp_count()) {
    normalize_backward_warp<scalar_t, acc_t>(accum + k * D, semantic + k * Ds, Ds, l2_norm, grad_semantic + k * Ds);
    if (pixel != nullptr) {
      normalize_backward_warp<scalar_t, acc_t>(accum + k * D + Ds, pixel + k * Dp, Dp, l2_norm, grad_pixel + k * Dp);
    }
  }
}

at::Tensor codebook_gather_cuda(const at::Tensor& indices, const at::Tensor& semantic_codebook,
                                const std::optional<at::Tensor>& pixel_codebook, bool l2_norm,
                                bool /*deterministic: backward only*/) {
  GatherCall call = begin_codebook_gather(indices, semantic_codebook, pixel_codebook);
  if (call.N == 0) return call.rows;
  const c10::cuda::CUDAGuard guard(semantic_codebook.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(semantic_codebook.device().index()).stream();
  const CodebookPair& books = call.books;
  const int Ds = checked_int(kGatherOp, "semantic width Ds", books.Ds);
  const int Dp = checked_int(kGatherOp, "pixel width Dp", books.Dp);
  checked_int(kGatherOp, "row width Ds + Dp", books.D());
  TFX_DISPATCH_FLOATS(call.rows.scalar_type(), "codebook_gather_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_kernel<scalar_t, acc_t><<<grid_stride_blocks(call.N * kWarpSize, kThreads), kThreads, 0, stream>>>(
        call.indices.const_data_ptr<int64_t>(), books.semantic.const_data_ptr<scalar_t>(),
        books.has_pixel() ? books.pixel.const_data_ptr<scalar_t>() : nullptr, call.N, books.K, Ds, Dp, l2_norm,
        call.rows.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return call.rows;
}

std::tuple<at::Tensor, at::Tensor> codebook_gather_backward_cuda(const at::Tensor& grad_rows,
                                                                 const at::Tensor& indices,
                                                                 const at::Tensor& semantic_codebook,
                                                                 const std::optional<at::Tensor>& pixel_codebook,
                                                                 bool l2_norm, bool deterministic) {
  GatherBackwardCall call = begin_codebook_gather_backward(grad_rows, indices, semantic_codebook, pixel_codebook);
  const c10::cuda::CUDAGuard guard(semantic_codebook.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(semantic_codebook.device().index()).stream();
  const CodebookPair& books = call.books;
  const int64_t N = call.N, K = books.K;
  const int Ds = checked_int(kGatherBackwardOp, "semantic width Ds", books.Ds);
  const int Dp = checked_int(kGatherBackwardOp, "pixel width Dp", books.Dp);
  const int D = checked_int(kGatherBackwardOp, "row width Ds + Dp", books.D());
  const at::ScalarType acc_type = accumulate_type_for(call.grads.scalar_type());
  at::Tensor accum = at::zeros({K, D}, call.grads.options().dtype(acc_type));

  TFX_DISPATCH_FLOATS(call.grads.scalar_type(), "codebook_gather_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* grads = call.grads.const_data_ptr<scalar_t>();
    if (N > 0 && deterministic) {
      // Stable sort keeps rows of equal index in increasing n; searchsorted gives segment starts, and a
      // running sum the pieces of each code: no host sync (the piece buffer is sized by its upper bound).
      const auto [sorted, order] = at::sort(call.indices, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      check_sorted_range_kernel<<<1, 1, 0, stream>>>(sorted.const_data_ptr<int64_t>(), N, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor offsets = at::searchsorted(sorted, at::arange(K + 1, call.indices.options()));
      at::Tensor piece_counts = at::empty({K + 1}, call.indices.options());
      count_pieces_kernel<<<grid_stride_blocks(K + 1, 256), 256, 0, stream>>>(offsets.const_data_ptr<int64_t>(), K,
                                                                               piece_counts.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor piece_starts = at::cumsum(piece_counts, 0);
      const int64_t max_pieces = (N + kRowsPerPiece - 1) / kRowsPerPiece + std::min(N, K);
      at::Tensor partial = at::empty({max_pieces, D}, accum.options());
      piece_sum_kernel<scalar_t, acc_t><<<grid_stride_blocks(max_pieces * kWarpSize, kThreads), kThreads, 0,
                                          stream>>>(
          grads, order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
          piece_starts.const_data_ptr<int64_t>(), K, max_pieces, D, partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_pieces_kernel<acc_t><<<grid_stride_blocks(K * kWarpSize, kThreads), kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), piece_starts.const_data_ptr<int64_t>(), K, D, accum.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (N > 0) {
      with_index_type(N * D, 256, [&](auto index) {
        using index_t = decltype(index);
        scatter_add_atomic_kernel<scalar_t, acc_t, index_t><<<grid_stride_blocks(N * D, 256), 256, 0, stream>>>(
            grads, call.indices.const_data_ptr<int64_t>(), static_cast<index_t>(N), K, D, accum.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    finalize_codebook_grads_kernel<scalar_t, acc_t>
        <<<grid_stride_blocks(K * kWarpSize, kThreads), kThreads, 0, stream>>>(
            accum.const_data_ptr<acc_t>(), books.semantic.const_data_ptr<scalar_t>(),
            books.has_pixel() ? books.pixel.const_data_ptr<scalar_t>() : nullptr, K, Ds, Dp, l2_norm,
            call.grad_semantic.data_ptr<scalar_t>(),
            books.has_pixel() ? call.grad_pixel.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {call.grad_semantic, call.grad_pixel};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, CUDA, m) {
  m.impl("codebook_gather", &codebook_gather_cuda);
  m.impl("codebook_gather_backward", &codebook_gather_backward_cuda);
}

}  // namespace tokenflow_ext
