// CPU codebook_search: prepare unit rows, then a K-tiled loop whose tile products go through torch's GEMM
// (as FAISS does with BLAS) and whose running argmin is ours. Memory: O((N + K) * D), never N x K.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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
  const acc_t* margin;     // (N) how far two GEMM scores of row n may be off each other by rounding (see below)
};

// A code whose GEMM score came within the rounding margin of its row's running best: the final choice among
// such near-ties is made by exact distance (rerank_near_ties), not by GEMM rounding, which depends on where a
// code falls in BLAS's blocking (so on the batch and the tile layout).
template <typename acc_t>
struct NearTie {
  int64_t row;  // global row n
  acc_t score;  // GEMM score
  int64_t code;
};

// Running argmin over the code tiles [tile_begin, tile_end) for rows [row_begin, row_end).
// best_score / best_index (rows) hold the running result for these rows; they are read and updated.
// Every code that may end within margin(n) of the final best score, other than the running best itself, is
// appended to near_ties: the codes of a tile within margin of min(running best, tile minimum) when there are
// two or more such candidates (counting the running best).
template <typename acc_t>
void search_block(const at::Tensor& x_unit, const at::Tensor& codes_weighted, const SearchParams<acc_t>& p,
                  int64_t row_begin, int64_t row_end, int64_t tile_begin, int64_t tile_end, at::Tensor& tile_buffer,
                  acc_t* best_score, int64_t* best_index, std::vector<NearTie<acc_t>>& near_ties) {
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
      const acc_t previous = best_score[r];
      const acc_t margin = p.margin[row_begin + r];
      if (!(row_min != row_min) && !(previous != previous) && row_min <= previous + margin) {
        const acc_t limit = std::min(previous, row_min) + margin;
        int64_t near = previous <= limit ? 1 : 0;
        for (int64_t c = 0; c < cols && near < 2; ++c) near += scores[c] <= limit ? 1 : 0;
        if (near >= 2) {
          if (previous <= limit) near_ties.push_back({row_begin + r, previous, best_index[r]});
          for (int64_t c = 0; c < cols; ++c) {
            if (scores[c] <= limit) near_ties.push_back({row_begin + r, scores[c], k0 + c});
          }
        }
      }
      if (better_than(row_min, previous)) {
        if (col < 0) col = first_column_equal(scores, cols, row_min);
        best_score[r] = row_min;
        best_index[r] = k0 + col;
      }
    }
  }
}

// Among the codes of row n whose GEMM score is within margin(n) of the best, the one with the smallest exact
// distance (from differences, computed alike for every row and code), the lowest index on equal distances.
template <typename scalar_t, typename acc_t>
void rerank_near_ties(std::vector<NearTie<acc_t>>& near_ties, const acc_t* best_score, const acc_t* margin,
                      const acc_t* x_unit, const scalar_t* semantic, const scalar_t* pixel, int64_t Ds, int64_t Dp,
                      bool l2_norm, acc_t pixel_weight, int64_t* indices) {
  std::sort(near_ties.begin(), near_ties.end(), [](const NearTie<acc_t>& a, const NearTie<acc_t>& b) {
    return a.row != b.row ? a.row < b.row : a.code < b.code;
  });
  for (size_t i = 0; i < near_ties.size();) {
    const int64_t n = near_ties[i].row;
    const acc_t limit = best_score[n] + margin[n];
    const acc_t* x_row = x_unit + n * (Ds + Dp);
    int64_t best_k = indices[n];
    acc_t best_distance =
        exact_code_distance<scalar_t, acc_t>(x_row, semantic, pixel, best_k, Ds, Dp, l2_norm, pixel_weight);
    for (; i < near_ties.size() && near_ties[i].row == n; ++i) {
      const NearTie<acc_t>& tie = near_ties[i];
      if (!(tie.score <= limit) || tie.code == best_k) continue;
      const acc_t distance =
          exact_code_distance<scalar_t, acc_t>(x_row, semantic, pixel, tie.code, Ds, Dp, l2_norm, pixel_weight);
      if (distance < best_distance || (distance == best_distance && tie.code < best_k)) {
        best_distance = distance;
        best_k = tie.code;
      }
    }
    indices[n] = best_k;
  }
}

