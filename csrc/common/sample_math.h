// Per-element arithmetic of sample_logits shared by the CPU and CUDA kernels: the order-preserving key of a
// float, the Philox-4x32-10 counter-based generator and the Gumbel noise built on it. One definition, so the
// two backends draw the same tokens for the same seed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/row_math.h"  // TFX_HOST_DEVICE

namespace tokenflow_ext {

// Unsigned key with key(a) < key(b) iff a < b for non-NaN floats (NaN is mapped to -inf's key by the callers).
TFX_HOST_DEVICE uint32_t ordered_key(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));  // a bit cast that nvcc, g++ and the emulator all accept
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Philox-4x32-10 (Salmon et al. 2011, as curand / torch's Philox): counter (index, 0, row_lo, row_hi),
// key = seed. Returns the first 32-bit word. Pure function of (seed, row, index).
TFX_HOST_DEVICE uint32_t philox_u32(uint64_t seed, uint64_t row, uint32_t index) {
  uint32_t c0 = index, c1 = 0u, c2 = static_cast<uint32_t>(row), c3 = static_cast<uint32_t>(row >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    // 64-bit products instead of __umulhi: the same code compiles for the host and the emulator
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Standard Gumbel noise -log(-log(u)) with u = (top 24 bits + 0.5) / 2^24 in (0, 1): never log(0).
TFX_HOST_DEVICE float gumbel_noise(uint64_t seed, uint64_t row, uint32_t index) {
  const float u = (static_cast<float>(philox_u32(seed, row, index) >> 8) + 0.5f) * (1.0f / 16777216.0f);
  return -logf(-logf(u));
}

// Guided logit of one image id, rounded to float: (1 + t) c - t u, each product in the accumulate type.
// NaN becomes -inf (never kept, never drawn).
template <typename acc_t>
TFX_HOST_DEVICE float guided_value(acc_t cond, acc_t uncond, acc_t one_plus_t, acc_t t) {
  const float g = static_cast<float>(one_plus_t * cond - t * uncond);
  return g != g ? -INFINITY : g;
}

// exp(g - max) with the +inf convention: an element equal to the row maximum weighs 1 (so a +inf maximum
// takes all the mass, shared by the +inf elements), -inf weighs 0.
TFX_HOST_DEVICE float shifted_logit(float g, float row_max) { return g == row_max ? 0.0f : g - row_max; }

}  // namespace tokenflow_ext
