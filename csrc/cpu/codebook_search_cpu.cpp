// CPU codebook_search: prepare unit rows, then a K-tiled loop whose tile products go through torch's GEMM
// (as FAISS does with BLAS) and whose running argmin is ours. Memory: O((N + K) * D), never N x K.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "codebook_search.h"
#include "common/row_math.h"
#include "common/codebook_rows.h"
#include "common/cpu_simd.h"

namespace tokenflow_ext {
namespace {

constexpr int64_t kRowBlock = 256;  // rows of x per GEMM tile
constexpr int64_t kCodeTile = 512;  // codes per GEMM tile: a 256 x 512 fp32 tile (512 KiB) stays in L2

// In place over one tile row: score[c] = bias[c] - 2 * dot[c] (the parts of d(n, k) that depend on k),
// then the minimum of the row and the first column that attains it (the first NaN, if any, as
// torch.argmin does). W-wide GCC vectors; TFX_CPU_SIMD picks AVX2 at run time where the CPU has it.
template <typename T, typename Vec>
__attribute__((always_inline)) inline int64_t scan_tile_row(T* dots, const T* bias, int64_t cols, T* row_min) {
  constexpr int64_t W = sizeof(Vec) / sizeof(T);
  const T inf = std::numeric_limits<T>::infinity();
  Vec vmin;
  Vec vnan_seen;
  for (int64_t i = 0; i < W; ++i) {
    vmin[i] = inf;
    vnan_seen[i] = 0;
  }
  int64_t c = 0;
  for (; c + W <= cols; c += W) {
    Vec d;
    Vec b;
    __builtin_memcpy(&d, dots + c, sizeof(Vec));
    __builtin_memcpy(&b, bias + c, sizeof(Vec));
    const Vec score = b - d - d;
    __builtin_memcpy(dots + c, &score, sizeof(Vec));
    vmin = score < vmin ? score : vmin;
    vnan_seen = score != score ? score : vnan_seen;  // any NaN lane stays NaN
  }
  T m = inf;
  bool any_nan = false;
  for (int64_t i = 0; i < W; ++i) {
    m = vmin[i] < m ? vmin[i] : m;
    any_nan |= vnan_seen[i] != vnan_seen[i];
  }
  for (; c < cols; ++c) {
    const T score = bias[c] - dots[c] - dots[c];
    dots[c] = score;
    m = score < m ? score : m;
    any_nan |= score != score;
  }
  if (any_nan) {
    for (int64_t k = 0; k < cols; ++k) {
      if (dots[k] != dots[k]) {
        *row_min = dots[k];
        return k;
      }
    }
  }
  *row_min = m;
  return -1;  // the caller looks the column up only when the minimum improves its running best
}

typedef float float_vec __attribute__((vector_size(32)));
typedef double double_vec __attribute__((vector_size(32)));

TFX_CPU_SIMD int64_t scan_row(float* dots, const float* bias, int64_t cols, float* row_min) {
  return scan_tile_row<float, float_vec>(dots, bias, cols, row_min);
}

TFX_CPU_SIMD int64_t scan_row(double* dots, const double* bias, int64_t cols, double* row_min) {
  return scan_tile_row<double, double_vec>(dots, bias, cols, row_min);
}

template <typename T>
int64_t first_column_equal(const T* scores, int64_t cols, T value) {
  for (int64_t c = 0; c < cols; ++c) {
    if (scores[c] == value) return c;
  }
  return 0;  // unreachable: value was read from scores
}

// Raw-pointer view of one search problem (all rows prepared, see prepare_code_row).
template <typename acc_t>
struct SearchParams {
  int64_t N, K, D;
  const acc_t* code_bias;  // (K) ||c_s||^2 + w ||c_p||^2
};

// Running argmin over the code tiles [tile_begin, tile_end) for rows [row_begin, row_end).
// best_score / best_index (rows) hold the running result for these rows; they are read and updated.
template <typename acc_t>
void search_block(const at::Tensor& x_unit, const at::Tensor& codes_weighted, const SearchParams<acc_t>& p,
                  int64_t row_begin, int64_t row_end, int64_t tile_begin, int64_t tile_end, at::Tensor& tile_buffer,
                  acc_t* best_score, int64_t* best_index) {
  const int64_t rows = row_end - row_begin;
  const at::Tensor x_rows = x_unit.narrow(0, row_begin, rows);
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t k0 = tile * kCodeTile;
    const int64_t cols = std::min(kCodeTile, p.K - k0);
    at::Tensor dots = tile_buffer.narrow(0, 0, rows * cols).view({rows, cols});
    at::mm_out(dots, x_rows, codes_weighted.narrow(0, k0, cols).t());
    acc_t* dot_rows = dots.data_ptr<acc_t>();
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* scores = dot_rows + r * cols;
      acc_t row_min;
      int64_t col = scan_row(scores, p.code_bias + k0, cols, &row_min);
      if (better_than(row_min, best_score[r])) {
        if (col < 0) col = first_column_equal(scores, cols, row_min);
        best_score[r] = row_min;
        best_index[r] = k0 + col;
      }
    }
  }
}