template <typename scalar_t, typename acc_t>
void run_tiled_search(const at::Tensor& x_unit, const at::Tensor& codes_weighted, const SearchParams<acc_t>& p,
                      const scalar_t* semantic, const scalar_t* pixel, int64_t Ds, int64_t Dp, bool l2_norm,
                      acc_t pixel_weight, int64_t* indices) {
  const int64_t row_blocks = (p.N + kRowBlock - 1) / kRowBlock;
  const int64_t code_tiles = (p.K + kCodeTile - 1) / kCodeTile;
  // Few row blocks (small N, e.g. one image at inference): also split K across threads, then merge.
  const int64_t threads = at::get_num_threads();
  const int64_t k_splits = row_blocks >= threads ? 1 : std::min(code_tiles, (2 * threads + row_blocks - 1) / row_blocks);
  const int64_t tiles_per_split = (code_tiles + k_splits - 1) / k_splits;

  std::vector<acc_t> split_score(static_cast<size_t>(k_splits * p.N), std::numeric_limits<acc_t>::infinity());
  std::vector<int64_t> split_index(static_cast<size_t>(k_splits * p.N), 0);
  std::vector<std::vector<NearTie<acc_t>>> near_ties(static_cast<size_t>(row_blocks * k_splits));
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
                   split_score.data() + offset, split_index.data() + offset, near_ties[item]);
    }
  });
  // Splits cover increasing k, so a later split wins only when strictly better: ties keep the lowest k. A
  // split's best that is not the merged best joins the near-ties (it is dropped there unless within margin).
  const acc_t* x_ptr = x_unit.const_data_ptr<acc_t>();
  at::parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      std::vector<NearTie<acc_t>> ties;
      for (int64_t split = 0; split < k_splits; ++split) {
        auto& found = near_ties[block * k_splits + split];
        ties.insert(ties.end(), found.begin(), found.end());
        std::vector<NearTie<acc_t>>().swap(found);
      }
      const int64_t row_end = std::min(p.N, (block + 1) * kRowBlock);
      for (int64_t n = block * kRowBlock; n < row_end; ++n) {
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
        for (int64_t s = 0; s < k_splits && !(best != best); ++s) {
          const int64_t k = split_index[s * p.N + n];
          if (k != best_k && split_score[s * p.N + n] <= best + p.margin[n]) {
            ties.push_back({n, split_score[s * p.N + n], k});
          }
        }
        split_score[n] = best;  // the merged best score, read by rerank_near_ties
      }
      if (!ties.empty()) {
        rerank_near_ties<scalar_t, acc_t>(ties, split_score.data(), p.margin, x_ptr, semantic, pixel, Ds, Dp, l2_norm,
                                          pixel_weight, indices);
      }
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
  at::Tensor margin = at::empty({N}, acc_options);

  TFX_DISPATCH_FLOATS(x.scalar_type(), "codebook_search_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w = static_cast<acc_t>(pixel_weight);
    const scalar_t* x_ptr = rows.const_data_ptr<scalar_t>();
    const scalar_t* sem_ptr = books.semantic.const_data_ptr<scalar_t>();
    const scalar_t* pix_ptr = books.has_pixel() ? books.pixel.const_data_ptr<scalar_t>() : nullptr;
    // x_unit = [x_s, x_p] (normalised); codes_weighted = [c_s, w * c_p] so one D-wide dot gives
    // x_s.c_s + w x_p.c_p; code_bias = ||c_s||^2 + w ||c_p||^2 (real norms: zero rows stay zero).
    // margin = x_bias here, turned into the rounding margin below.
    acc_t* margin_ptr = margin.data_ptr<acc_t>();
    prepare_rows<scalar_t, acc_t>(x_ptr, D, Dp > 0 ? x_ptr + Ds : nullptr, D, N, Ds, Dp, l2_norm, acc_t(1), w,
                                  x_unit.data_ptr<acc_t>(), margin_ptr);
    prepare_rows<scalar_t, acc_t>(sem_ptr, Ds, pix_ptr, Dp, K, Ds, Dp, l2_norm, w, w,
                                  codes_weighted.data_ptr<acc_t>(), code_bias.data_ptr<acc_t>());
    const acc_t* bias_ptr = code_bias.const_data_ptr<acc_t>();
    const acc_t max_bias = *std::max_element(bias_ptr, bias_ptr + K);
    // score(n, k) = bias(k) - 2 x(n).c(k); with |x.c| <= (x_bias + bias) / 2 per part (AM-GM), a D-term dot in
    // any summation order is off by at most about D eps (x_bias + max_bias), so two scores by twice that; 4x
    // headroom. Non-finite margins (overflowing rows) disable the near-tie rerank for that row.
    const acc_t eps = std::numeric_limits<acc_t>::epsilon();
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const acc_t m = acc_t(8 * (D + 4)) * eps * (margin_ptr[n] + acc_t(2) * max_bias);
        margin_ptr[n] = std::isfinite(m) ? m : acc_t(0);
      }
    });
    const SearchParams<acc_t> params{N, K, D, bias_ptr, margin_ptr};
    int64_t* idx_ptr = indices.data_ptr<int64_t>();
    run_tiled_search<scalar_t, acc_t>(x_unit, codes_weighted, params, sem_ptr, pix_ptr, Ds, Dp, l2_norm, w, idx_ptr);
    exact_min_distance<scalar_t, acc_t>(x_unit.const_data_ptr<acc_t>(), sem_ptr, pix_ptr, idx_ptr, N, Ds, Dp, l2_norm,
                                        w, min_distance.data_ptr<acc_t>());
  });
  return {indices, min_distance};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, CPU, m) { m.impl("codebook_search", &codebook_search_cpu); }

}  // namespace tokenflow_ext
