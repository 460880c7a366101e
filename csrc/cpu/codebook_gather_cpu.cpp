// CPU codebook_gather: rows of both codebooks by one index (normalised on the fly), and the backward
// scatter-add. The CPU backward is always deterministic: each thread owns a range of codes and sums their
// gradient rows in index order, without atomics.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "codebook_gather.h"
#include "common/cpu_simd.h"
#include "common/output_memory.h"
#include "common/row_math.h"

namespace tokenflow_ext {
namespace {

void check_index_range(const char* op, const int64_t* indices, int64_t N, int64_t K) {
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, N, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (indices[n] < 0 || indices[n] >= K) {
        bad.store(n);
        return;
      }
    }
  });
  const int64_t n = bad.load();
  TORCH_CHECK(n < 0, op, ": indices must lie in [0, K) with K = ", K, "; found ", n < 0 ? 0 : indices[n],
              " at flat position ", n);
}

constexpr int kLanes = 8;

// sum_j a[j] b[j] in kLanes partial sums (element j goes to lane j % kLanes) added in a fixed tree: one SIMD
// multiply-add per kLanes elements instead of a chain of dependent scalar adds, and the same order of
// operations for every row and thread count.
template <typename acc_t, typename A, typename B>
inline acc_t lane_dot(const A* a, const B* b, int64_t width) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= width; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<acc_t>(a[j + l]) * static_cast<acc_t>(b[j + l]);
  }
  for (int l = 0; j + l < width; ++l) lanes[l] += static_cast<acc_t>(a[j + l]) * static_cast<acc_t>(b[j + l]);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// 1 / max(||row||, eps), or 1 without l2_norm
template <typename scalar_t, typename acc_t>
inline acc_t inverse_norm(const scalar_t* row, int64_t width, bool l2_norm) {
  if (!l2_norm) return acc_t(1);
  return acc_t(1) / normalize_denominator<acc_t>(lane_dot<acc_t>(row, row, width), true);
}

// out(n) = [unit(semantic(idx(n))), unit(pixel(idx(n)))] for n in [begin, end), unit(v) = v / max(||v||, eps)
// computed as v * (1 / max(||v||, eps)) (within an ulp of the division, which would bound the loop)
template <typename scalar_t, typename acc_t>
TFX_CPU_SIMD void gather_rows_span(const scalar_t* semantic, int64_t Ds, const scalar_t* pixel, int64_t Dp,
                                   const int64_t* indices, int64_t begin, int64_t end, bool l2_norm, scalar_t* out) {
  const int64_t D = Ds + Dp;
  constexpr int64_t kAhead = 16;  // rows are random reads: fetch a few rows ahead so the misses overlap
  for (int64_t n = begin; n < end; ++n) {
    if (n + kAhead < end) {
      __builtin_prefetch(semantic + indices[n + kAhead] * Ds);
      if (pixel != nullptr) __builtin_prefetch(pixel + indices[n + kAhead] * Dp);
    }
    const int64_t k = indices[n];
    scalar_t* dst = out + n * D;
    const scalar_t* row = semantic + k * Ds;
    const acc_t inverse = inverse_norm<scalar_t, acc_t>(row, Ds, l2_norm);
    for (int64_t j = 0; j < Ds; ++j) dst[j] = static_cast<scalar_t>(static_cast<acc_t>(row[j]) * inverse);
    if (pixel == nullptr) continue;
    row = pixel + k * Dp;
    const acc_t inverse_p = inverse_norm<scalar_t, acc_t>(row, Dp, l2_norm);
    for (int64_t j = 0; j < Dp; ++j) dst[Ds + j] = static_cast<scalar_t>(static_cast<acc_t>(row[j]) * inverse_p);
  }
}

at::Tensor codebook_gather_cpu(const at::Tensor& indices, const at::Tensor& semantic_codebook,
                               const std::optional<at::Tensor>& pixel_codebook, bool l2_norm,
                               bool /*deterministic: backward only*/) {
  GatherCall call = begin_codebook_gather(indices, semantic_codebook, pixel_codebook);
  const CodebookPair& books = call.books;
  at::Tensor& out = call.rows;
  const int64_t N = call.N;
  if (N == 0) return out;
  const int64_t* idx = call.indices.const_data_ptr<int64_t>();
  check_index_range(kGatherOp, idx, N, books.K);
  TFX_DISPATCH_FLOATS(out.scalar_type(), "codebook_gather_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* semantic = books.semantic.const_data_ptr<scalar_t>();
    const scalar_t* pixel = books.has_pixel() ? books.pixel.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      gather_rows_span<scalar_t, acc_t>(semantic, books.Ds, pixel, books.Dp, idx, begin, end, l2_norm, out_ptr);
    });
  });
  return out;
}

