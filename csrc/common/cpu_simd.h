// Run-time SIMD dispatch for CPU kernels: an AVX2 clone and a baseline clone of the marked function, picked
// by the loader (GCC/Clang target_clones, x86-64 only). Mark a plain function that holds the hot loop
// (not a lambda: the clones do not reach into lambdas it is called from).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(TOKENFLOW_EXT_NO_CLONES)
#define TFX_CPU_SIMD __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define TFX_CPU_SIMD
#endif

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace tokenflow_ext {

// Element loads and stores of the CPU kernels in their arithmetic type. bfloat16 gets branch-free bit
// conversions (the upper half of a float; round to nearest even, NaN kept quiet), the same values as
// c10::BFloat16's, written so the compiler vectorises the loops around them.
template <typename acc_t, typename scalar_t>
inline acc_t load_as(scalar_t value) {
  return static_cast<acc_t>(value);
}

template <>
inline float load_as<float, c10::BFloat16>(c10::BFloat16 value) {
  const uint32_t bits = static_cast<uint32_t>(value.x) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

template <typename scalar_t, typename acc_t>
inline scalar_t store_as(acc_t value) {
  return static_cast<scalar_t>(value);
}

template <>
inline c10::BFloat16 store_as<c10::BFloat16, float>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(value != value ? UINT32_C(0x7FC0) : rounded), c10::BFloat16::from_bits());
}

}  // namespace tokenflow_ext
