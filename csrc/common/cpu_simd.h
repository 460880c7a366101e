// Run-time SIMD dispatch for CPU kernels: AVX-512 (x86-64-v4), AVX2 and baseline clones of the marked function,
// picked by the loader (GCC/Clang target_clones, x86-64 only). Mark a plain function that holds the hot loop
// (not a lambda: the clones do not reach into lambdas it is called from).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(TOKENFLOW_EXT_NO_CLONES)
#define TFX_CPU_SIMD __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
// 256-bit vectors at most (AVX2 + FMA + F16C), for memory-bound loops that stream slower with 512-bit ones
// (see map_span)
#define TFX_CPU_SIMD_256 __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TFX_CPU_SIMD
#define TFX_CPU_SIMD_256
#endif

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace tokenflow_ext {

inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// value rounded to bfloat16 (round to nearest even, NaN -> quiet 0x7FC0), in the upper 16 bits of the result
// (the lower 16 are not cleared)
inline uint32_t bf16_rounded_upper(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1);
  return value != value ? UINT32_C(0x7FC00000) : rounded;
}

// Element loads and stores of the CPU kernels in their arithmetic type. bfloat16 gets branch-free bit
// conversions (the upper half of a float; bf16_rounded_upper), the same values as c10::BFloat16's, written so
// the compiler vectorises the loops around them.
template <typename acc_t, typename scalar_t>
inline acc_t load_as(scalar_t value) {
  return static_cast<acc_t>(value);
}

template <>
inline float load_as<float, c10::BFloat16>(c10::BFloat16 value) {
  return float_from_bits(static_cast<uint32_t>(value.x) << 16);
}

template <typename scalar_t, typename acc_t>
inline scalar_t store_as(acc_t value) {
  return static_cast<scalar_t>(value);
}

template <>
inline c10::BFloat16 store_as<c10::BFloat16, float>(float value) {
  return c10::BFloat16(static_cast<uint16_t>(bf16_rounded_upper(value) >> 16), c10::BFloat16::from_bits());
}

}  // namespace tokenflow_ext
