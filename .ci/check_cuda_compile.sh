#!/usr/bin/env bash
# Compile every csrc/**/*.cu with nvcc against the installed (CPU) torch headers, for each arch in
# TOKENFLOW_EXT_CUDA_ARCHS (default 90), then print registers / spills / shared memory per kernel
# (-Xptxas -v) and fail on any spill or on a kernel over its budget in csrc/cuda/register_budgets.txt.
# Catches CUDA compile errors and occupancy regressions on machines without a GPU.
# Usage: .ci/check_cuda_compile.sh [python]   (the python whose torch headers to use; default python3)
set -euo pipefail
PY=${1:-python3}
NVCC=${CUDACXX:-$(command -v nvcc || true)}
[ -n "$NVCC" ] || { echo "nvcc not found (set CUDACXX or put nvcc on PATH)"; exit 1; }
ARCHS=${TOKENFLOW_EXT_CUDA_ARCHS:-90}
mapfile -t INCLUDES < <("$PY" -c "import torch.utils.cpp_extension as e; print('\n'.join(e.include_paths()))")
ABI=$("$PY" -c "import torch; print(int(torch.compiled_with_cxx11_abi()))")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
[ ${#SOURCES[@]} -gt 0 ] || { echo "no .cu files found"; exit 1; }
failed=0
logs=()
for arch in ${ARCHS//;/ }; do
  for src in "${SOURCES[@]}"; do
    start=$(date +%s)
    log="$OUT/$(basename "$src").sm${arch}.log"
    # C10_CUDA_NO_CMAKE_CONFIGURE_FILE: the CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h.
    if "$NVCC" -std=c++20 -O3 --expt-relaxed-constexpr -Xcompiler=-fPIC -Xptxas -v \
        -gencode "arch=compute_${arch},code=sm_${arch}" \
        -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DTORCH_EXTENSION_NAME=_C \
        -Icsrc "${INCLUDES[@]/#/-I}" -c "$src" -o "$OUT/$(basename "$src").sm${arch}.o" 2>"$log"; then
      echo "nvcc OK   sm_${arch} ${src} ($(( $(date +%s) - start )) s)"
      logs+=("$log")
    else
      grep -v "^ptxas info\|bytes stack frame" "$log" || true
      echo "nvcc FAIL sm_${arch} ${src}"
      failed=1
    fi
  done
done
if [ ${#logs[@]} -gt 0 ]; then
  "$PY" "$(dirname "$0")/cuda_register_report.py" csrc/cuda/register_budgets.txt "${logs[@]}" || failed=1
fi
exit $failed
