// Schema of the codebook_search family: fused distance + argmin over one or two codebooks sharing one index.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tokenflow_ext, m) {
  // x (..., Ds + Dp); semantic_codebook (K, Ds); pixel_codebook (K, Dp) or None.
  // d(n, k) = ||x_s(n) - c_s(k)||^2 + pixel_weight * ||x_p(n) - c_p(k)||^2 (parts l2-normalised if l2_norm)
  // indices (...) int64 = argmin_k d (lowest k on ties); min_distance (...) = d(n, indices(n)),
  // float32 (float64 for float64 inputs).
  m.def(
      "codebook_search(Tensor x, Tensor semantic_codebook, Tensor? pixel_codebook, float pixel_weight, "
      "bool l2_norm) -> (Tensor indices, Tensor min_distance)");
}
