// CPU sample_logits: one pass per row over the image ids into a row buffer (the guided logits), a radix
// select of the k-th largest key (a 256-bin histogram over the row, then over the survivors only), a sort of
// the top-k candidates alone for top-p, and a Gumbel-max draw over the kept ids. Rows run in parallel; the
// only temporaries are one row of floats and keys per worker thread, never (B, L, V).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "common/sample_math.h"
#include "sample_logits.h"

namespace tokenflow_ext {
namespace {

// Raw-pointer view of one call (see SampleCall).
struct SampleParams {
  int64_t rows, V, start, K, top_k;
  double top_p;
  double guidance;
  uint64_t seed;
};

// The top_k-th largest of keys[0, n) (with multiplicity), 0 < top_k <= n. `buffer` holds the survivors of
// each 8-bit digit pass, so only the first pass reads the whole row.
uint32_t kth_largest_key(const uint32_t* keys, int64_t n, int64_t top_k, std::vector<uint32_t>& buffer) {
  buffer.resize(static_cast<size_t>(n));
  const uint32_t* source = keys;
  int64_t count = n;
  int64_t remaining = top_k;
  uint32_t prefix = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    int64_t histogram[256] = {0};
    for (int64_t j = 0; j < count; ++j) ++histogram[(source[j] >> shift) & 255u];
    uint32_t digit = 0;
    int64_t above = 0;  // survivors with a larger digit
    for (int d = 255; d >= 0; --d) {
      if (above + histogram[d] >= remaining) {
        digit = static_cast<uint32_t>(d);
        break;
      }
      above += histogram[d];
    }
    remaining -= above;
    prefix |= digit << shift;
    if (shift == 0) break;
    int64_t kept = 0;  // compaction in place is safe: kept <= j
    for (int64_t j = 0; j < count; ++j) {
      if (((source[j] >> shift) & 255u) == digit) buffer[kept++] = source[j];
    }
    source = buffer.data();
    count = kept;
  }
  return prefix;
}

template <typename scalar_t>
void sample_rows(const SampleParams& p, const scalar_t* logits, int64_t* codes, int64_t row_begin, int64_t row_end) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t t = static_cast<acc_t>(p.guidance);
  const acc_t one_plus_t = static_cast<acc_t>(1.0 + p.guidance);
  std::vector<float> guided(static_cast<size_t>(p.K));
  std::vector<uint32_t> keys(static_cast<size_t>(p.K));
  std::vector<uint32_t> select_buffer;
  std::vector<int32_t> candidates;
  std::vector<std::pair<uint32_t, float>> ranked;  // (key, weight) of the candidates, for top-p
  candidates.reserve(static_cast<size_t>(p.top_k > 0 ? p.top_k : p.K));
  for (int64_t row = row_begin; row < row_end; ++row) {
    const scalar_t* cond = logits + row * p.V + p.start;
    const scalar_t* uncond = logits + (p.rows + row) * p.V + p.start;
    float row_max = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < p.K; ++i) {
      const float g = guided_value<acc_t>(static_cast<acc_t>(cond[i]), static_cast<acc_t>(uncond[i]), one_plus_t, t);
      guided[i] = g;
      keys[i] = ordered_key(g);
      row_max = g > row_max ? g : row_max;
    }
    if (row_max == -std::numeric_limits<float>::infinity()) {
      codes[row] = -1;  // nothing finite to draw from
      continue;
    }
    const uint32_t kth = p.top_k > 0 ? kth_largest_key(keys.data(), p.K, p.top_k, select_buffer) : 0u;
    candidates.clear();
    for (int64_t i = 0; i < p.K; ++i) {
      if (keys[i] >= kth) candidates.push_back(static_cast<int32_t>(i));
    }
    uint32_t threshold = kth;
    if (p.top_p > 0.0) {
      // Keep the largest values whose mass first reaches top_p of the top-k mass: threshold = the key of the
      // value where the descending cumulative mass crosses top_p * Z (ties with it stay, as one group).
      ranked.clear();
      double total = 0.0;
      for (const int32_t i : candidates) {
        const float weight = std::exp(shifted_logit(guided[i], row_max));
        ranked.emplace_back(keys[i], weight);
        total += weight;
      }
      std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
      const double target = p.top_p * total;
      double mass = 0.0;
      for (size_t j = 0; j < ranked.size(); ++j) {
        mass += ranked[j].second;
        if (mass >= target && (j + 1 == ranked.size() || ranked[j + 1].first != ranked[j].first)) {
          threshold = ranked[j].first;
          break;
        }
      }
    }
    // Gumbel-max over the kept ids; ties keep the lowest id (candidates are in id order).
    float best = -std::numeric_limits<float>::infinity();
    int64_t choice = -1;
    for (const int32_t i : candidates) {
      if (keys[i] < threshold) continue;
      const float score = shifted_logit(guided[i], row_max) + gumbel_noise(p.seed, static_cast<uint64_t>(row),
                                                                            static_cast<uint32_t>(i));
      if (score > best) {
        best = score;
        choice = i;
      }
    }
    codes[row] = choice;
  }
}

at::Tensor sample_logits_cpu(const at::Tensor& logits, double guidance, int64_t top_k, double top_p,
                             int64_t image_token_start, int64_t image_vocab_size, int64_t seed) {
  SampleCall call = begin_sample_logits(logits, guidance, top_k, top_p, image_token_start, image_vocab_size);
  if (call.rows == 0) return call.codes;
  const SampleParams params{call.rows, call.V, call.start, call.K, call.top_k, call.top_p, guidance,
                            static_cast<uint64_t>(seed)};
  int64_t* codes = call.codes.data_ptr<int64_t>();
  TFX_DISPATCH_FLOATS(call.logits.scalar_type(), "sample_logits_cpu", [&] {
    const scalar_t* data = call.logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, call.rows, 1, [&](int64_t begin, int64_t end) {
      sample_rows<scalar_t>(params, data, codes, begin, end);
    });
  });
  return call.codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, CPU, m) { m.impl("sample_logits", &sample_logits_cpu); }

}  // namespace tokenflow_ext
