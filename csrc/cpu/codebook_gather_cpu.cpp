// CPU codebook_gather: rows of both codebooks by one index (normalised on the fly), and the backward
// scatter-add. The CPU backward is always deterministic: a counting sort groups the rows of each code,
// then each code's gradient is summed in index order, in parallel over codes, without atomics.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "codebook_gather.h"
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

// out(n) = part(idx(n)) / max(||part(idx(n))||, eps)   (or the raw row when !l2_norm)
template <typename scalar_t, typename acc_t>
void gather_part(const scalar_t* book, int64_t width, const int64_t* indices, int64_t N, bool l2_norm,
                 scalar_t* out, int64_t out_stride) {
  at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = book + indices[n] * width;
      scalar_t* dst = out + n * out_stride;
      if (!l2_norm) {
        for (int64_t j = 0; j < width; ++j) dst[j] = row[j];
        continue;
      }
      const acc_t den = normalize_denominator<acc_t>(squared_norm<acc_t>(row, width), true);
      for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<scalar_t>(static_cast<acc_t>(row[j]) / den);
    }
  });
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
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    gather_part<scalar_t, acc_t>(books.semantic.const_data_ptr<scalar_t>(), books.Ds, idx, N, l2_norm, out_ptr,
                                 books.D());
    if (books.has_pixel()) {
      gather_part<scalar_t, acc_t>(books.pixel.const_data_ptr<scalar_t>(), books.Dp, idx, N, l2_norm,
                                   out_ptr + books.Ds, books.D());
    }
  });
  return out;
}

// Rows of each code, in increasing n: order[offsets[k] .. offsets[k + 1]) (a counting sort, O(N + K)).
struct RowsByCode {
  std::vector<int64_t> offsets;
  std::vector<int64_t> order;
};

RowsByCode group_rows_by_code(const int64_t* indices, int64_t N, int64_t K) {
  RowsByCode groups;
  groups.offsets.assign(static_cast<size_t>(K + 1), 0);
  for (int64_t n = 0; n < N; ++n) ++groups.offsets[indices[n] + 1];
  for (int64_t k = 0; k < K; ++k) groups.offsets[k + 1] += groups.offsets[k];
  groups.order.resize(static_cast<size_t>(N));
  std::vector<int64_t> cursor(groups.offsets.begin(), groups.offsets.end() - 1);
  for (int64_t n = 0; n < N; ++n) groups.order[cursor[indices[n]]++] = n;
  return groups;
}

// grad_book(k) = d/d(raw row) of the gathered (normalised) row, summed over the rows that chose k.
template <typename scalar_t, typename acc_t>
void scatter_part_backward(const scalar_t* grad_rows, int64_t grad_stride, int64_t column, const scalar_t* book,
                           int64_t width, const RowsByCode& groups, int64_t K, bool l2_norm, scalar_t* grad_book) {
  at::parallel_for(0, K, 256, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(static_cast<size_t>(width));
    for (int64_t k = begin; k < end; ++k) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t i = groups.offsets[k]; i < groups.offsets[k + 1]; ++i) {
        const scalar_t* g = grad_rows + groups.order[i] * grad_stride + column;
        for (int64_t j = 0; j < width; ++j) sum[j] += static_cast<acc_t>(g[j]);
      }
      scalar_t* dst = grad_book + k * width;
      if (!l2_norm) {
        for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<scalar_t>(sum[j]);
        continue;
      }
      // (g - v_hat (v_hat . g)) / ||v|| when ||v|| > eps, else g / eps (the clamp cuts the norm's gradient)
      const scalar_t* row = book + k * width;
      const acc_t norm = std::sqrt(squared_norm<acc_t>(row, width));
      const acc_t den = normalize_denominator<acc_t>(norm * norm, true);
      acc_t projection = 0;
      if (norm > acc_t(kNormEps)) {
        for (int64_t j = 0; j < width; ++j) projection += static_cast<acc_t>(row[j]) / den * sum[j];
      }
      for (int64_t j = 0; j < width; ++j) {
        const acc_t unit = static_cast<acc_t>(row[j]) / den;
        dst[j] = static_cast<scalar_t>((sum[j] - unit * projection) / den);
      }
    }
  });
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
  const RowsByCode groups = group_rows_by_code(idx, N, books.K);
  TFX_DISPATCH_FLOATS(grads.scalar_type(), "codebook_gather_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grads.const_data_ptr<scalar_t>();
    scatter_part_backward<scalar_t, acc_t>(g, books.D(), 0, books.semantic.const_data_ptr<scalar_t>(), books.Ds,
                                           groups, books.K, l2_norm, grad_semantic.data_ptr<scalar_t>());
    if (books.has_pixel()) {
      scatter_part_backward<scalar_t, acc_t>(g, books.D(), books.Ds, books.pixel.const_data_ptr<scalar_t>(),
                                             books.Dp, groups, books.K, l2_norm, grad_pixel.data_ptr<scalar_t>());
    }
  });
  return {grad_semantic, grad_pixel};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, CPU, m) {
  m.impl("codebook_gather", &codebook_gather_cpu);
  m.impl("codebook_gather_backward", &codebook_gather_backward_cpu);
}

}  // namespace tokenflow_ext
