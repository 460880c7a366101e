// Tensor-facing argument handling of sample_logits, shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "common/checks.h"

namespace tokenflow_ext {

constexpr const char* kSampleOp = "tokenflow_ext.sample_logits";

// Validated inputs and the allocated output of one sample_logits call.
struct SampleCall {
  at::Tensor logits;  // (2B, ..., V) contiguous
  at::Tensor codes;   // (B, ...) int64
  int64_t rows = 0;   // B * prod(...): rows drawn (the unconditional row of row r is r + rows)
  int64_t V = 0;      // row stride of logits
  int64_t start = 0;  // first image id
  int64_t K = 0;      // image vocabulary size
  int64_t top_k = 0;  // 0: no top-k (also for top_k >= K)
  double top_p = 0;   // 0: no top-p (also for top_p >= 1)
};

inline SampleCall begin_sample_logits(const at::Tensor& logits, double guidance, int64_t top_k, double top_p,
                                      int64_t image_token_start, int64_t image_vocab_size) {
  check_float_tensor(kSampleOp, "logits", logits);
  TORCH_CHECK(logits.dim() >= 2, kSampleOp, ": logits must be (2B, ..., V) with the conditional rows first, got shape ",
              logits.sizes());
  TORCH_CHECK(logits.size(0) % 2 == 0, kSampleOp, ": logits' first dim stacks the conditional and unconditional ",
              "rows, so it must be even, got ", logits.size(0));
  TORCH_CHECK(std::isfinite(guidance), kSampleOp, ": guidance must be finite, got ", guidance);
  TORCH_CHECK(!std::isnan(top_p), kSampleOp, ": top_p is NaN");
  SampleCall call;
  call.V = logits.size(-1);
  TORCH_CHECK(image_vocab_size >= 1 && image_token_start >= 0 && image_token_start + image_vocab_size <= call.V,
              kSampleOp, ": the image ids [image_token_start, image_token_start + image_vocab_size) = [",
              image_token_start, ", ", image_token_start + image_vocab_size, ") must be a non-empty range inside the ",
              call.V, " logits");
  call.start = image_token_start;
  call.K = image_vocab_size;
  call.top_k = (top_k <= 0 || top_k >= call.K) ? 0 : top_k;
  call.top_p = (top_p <= 0.0 || top_p >= 1.0) ? 0.0 : top_p;
  call.logits = logits.contiguous();
  std::vector<int64_t> out_shape(logits.sizes().begin(), logits.sizes().end() - 1);
  out_shape[0] /= 2;
  call.codes = at::empty(out_shape, logits.options().dtype(at::kLong));
  call.rows = call.codes.numel();
  return call;
}

}  // namespace tokenflow_ext
