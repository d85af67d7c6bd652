#!/usr/bin/env bash
# Installs the Debian packages sinkscope needs to build, test and report (Debian 12, as root).
# Idempotent: packages already present are not reinstalled.
set -euo pipefail
packages=(
  build-essential cmake pkg-config git
  libopenmpi-dev openmpi-bin
  libhdf5-dev hdf5-tools
  libboost-serialization-dev
  libgtest-dev
  libopenblas-dev
  nlohmann-json3-dev libcli11-dev
  python3 python3-numpy python3-h5py python3-matplotlib
  python3-xarray python3-h5netcdf python3-pandas python3-pip python3-setuptools
  procps
)
# The test suite also needs Slurm (end-to-end Slurm test), iproute2 (network namespaces of the
# multi-node test; unshare/nsenter come with util-linux) and clang with libFuzzer (fuzz run).
if [ "${SINKSCOPE_TEST_DEPS:-0}" = 1 ]; then packages+=(slurm-wlm munge iproute2 clang libclang-rt-14-dev bc); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "sinkscope: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# cuDNN 9 for the CUDA backend's attention (optional, docs/gpu-backend.md "Attention"): on a machine
# with an NVIDIA GPU, CUDA 13 at /usr/local/cuda and NVIDIA's CUDA apt repository configured (where
# CUDA 13 comes from), install its cuDNN; elsewhere the build uses its own attention kernels.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
  [ -x /usr/local/cuda/bin/nvcc ] && [ "${SINKSCOPE_CUDNN:-AUTO}" != OFF ]; then
  cudnn=libcudnn9-dev-cuda-13
  if dpkg-query -W -f='${Status}' "$cudnn" 2>/dev/null | grep -q "install ok installed"; then
    :
  elif apt-cache show "$cudnn" >/dev/null 2>&1; then
    echo "sinkscope: installing $cudnn (cuDNN's fused attention for the CUDA backend)"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$cudnn" >/dev/null
  else
    echo "sinkscope: $cudnn is not in the configured apt sources: the CUDA backend uses its own attention kernels"
  fi
fi
