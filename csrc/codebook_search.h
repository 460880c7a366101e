// Tensor-facing argument handling of codebook_search, shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/checks.h"

namespace tokenflow_ext {

constexpr const char* kSearchOp = "tokenflow_ext.codebook_search";

// Validated inputs and allocated outputs of one codebook_search call.
struct SearchCall {
  CodebookPair books;
  at::Tensor rows;          // (N, D) contiguous view of x
  at::Tensor indices;       // x.shape[:-1], int64
  at::Tensor min_distance;  // x.shape[:-1], accumulate dtype
  at::ScalarType acc_type;  // float32, or float64 for float64 inputs
  int64_t N = 0;
};

inline SearchCall begin_codebook_search(const at::Tensor& x, const at::Tensor& semantic_codebook,
                                        const std::optional<at::Tensor>& pixel_codebook, double pixel_weight) {
  SearchCall call;
  call.books = check_codebooks(kSearchOp, semantic_codebook, pixel_codebook);
  call.rows = check_and_flatten_rows(kSearchOp, x, call.books);
  call.N = call.rows.size(0);
  call.acc_type = accumulate_type_for(x.scalar_type());
  check_pixel_weight(kSearchOp, pixel_weight, call.acc_type);
  const auto out_shape = x.sizes().slice(0, x.dim() - 1);
  call.indices = at::empty(out_shape, x.options().dtype(at::kLong));
  call.min_distance = at::empty(out_shape, x.options().dtype(call.acc_type));
  return call;
}

}  // namespace tokenflow_ext