template <typename acc_t>
void run_tiled_search(const at::Tensor& x_unit, const at::Tensor& codes_weighted, const SearchParams<acc_t>& p,
                      int64_t* indices) {
  const int64_t row_blocks = (p.N + kRowBlock - 1) / kRowBlock;
  const int64_t code_tiles = (p.K + kCodeTile - 1) / kCodeTile;
  // Few row blocks (small N, e.g. one image at inference): also split K across threads, then merge.
  const int64_t threads = at::get_num_threads();
  const int64_t k_splits = row_blocks >= threads ? 1 : std::min(code_tiles, (2 * threads + row_blocks - 1) / row_blocks);
  const int64_t tiles_per_split = (code_tiles + k_splits - 1) / k_splits;

  std::vector<acc_t> split_score(static_cast<size_t>(k_splits * p.N), std::numeric_limits<acc_t>::infinity());
  std::vector<int64_t> split_index(static_cast<size_t>(k_splits * p.N), 0);
  const auto options = x_unit.options();

  at::parallel_for(0, row_blocks * k_splits, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile_buffer = at::empty({kRowBlock * kCodeTile}, options);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item / k_splits;
      const int64_t split = item % k_splits;
      const int64_t row_begin = block * kRowBlock;
      const int64_t row_end = std::min(p.N, row_begin + kRowBlock);
      const int64_t tile_begin = split * tiles_per_split;
      const int64_t tile_end = std::min(code_tiles, tile_begin + tiles_per_split);
      const int64_t offset = split * p.N + row_begin;
      search_block(x_unit, codes_weighted, p, row_begin, row_end, tile_begin, tile_end, tile_buffer,
                   split_score.data() + offset, split_index.data() + offset);
    }
  });
  // Splits cover increasing k, so a later split wins only when strictly better: ties keep the lowest k.
  at::parallel_for(0, p.N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      acc_t best = split_score[n];
      int64_t best_k = split_index[n];
      for (int64_t s = 1; s < k_splits; ++s) {
        const acc_t score = split_score[s * p.N + n];
        if (better_than(score, best)) {
          best = score;
          best_k = split_index[s * p.N + n];
        }
      }
      indices[n] = best_k;
    }
  });
}

// For each of `rows` rows: out(r) = [v_s, pixel_scale v_p], bias(r) = ||v_s||^2 + pixel_weight ||v_p||^2
// (see prepare_code_row); rows are read with the given row strides, `pixel` may be null.
template <typename scalar_t, typename acc_t>
void prepare_rows(const scalar_t* semantic, int64_t semantic_stride, const scalar_t* pixel, int64_t pixel_stride,
                  int64_t rows, int64_t Ds, int64_t Dp, bool l2_norm, acc_t pixel_scale, acc_t pixel_weight, acc_t* out,
                  acc_t* bias) {
  at::parallel_for(0, rows, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t row_bias = prepare_code_row<scalar_t, acc_t>(
          semantic + r * semantic_stride, pixel == nullptr ? nullptr : pixel + r * pixel_stride, Ds, Dp, l2_norm,
          pixel_scale, pixel_weight, out + r * (Ds + Dp));
      if (bias != nullptr) bias[r] = row_bias;
    }
  });
}

