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
