#!/usr/bin/env bash
# Syntax-checks the CUDA registrations (csrc/cuda/*.cpp) against the installed torch's headers and
# the CUDA toolkit's, so they compile-check even with a CPU-only torch and no GPU (the CPU wheel
# ships the c10/cuda and ATen/cuda headers). Usage: cuda/check_bindings.sh [python] [cuda_home]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-python}"
CUDA_HOME="${2:-${CUDA_HOME:-/usr/local/cuda}}"
read -r -a TORCH_INCLUDES <<<"$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")"
# The CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h (it only defines
# C10_CUDA_BUILD_SHARED_LIBS); C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips that include.
# torch's headers want C++20, as in the real build.
FLAGS=(-std=c++20 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -DMARGINGATE_WITH_CUDA=1
       -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DMARGINGATE_TORCH_VERSION='"check"' -DMARGINGATE_COMPILER='"check"'
       -Icsrc -Icpp/include -Icuda/include "${TORCH_INCLUDES[@]}" -I"$CUDA_HOME/include")
pids=()
for src in csrc/cuda/*.cpp; do
  echo "g++ -fsyntax-only $src"
  g++ "${FLAGS[@]}" "$src" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ $status -eq 0 ] && echo "csrc/cuda: all bindings compile" || echo "csrc/cuda: FAILED"
exit $status
