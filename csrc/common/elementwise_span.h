// Element-wise maps over contiguous spans for the CPU kernels: map_span reads kIn inputs and writes kOut
// outputs, element i of each output a function of element i of the inputs, in the arithmetic type acc_t.
//
// bfloat16 spans go two elements at a time as one 32-bit word (little endian: the element at the lower address
// in the low half). Widening a half is a shift or a mask, narrowing puts the two rounded halves back together
// with a mask and an or: the vectorised loop needs no lane shuffles, which are what per-element bf16
// conversions cost on AVX-512 (Zen 4: one 512-bit widening shuffle per 16 elements and input). The values are
// bit for bit those of load_as / store_as (round to nearest even, NaN -> 0x7FC0).
#pragma once

#include <c10/util/BFloat16.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cpu_simd.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "elementwise_span.h: bfloat16 pairs assume little endian");

namespace tokenflow_ext {

// Two neighbouring bfloat16 elements as one 32-bit word, and each half of it widened to float.
inline uint32_t bf16_pair_word(const c10::BFloat16* pair) {
  uint32_t word;
  std::memcpy(&word, pair, sizeof(word));
  return word;
}

inline float bf16_pair_low(uint32_t word) { return float_from_bits(word << 16); }

inline float bf16_pair_high(uint32_t word) { return float_from_bits(word & UINT32_C(0xFFFF0000)); }

inline uint32_t bf16_pair_bits(float low, float high) {
  return (bf16_rounded_upper(high) & UINT32_C(0xFFFF0000)) | (bf16_rounded_upper(low) >> 16);
}

// The loop of map_span, compiled into each of its SIMD clones (always inlined, so it takes the clone's target).
// In and out by value: the stores through out could otherwise alias the pointers and fn's captures, and the
// loop would reload them per element instead of vectorising.
template <typename scalar_t, typename acc_t, int kIn, int kOut, typename Fn>
__attribute__((always_inline)) inline void map_span_loop(std::array<const scalar_t*, kIn> in,
                                                         std::array<scalar_t*, kOut> out, int64_t n, Fn fn) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    const int64_t pairs = n / 2;
#pragma GCC ivdep
    for (int64_t k = 0; k < pairs; ++k) {
      acc_t low[kIn], high[kIn], low_out[kOut], high_out[kOut];
      for (int j = 0; j < kIn; ++j) {
        const uint32_t word = bf16_pair_word(in[j] + 2 * k);
        low[j] = bf16_pair_low(word);
        high[j] = bf16_pair_high(word);
      }
      fn(low, low_out);
      fn(high, high_out);
      for (int j = 0; j < kOut; ++j) {
        const uint32_t word = bf16_pair_bits(low_out[j], high_out[j]);
        std::memcpy(out[j] + 2 * k, &word, sizeof(word));
      }
    }
    i = 2 * pairs;
  }
#pragma GCC ivdep
  for (; i < n; ++i) {
    acc_t values[kIn], results[kOut];
    for (int j = 0; j < kIn; ++j) values[j] = load_as<acc_t>(in[j][i]);
    fn(values, results);
    for (int j = 0; j < kOut; ++j) out[j][i] = store_as<scalar_t>(results[j]);
  }
}

template <typename scalar_t, typename acc_t, int kIn, int kOut, typename Fn>
TFX_CPU_SIMD void map_span_simd(std::array<const scalar_t*, kIn> in, std::array<scalar_t*, kOut> out, int64_t n,
                                Fn fn) {
  map_span_loop<scalar_t, acc_t, kIn, kOut>(in, out, n, fn);
}

template <typename scalar_t, typename acc_t, int kIn, int kOut, typename Fn>
TFX_CPU_SIMD_256 void map_span_simd_256(std::array<const scalar_t*, kIn> in, std::array<scalar_t*, kOut> out,
                                        int64_t n, Fn fn) {
  map_span_loop<scalar_t, acc_t, kIn, kOut>(in, out, n, fn);
}

// fn(const acc_t (&in)[kIn], acc_t (&out)[kOut]). Outputs may be the very inputs (element for element, the
// in-place update); partial overlaps are the caller's to reject. float and double spans run 256-bit vectors
// at most: on Zen 4 the AVX-512 clone streamed these memory-bound maps 8-13% slower at 64 MiB per tensor (an
// in-place step and an interpolation, measured in one process), and tied in cache; bfloat16 and half keep the
// AVX-512 clone (faster there: 18 against 23 us at 256x77x16, and the 256-bit clone has no F16C).
template <typename scalar_t, typename acc_t, int kIn, int kOut, typename Fn>
inline void map_span(std::array<const scalar_t*, kIn> in, std::array<scalar_t*, kOut> out, int64_t n, Fn fn) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    map_span_simd_256<scalar_t, acc_t, kIn, kOut>(in, out, n, fn);
  } else {
    map_span_simd<scalar_t, acc_t, kIn, kOut>(in, out, n, fn);
  }
}

}  // namespace tokenflow_ext
