// Row preparation for the CPU search: normalise each part, weight the pixel part, record squared norms.
#pragma once

#include <ATen/Parallel.h>

#include "common/row_math.h"

namespace tokenflow_ext {

// For each of `rows` rows, read the semantic part (width Ds, row stride semantic_stride) and, when
// `pixel` is not null, the pixel part (width Dp, row stride pixel_stride), and write
//   out(r) = [v_s, pixel_scale * v_p]  (out is rows x (Ds + Dp), contiguous)
//   bias(r) = ||v_s||^2 + pixel_weight * ||v_p||^2   (when bias is not null)
// where v = part / max(||part||, eps) if l2_norm, else the part itself.
template <typename scalar_t, typename acc_t>
void prepare_rows_cpu(const scalar_t* semantic, int64_t semantic_stride, const scalar_t* pixel, int64_t pixel_stride,
                      int64_t rows, int64_t Ds, int64_t Dp, bool l2_norm, acc_t pixel_scale, acc_t pixel_weight,
                      acc_t* out, acc_t* bias) {
  const int64_t D = Ds + Dp;
  at::parallel_for(0, rows, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t* dst = out + r * D;
      const scalar_t* s = semantic + r * semantic_stride;
      const acc_t den_s = normalize_denominator<acc_t>(squared_norm<acc_t>(s, Ds), l2_norm);
      acc_t sq_s = 0;
      for (int64_t j = 0; j < Ds; ++j) {
        const acc_t v = static_cast<acc_t>(s[j]) / den_s;
        dst[j] = v;
        sq_s += v * v;
      }
      acc_t sq_p = 0;
      if (pixel != nullptr) {
        const scalar_t* p = pixel + r * pixel_stride;
        const acc_t den_p = normalize_denominator<acc_t>(squared_norm<acc_t>(p, Dp), l2_norm);
        for (int64_t j = 0; j < Dp; ++j) {
          const acc_t v = static_cast<acc_t>(p[j]) / den_p;
          dst[Ds + j] = pixel_scale * v;
          sq_p += v * v;
        }
      }
      if (bias != nullptr) bias[r] = sq_s + pixel_weight * sq_p;
    }
  });
}

}  // namespace tokenflow_ext