// min_distance(n) = d(n, indices(n)) from differences (the expanded score loses precision by cancellation).
template <typename scalar_t, typename acc_t>
void exact_min_distance(const acc_t* x_unit, const scalar_t* semantic, const scalar_t* pixel, const int64_t* indices,
                        int64_t N, int64_t Ds, int64_t Dp, bool l2_norm, acc_t pixel_weight, acc_t* out) {
  at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      out[n] = exact_code_distance<scalar_t, acc_t>(x_unit + n * (Ds + Dp), semantic, pixel, indices[n], Ds, Dp,
                                                    l2_norm, pixel_weight);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> codebook_search_cpu(const at::Tensor& x, const at::Tensor& semantic_codebook,
                                                       const std::optional<at::Tensor>& pixel_codebook,
                                                       double pixel_weight, bool l2_norm) {
  SearchCall call = begin_codebook_search(x, semantic_codebook, pixel_codebook, pixel_weight);
  if (call.N == 0) return {call.indices, call.min_distance};
  const CodebookPair& books = call.books;
  const at::Tensor& rows = call.rows;
  at::Tensor& indices = call.indices;
  at::Tensor& min_distance = call.min_distance;
  const int64_t N = call.N, K = books.K, Ds = books.Ds, Dp = books.Dp, D = books.D();
  const auto acc_options = rows.options().dtype(call.acc_type);
  at::Tensor x_unit = at::empty({N, D}, acc_options);
  at::Tensor codes_weighted = at::empty({K, D}, acc_options);
  at::Tensor code_bias = at::empty({K}, acc_options);

  TFX_DISPATCH_FLOATS(x.scalar_type(), "codebook_search_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w = static_cast<acc_t>(pixel_weight);
    const scalar_t* x_ptr = rows.const_data_ptr<scalar_t>();
    const scalar_t* sem_ptr = books.semantic.const_data_ptr<scalar_t>();
    const scalar_t* pix_ptr = books.has_pixel() ? books.pixel.const_data_ptr<scalar_t>() : nullptr;
    // x_unit = [x_s, x_p] (normalised); codes_weighted = [c_s, w * c_p] so one D-wide dot gives
    // x_s.c_s + w x_p.c_p; code_bias = ||c_s||^2 + w ||c_p||^2 (real norms: zero rows stay zero).
    prepare_rows<scalar_t, acc_t>(x_ptr, D, Dp > 0 ? x_ptr + Ds : nullptr, D, N, Ds, Dp, l2_norm, acc_t(1), acc_t(0),
                                  x_unit.data_ptr<acc_t>(), nullptr);
    prepare_rows<scalar_t, acc_t>(sem_ptr, Ds, pix_ptr, Dp, K, Ds, Dp, l2_norm, w, w,
                                  codes_weighted.data_ptr<acc_t>(), code_bias.data_ptr<acc_t>());
    const SearchParams<acc_t> params{N, K, D, code_bias.const_data_ptr<acc_t>()};
    int64_t* idx_ptr = indices.data_ptr<int64_t>();
    run_tiled_search<acc_t>(x_unit, codes_weighted, params, idx_ptr);
    exact_min_distance<scalar_t, acc_t>(x_unit.const_data_ptr<acc_t>(), sem_ptr, pix_ptr, idx_ptr, N, Ds, Dp, l2_norm,
                                        w, min_distance.data_ptr<acc_t>());
  });
  return {indices, min_distance};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, CPU, m) { m.impl("codebook_search", &codebook_search_cpu); }

}  // namespace tokenflow_ext
