// Per-row work of codebook_search shared by the CPU and CUDA kernels (raw pointers, host and device).
#pragma once

#include "common/row_math.h"

namespace tokenflow_ext {

// Writes one row [v_s, pixel_scale * v_p] to dst (v = part / max(||part||, eps) if l2_norm, else the part)
// and returns ||v_s||^2 + pixel_weight ||v_p||^2. `pixel` may be null (Dp = 0).
template <typename scalar_t, typename acc_t>
TFX_HOST_DEVICE acc_t prepare_code_row(const scalar_t* semantic, const scalar_t* pixel, int64_t Ds, int64_t Dp,
                                       bool l2_norm, acc_t pixel_scale, acc_t pixel_weight, acc_t* dst) {
  const acc_t den_s = normalize_denominator<acc_t>(squared_norm<acc_t>(semantic, Ds), l2_norm);
  acc_t sq_s = 0;
  for (int64_t j = 0; j < Ds; ++j) {
    const acc_t v = static_cast<acc_t>(semantic[j]) / den_s;
    dst[j] = v;
    sq_s += v * v;
  }
  acc_t sq_p = 0;
  if (pixel != nullptr) {
    const acc_t den_p = normalize_denominator<acc_t>(squared_norm<acc_t>(pixel, Dp), l2_norm);
    for (int64_t j = 0; j < Dp; ++j) {
      const acc_t v = static_cast<acc_t>(pixel[j]) / den_p;
      dst[Ds + j] = pixel_scale * v;
      sq_p += v * v;
    }
  }
  return sq_s + pixel_weight * sq_p;
}

// sum_j (x_j - c_j / den(c))^2 for one part: x already prepared, c a raw codebook row.
template <typename scalar_t, typename acc_t>
TFX_HOST_DEVICE acc_t part_squared_distance(const acc_t* x, const scalar_t* code, int64_t width, bool l2_norm) {
  const acc_t den = normalize_denominator<acc_t>(squared_norm<acc_t>(code, width), l2_norm);
  acc_t sum = 0;
  for (int64_t j = 0; j < width; ++j) {
    const acc_t diff = x[j] - static_cast<acc_t>(code[j]) / den;
    sum += diff * diff;
  }
  return sum;
}

// d(n, k) from differences: x_unit is the prepared (unweighted) row of x, k the chosen code.
template <typename scalar_t, typename acc_t>
TFX_HOST_DEVICE acc_t exact_code_distance(const acc_t* x_unit, const scalar_t* semantic, const scalar_t* pixel,
                                          int64_t k, int64_t Ds, int64_t Dp, bool l2_norm, acc_t pixel_weight) {
  acc_t distance = part_squared_distance<scalar_t, acc_t>(x_unit, semantic + k * Ds, Ds, l2_norm);
  if (pixel != nullptr) {
    distance += pixel_weight * part_squared_distance<scalar_t, acc_t>(x_unit + Ds, pixel + k * Dp, Dp, l2_norm);
  }
  return distance;
}

}  // namespace tokenflow_ext
