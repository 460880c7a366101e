// Per-row arithmetic shared by the CPU and CUDA kernels (raw pointers only).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TFX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TFX_HOST_DEVICE inline
#endif

namespace tokenflow_ext {

// F.normalize's eps: v / max(||v||, eps).
constexpr double kNormEps = 1e-12;

template <typename acc_t, typename scalar_t>
TFX_HOST_DEVICE acc_t squared_norm(const scalar_t* v, int64_t width) {
  acc_t sum = 0;
  for (int64_t j = 0; j < width; ++j) {
    const acc_t value = static_cast<acc_t>(v[j]);
    sum += value * value;
  }
  return sum;
}

// The denominator F.normalize divides by (1 when the part is not normalised).
template <typename acc_t>
TFX_HOST_DEVICE acc_t normalize_denominator(acc_t squared, bool l2_norm) {
  if (!l2_norm) return acc_t(1);
  const acc_t norm = sqrt(squared);
  return norm > acc_t(kNormEps) ? norm : acc_t(kNormEps);
}

// "a is a better minimum than b" with torch.argmin's rules: NaN beats everything (first NaN wins),
// otherwise smaller wins; equal values keep the earlier (lower) index, so callers visit k in order.
template <typename acc_t>
TFX_HOST_DEVICE bool better_than(acc_t a, acc_t b) {
  const bool a_nan = a != a;
  const bool b_nan = b != b;
  if (a_nan || b_nan) return a_nan && !b_nan;
  return a < b;
}

// Lexicographic form for merging candidates that were not visited in index order.
template <typename acc_t>
TFX_HOST_DEVICE bool better_candidate(acc_t a, int64_t a_index, acc_t b, int64_t b_index) {
  const bool a_nan = a != a;
  const bool b_nan = b != b;
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a < b;
  return a_index < b_index;
}

}  // namespace tokenflow_ext
