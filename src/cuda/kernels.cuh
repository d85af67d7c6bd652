// Host launchers of the CUDA backend's kernels (one thin launcher per kernel family; the kernels
// themselves live in the .cu files named beside each group). Plain pointers, no CUDA device types:
// bf16 tensors travel as bf16_bits (uint16_t). Every launcher returns at once (stream order) and
// does nothing for empty sizes; launch errors throw RuntimeFailure through CUDA_CHECK_LAUNCH.
// Row-major everywhere; "ld" is a row stride in elements.
//
// One header per op family, beside its .cu file; this one includes them all (the backend's view).
#pragma once

#include "cuda/attention.cuh"
#include "cuda/circuit_kernels.cuh"
#include "cuda/family_kernels.cuh"
#include "cuda/grouped_gemm.cuh"
#include "cuda/mla_kernels.cuh"
#include "cuda/moe_kernels.cuh"
#include "cuda/norm_kernels.cuh"
#include "cuda/util_kernels.cuh"
