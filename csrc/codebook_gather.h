// Tensor-facing argument handling of codebook_gather and its backward, shared by the CPU and CUDA entries.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/output_memory.h"

namespace tokenflow_ext {

constexpr const char* kGatherOp = "tokenflow_ext.codebook_gather";
constexpr const char* kGatherBackwardOp = "tokenflow_ext.codebook_gather_backward";

struct GatherCall {
  CodebookPair books;
  at::Tensor indices;  // (N) int64 contiguous
  at::Tensor rows;     // indices.shape + (D,), codebook dtype
  int64_t N = 0;
};

inline GatherCall begin_codebook_gather(const at::Tensor& indices, const at::Tensor& semantic_codebook,
                                        const std::optional<at::Tensor>& pixel_codebook) {
  GatherCall call;
  call.books = check_codebooks(kGatherOp, semantic_codebook, pixel_codebook);
  call.indices = check_indices(kGatherOp, indices, call.books.semantic);
  call.N = call.indices.numel();
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.push_back(call.books.D());
  call.rows = empty_output(shape, call.books.semantic.options());
  return call;
}

struct GatherBackwardCall {
  CodebookPair books;
  at::Tensor indices;        // (N) int64 contiguous
  at::Tensor grads;          // (N, D) contiguous
  at::Tensor grad_semantic;  // (K, Ds)
  at::Tensor grad_pixel;     // (K, Dp), or (0,) without a pixel codebook
  int64_t N = 0;
};

inline GatherBackwardCall begin_codebook_gather_backward(const at::Tensor& grad_rows, const at::Tensor& indices,
                                                         const at::Tensor& semantic_codebook,
                                                         const std::optional<at::Tensor>& pixel_codebook) {
  constexpr const char* op = kGatherBackwardOp;
  GatherBackwardCall call;
  call.books = check_codebooks(op, semantic_codebook, pixel_codebook);
  call.indices = check_indices(op, indices, call.books.semantic);
  call.N = call.indices.numel();
  check_float_tensor(op, "grad_rows", grad_rows);
  check_same_device_dtype(op, "grad_rows", grad_rows, "semantic_codebook", call.books.semantic);
  const int64_t D = call.books.D();
  TORCH_CHECK(grad_rows.dim() >= 1 && grad_rows.size(-1) == D && grad_rows.numel() == call.N * D, op,
              ": grad_rows must have shape indices.shape + (", D, ",), got ", grad_rows.sizes(),
              " for indices of shape ", indices.sizes());
  call.grads = grad_rows.reshape({-1, D}).contiguous();
  call.grad_semantic = empty_output_like(call.books.semantic);
  call.grad_pixel = call.books.has_pixel() ? empty_output_like(call.books.pixel)
                                           : at::empty({0}, call.books.semantic.options());
  return call;
}

}  // namespace tokenflow_ext
