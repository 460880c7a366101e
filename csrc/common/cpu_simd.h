// Run-time SIMD dispatch for CPU kernels: an AVX2 clone and a baseline clone of the marked function, picked
// by the loader (GCC/Clang target_clones, x86-64 only). Mark a plain function that holds the hot loop
// (not a lambda: the clones do not reach into lambdas it is called from).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(TOKENFLOW_EXT_NO_CLONES)
#define TFX_CPU_SIMD __attribute__((target_clones("avx2", "default")))
#else
#define TFX_CPU_SIMD
#endif
