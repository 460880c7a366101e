// Input checks shared by the CPU and CUDA entry points. Every message names the op and the argument.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>

// Every op takes float32, float16, bfloat16 and float64.
#define TFX_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace tokenflow_ext {

// Data pointer of an optional input or output: null when undefined or empty (kernels read that as "absent").
template <typename scalar_t>
const scalar_t* maybe_ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
scalar_t* maybe_mutable_ptr(at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<scalar_t>() : nullptr;
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_same_device_dtype(const char* op, const char* name, const at::Tensor& t,
                                    const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; move them to one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; cast them to one dtype");
}

// One or two codebooks that share one index: semantic (K, Ds) and optional pixel (K, Dp).
struct CodebookPair {
  at::Tensor semantic;  // (K, Ds), contiguous
  at::Tensor pixel;     // (K, Dp), contiguous, or undefined
  int64_t K = 0;
  int64_t Ds = 0;
  int64_t Dp = 0;
  int64_t D() const { return Ds + Dp; }
  bool has_pixel() const { return pixel.defined(); }
};

inline CodebookPair check_codebooks(const char* op, const at::Tensor& semantic,
                                    const std::optional<at::Tensor>& pixel) {
  check_float_tensor(op, "semantic_codebook", semantic);
  TORCH_CHECK(semantic.dim() == 2, op, ": semantic_codebook must be 2-D (K, Ds), got shape ",
              semantic.sizes());
  TORCH_CHECK(semantic.size(0) >= 1, op, ": semantic_codebook has no rows (K = 0)");
  TORCH_CHECK(semantic.size(1) >= 1, op, ": semantic_codebook has zero width (Ds = 0)");
  CodebookPair books;
  books.semantic = semantic.contiguous();
  books.K = semantic.size(0);
  books.Ds = semantic.size(1);
  if (pixel.has_value() && pixel->defined()) {
    const at::Tensor& p = *pixel;
    check_float_tensor(op, "pixel_codebook", p);
    check_same_device_dtype(op, "pixel_codebook", p, "semantic_codebook", semantic);
    TORCH_CHECK(p.dim() == 2, op, ": pixel_codebook must be 2-D (K, Dp), got shape ", p.sizes());
    TORCH_CHECK(p.size(0) == books.K, op, ": the two codebooks share one index, so they need the same ",
                "number of rows; semantic_codebook has ", books.K, ", pixel_codebook has ", p.size(0));
    TORCH_CHECK(p.size(1) >= 1, op, ": pixel_codebook has zero width (Dp = 0)");
    books.pixel = p.contiguous();
    books.Dp = p.size(1);
  }
  return books;
}

// Accumulation type: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (so gradcheck sees fp64 arithmetic).
inline at::ScalarType accumulate_type_for(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The largest pixel_weight the accumulate type carries through a search: w * (||x_p|| + ||c_p||)^2 must stay
// finite for unit parts (at most 4 w), with headroom for the 2 x.c term, so w <= max / 16.
inline double max_pixel_weight(at::ScalarType acc_type) {
  return (acc_type == at::kDouble ? std::numeric_limits<double>::max()
                                  : static_cast<double>(std::numeric_limits<float>::max())) / 16.0;
}

// acc_type: the arithmetic type of the call (accumulate_type_for of the inputs' dtype).
inline void check_pixel_weight(const char* op, double pixel_weight, at::ScalarType acc_type) {
  TORCH_CHECK(std::isfinite(pixel_weight) && pixel_weight >= 0.0, op,
              ": pixel_weight must be finite and >= 0, got ", pixel_weight);
  const double limit = max_pixel_weight(acc_type);
  TORCH_CHECK(pixel_weight <= limit, op, ": pixel_weight = ", pixel_weight, " overflows the ", acc_type,
              " arithmetic of these inputs; it must be <= ", limit);
}

// x (..., Ds + Dp) → contiguous (N, D) view; checks dtype/device against the codebooks.
inline at::Tensor check_and_flatten_rows(const char* op, const at::Tensor& x, const CodebookPair& books) {
  check_float_tensor(op, "x", x);
  check_same_device_dtype(op, "x", x, "semantic_codebook", books.semantic);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim (..., D), got a 0-dim tensor");
  TORCH_CHECK(x.size(-1) == books.D(), op, ": the last dim of x is ", x.size(-1), " but the codebooks need ",
              books.D(), " (semantic ", books.Ds, books.has_pixel() ? " + pixel " : "",
              books.has_pixel() ? std::to_string(books.Dp) : std::string(), ")");
  return x.reshape({-1, books.D()}).contiguous();
}

inline at::Tensor check_indices(const char* op, const at::Tensor& indices, const at::Tensor& codebook) {
  TORCH_CHECK(indices.defined(), op, ": indices is undefined");
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, op,
              ": indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(indices.device() == codebook.device(), op, ": indices is on ", indices.device(),
              " but the codebooks are on ", codebook.device());
  return indices.reshape({-1}).to(at::kLong).contiguous();
}

}  // namespace tokenflow_ext
