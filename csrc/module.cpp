// The pybind11 `_C` module carries build information only; the ops register through TORCH_LIBRARY
// (see codebook_*.cpp) when this shared library is loaded.
#include <pybind11/pybind11.h>

#ifndef TOKENFLOW_EXT_WITH_CUDA
#define TOKENFLOW_EXT_WITH_CUDA 0
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "tokenflow_ext compiled kernels (ops live in torch.ops.tokenflow_ext)";
  m.attr("__version__") = TOKENFLOW_EXT_VERSION;
  m.attr("torch_version") = TOKENFLOW_EXT_TORCH_VERSION;
  m.attr("with_cuda") = static_cast<bool>(TOKENFLOW_EXT_WITH_CUDA);
  m.attr("cuda_archs") = TOKENFLOW_EXT_CUDA_ARCHS;
}