// dst = d/d(row) of unit(row) applied to the summed gradient `sum`:
// (g - v_hat (v_hat . g)) / ||v|| when ||v|| > eps, else g / eps (the clamp cuts the norm's gradient)
template <typename scalar_t, typename acc_t>
inline void unit_row_backward(const scalar_t* row, int64_t width, const acc_t* sum, bool l2_norm, scalar_t* dst) {
  if (!l2_norm) {
    for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<scalar_t>(sum[j]);
    return;
  }
  const acc_t squared = lane_dot<acc_t>(row, row, width);
  const acc_t inverse = acc_t(1) / normalize_denominator<acc_t>(squared, true);
  const acc_t projection = std::sqrt(squared) > acc_t(kNormEps) ? inverse * lane_dot<acc_t>(row, sum, width) : acc_t(0);
  for (int64_t j = 0; j < width; ++j) {
    const acc_t unit = static_cast<acc_t>(row[j]) * inverse;
    dst[j] = static_cast<scalar_t>((sum[j] - unit * projection) * inverse);
  }
}

// The gradients of codes [k_begin, k_end): one pass over the indices sums, in index order, the gradient rows
// of the codes in the range (sums: (k_end - k_begin) x D, zeroed), then each code's sum goes back through the
// normalisation. The order of every sum is fixed (increasing n), whatever the number of threads.
template <typename scalar_t, typename acc_t>
TFX_CPU_SIMD void gather_backward_codes(const scalar_t* grads, const int64_t* indices, int64_t N, int64_t k_begin,
                                        int64_t k_end, const scalar_t* semantic, int64_t Ds, const scalar_t* pixel,
                                        int64_t Dp, bool l2_norm, acc_t* sums, scalar_t* grad_semantic,
                                        scalar_t* grad_pixel) {
  const int64_t D = Ds + Dp;
  constexpr int64_t kAhead = 16;  // the sums are random read-modify-writes: fetch a few ahead
  for (int64_t n = 0; n < N; ++n) {
    if (n + kAhead < N) {
      const int64_t next = indices[n + kAhead];
      if (next >= k_begin && next < k_end) __builtin_prefetch(sums + (next - k_begin) * D, 1);
    }
    const int64_t k = indices[n];
    if (k < k_begin || k >= k_end) continue;
    acc_t* sum = sums + (k - k_begin) * D;
    const scalar_t* g = grads + n * D;
    for (int64_t j = 0; j < D; ++j) sum[j] += static_cast<acc_t>(g[j]);
  }
  for (int64_t k = k_begin; k < k_end; ++k) {
    const acc_t* sum = sums + (k - k_begin) * D;
    unit_row_backward<scalar_t, acc_t>(semantic + k * Ds, Ds, sum, l2_norm, grad_semantic + k * Ds);
    if (pixel != nullptr) unit_row_backward<scalar_t, acc_t>(pixel + k * Dp, Dp, sum + Ds, l2_norm, grad_pixel + k * Dp);
  }
}

std::tuple<at::Tensor, at::Tensor> codebook_gather_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& indices,
                                                                const at::Tensor& semantic_codebook,
                                                                const std::optional<at::Tensor>& pixel_codebook,
                                                                bool l2_norm, bool /*deterministic: always on CPU*/) {
  GatherBackwardCall call = begin_codebook_gather_backward(grad_rows, indices, semantic_codebook, pixel_codebook);
  const CodebookPair& books = call.books;
  const at::Tensor& grads = call.grads;
  at::Tensor& grad_semantic = call.grad_semantic;
  at::Tensor& grad_pixel = call.grad_pixel;
  const int64_t N = call.N;
  const int64_t* idx = call.indices.const_data_ptr<int64_t>();
  check_index_range(kGatherBackwardOp, idx, N, books.K);
  const int64_t K = books.K;
  // one task per thread, each owning a contiguous range of codes (it scans all N indices: O(N) per thread,
  // cheap next to the gradient rows it reads)
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), K / 256));
  const int64_t codes_per_task = (K + tasks - 1) / tasks;
  // the per-code sums, (K x D) in the accumulate dtype (from the output cache: no fresh pages every call)
  at::Tensor sums_buffer =
      empty_output({tasks * codes_per_task * books.D()}, grads.options().dtype(accumulate_type_for(grads.scalar_type())));
  TFX_DISPATCH_FLOATS(grads.scalar_type(), "codebook_gather_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* all_sums = sums_buffer.data_ptr<acc_t>();
    const scalar_t* g = grads.const_data_ptr<scalar_t>();
    const scalar_t* semantic = books.semantic.const_data_ptr<scalar_t>();
    const scalar_t* pixel = books.has_pixel() ? books.pixel.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_s = grad_semantic.data_ptr<scalar_t>();
    scalar_t* grad_p = books.has_pixel() ? grad_pixel.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t k_begin = std::min(K, task * codes_per_task);
        const int64_t k_end = std::min(K, k_begin + codes_per_task);
        acc_t* sums = all_sums + task * codes_per_task * books.D();
        std::fill(sums, sums + (k_end - k_begin) * books.D(), acc_t(0));
        gather_backward_codes<scalar_t, acc_t>(g, idx, N, k_begin, k_end, semantic, books.Ds, pixel, books.Dp, l2_norm,
                                               sums, grad_s, grad_p);
      }
    });
  });
  return {grad_semantic, grad_pixel};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, CPU, m) {
  m.impl("codebook_gather", &codebook_gather_cpu);
  m.impl("codebook_gather_backward", &codebook_gather_backward_cpu);
}

}  // namespace tokenflow_ext
