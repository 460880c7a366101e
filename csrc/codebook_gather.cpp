// Schema of the codebook_gather family: rows of both codebooks by one shared index, and its backward.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tokenflow_ext, m) {
  // indices (...) int64 in [0, K); semantic_codebook (K, Ds); pixel_codebook (K, Dp) or None.
  // rows (..., Ds + Dp) = [c_s(idx), c_p(idx)], each part l2-normalised if l2_norm.
  // `deterministic` is only read by the backward (sorted segment sums instead of atomics on CUDA).
  m.def(
      "codebook_gather(Tensor indices, Tensor semantic_codebook, Tensor? pixel_codebook, bool l2_norm, "
      "bool deterministic) -> Tensor");
  // grad_rows (..., Ds + Dp) -> (grad_semantic (K, Ds), grad_pixel (K, Dp), or an empty tensor without a
  // pixel codebook): scatter-add by index, then back through the l2-normalisation when it was applied.
  m.def(
      "codebook_gather_backward(Tensor grad_rows, Tensor indices, Tensor semantic_codebook, "
      "Tensor? pixel_codebook, bool l2_norm, bool deterministic) -> (Tensor, Tensor)");
}

// ---- autograd (shared by every backend) ----
// In C++ rather than torch.library.register_autograd: the quantizer gathers on every training step, and the
// Python wrapper's per-call cost showed at small N. Under create_graph (grad mode on inside backward) the
// gradient is the same scatter-add and normalisation backward in differentiable ATen ops (double backward).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>

#include "common/checks.h"
#include "common/op_name.h"
#include "common/row_math.h"

namespace tokenflow_ext {
namespace {

// d/dv of v / max(||v||, eps) applied to grad, row-wise; below eps the clamp stops the norm's gradient.
at::Tensor unit_rows_backward_composite(const at::Tensor& v, const at::Tensor& grad) {
  const at::Tensor norm = v.norm(2, {-1}, true);
  const at::Tensor denominator = norm.clamp_min(kNormEps);
  const at::Tensor unit = v / denominator;
  const at::Tensor projection = (unit * grad).sum({-1}, true);
  return (grad - at::where(norm > kNormEps, unit * projection, at::zeros_like(projection))) / denominator;
}

// codebook_gather_backward in differentiable ATen ops: a scatter-add by index in the accumulate dtype, then
// back through the normalisation.
at::Tensor gather_part_backward_composite(const at::Tensor& book, const at::Tensor& grad_part, const at::Tensor& flat,
                                          bool l2_norm) {
  const auto acc = accumulate_type_for(book.scalar_type());
  at::Tensor summed = at::zeros(book.sizes(), book.options().dtype(acc)).index_add(0, flat, grad_part.to(acc));
  if (l2_norm) summed = unit_rows_backward_composite(book.to(acc), summed);
  return summed.to(book.scalar_type());
}

struct GatherFunction : public torch::autograd::Function<GatherFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& indices,
                            const at::Tensor& semantic_codebook, const std::optional<at::Tensor>& pixel_codebook,
                            bool l2_norm, bool deterministic) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(TFX_OP_NAME(tokenflow_ext, "codebook_gather"), "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 bool, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor rows = op.call(indices, semantic_codebook, pixel_codebook, l2_norm, deterministic);
    const bool has_pixel = pixel_codebook.has_value() && pixel_codebook->defined();
    ctx->saved_data["l2_norm"] = l2_norm;
    ctx->saved_data["deterministic"] = deterministic;
    ctx->saved_data["has_pixel"] = has_pixel;
    ctx->save_for_backward({indices, semantic_codebook, has_pixel ? *pixel_codebook : at::Tensor()});
    return rows;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto backward_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow(TFX_OP_NAME(tokenflow_ext, "codebook_gather_backward"), "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&, bool, bool)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &indices = saved[0], &semantic = saved[1], &pixel = saved[2];
    const bool l2_norm = ctx->saved_data["l2_norm"].toBool();
    const bool has_pixel = ctx->saved_data["has_pixel"].toBool();
    const at::Tensor& grad_rows = grads[0];
    at::Tensor grad_semantic, grad_pixel;
    if (at::GradMode::is_enabled()) {  // create_graph: the same gradient, differentiable
      const at::Tensor flat = indices.reshape({-1}).to(at::kLong);
      const at::Tensor flat_grads = grad_rows.reshape({flat.numel(), -1});
      const int64_t semantic_dim = semantic.size(-1);
      grad_semantic = gather_part_backward_composite(semantic, flat_grads.narrow(1, 0, semantic_dim), flat, l2_norm);
      if (has_pixel) {
        grad_pixel = gather_part_backward_composite(
            pixel, flat_grads.narrow(1, semantic_dim, flat_grads.size(1) - semantic_dim), flat, l2_norm);
      }
    } else {
      std::tie(grad_semantic, grad_pixel) =
          backward_op.call(grad_rows, indices, semantic, has_pixel ? std::optional<at::Tensor>(pixel) : std::nullopt,
                           l2_norm, ctx->saved_data["deterministic"].toBool());
    }
    return {at::Tensor(), ctx->needs_input_grad(1) ? grad_semantic : at::Tensor(),
            has_pixel && ctx->needs_input_grad(2) ? grad_pixel : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor codebook_gather_autograd(const at::Tensor& indices, const at::Tensor& semantic_codebook,
                                    const std::optional<at::Tensor>& pixel_codebook, bool l2_norm, bool deterministic) {
  return GatherFunction::apply(indices, semantic_codebook, pixel_codebook, l2_norm, deterministic);
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, Autograd, m) { m.impl("codebook_gather", &codebook_gather_autograd); }

}  // namespace tokenflow_ext
