// Schema of the sample_logits family: fused classifier-free-guided top-k / top-p sampling of image tokens.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tokenflow_ext, m) {
  // logits (2B, ..., V): the conditional rows, then the unconditional ones. Per row (b, ...), over the image
  // ids [image_token_start, image_token_start + image_vocab_size):
  //   g = (1 + guidance) * cond - guidance * uncond; keep g >= the top_k-th largest (top_k <= 0: all);
  //   then keep the largest values whose cumulative softmax mass first reaches top_p (top_p <= 0 or >= 1: all);
  //   draw one code = argmax over the kept ids of (g - max g) + Gumbel(seed, row, id) (Philox-4x32-10).
  // codes (B, ...) int64 in [0, image_vocab_size), or -1 for a row with no finite guided logit.
  m.def(
      "sample_logits(Tensor logits, float guidance, int top_k, float top_p, int image_token_start, "
      "int image_vocab_size, int seed) -> Tensor codes");
}
