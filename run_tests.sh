#!/usr/bin/env bash
# The whole test suite: installs what is needed (Slurm included, for the end-to-end Slurm test),
# builds, and runs every ctest label except `gpu` (which needs an NVIDIA GPU; see docs/gpu-backend.md).
# Where the CUDA toolkit is present the CUDA backend is compiled too (not run).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$root"
SINKSCOPE_TEST_DEPS=1 scripts/install-deps.sh
scripts/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ctest --test-dir build --output-on-failure -LE gpu -j 2
if [ -x /usr/local/cuda/bin/nvcc ] && [ "${SINKSCOPE_SKIP_CUDA_BUILD:-0}" != 1 ] &&
  { [ -f /usr/local/cuda/include/nccl.h ] || [ -f /usr/include/nccl.h ]; }; then
  echo "sinkscope: compiling the CUDA backend (no GPU needed to compile)"
  cmake -S "$root" -B "$root/build-cuda" -DCMAKE_BUILD_TYPE=Release -DSINKSCOPE_CUDA=ON >/dev/null
  cmake --build "$root/build-cuda" -j "${SINKSCOPE_JOBS:-$(nproc)}"
else
  echo "sinkscope: CUDA toolkit with NCCL not found: the CUDA backend was not compiled"
fi
