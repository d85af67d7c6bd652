// Host launchers of util_kernels.cu (see kernels.cuh for the conventions shared by every launcher:
// plain pointers, bf16 as bf16_bits, stream order, empty sizes do nothing, launch errors throw).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "cuda/device_buffer.hpp"

namespace sinkscope::cuda::k {

// Deterministic pseudo-random weights for benchmarks: element (row_offset + r, col_offset + c) of
// a [*, global_cols] tensor gets a uniform value of standard deviation `stddev`, so any sharding of
// the same tensor id sees the same global tensor.
void fill_random_bf16(bf16_bits* dst, int64_t rows, int64_t cols, int64_t row_offset,
                      int64_t col_offset, int64_t global_cols, uint64_t seed, uint64_t tensor_id,
                      float stddev, cudaStream_t s);
void fill_random_f32(float* dst, int64_t rows, int64_t cols, int64_t row_offset, int64_t col_offset,
                     int64_t global_cols, uint64_t seed, uint64_t tensor_id, float stddev,
                     cudaStream_t s);
void fill(float* dst, int64_t n, float value, cudaStream_t s);
// `count` d x d matrices m (fp32, symmetric up to rounding) -> hi = bf16(v), lo = bf16(v - hi)
// with v = (m + m^T) / 2: v ~= hi + lo to about 16 significant bits, hi and lo exactly symmetric.
void gram_split(const float* m, int64_t count, int d, bf16_bits* hi, bf16_bits* lo, cudaStream_t s);
void bf16_to_f32(const bf16_bits* src, int64_t n, float* dst, cudaStream_t s);
void f32_to_bf16(const float* src, int64_t n, bf16_bits* dst, cudaStream_t s);
// f16 bits -> bf16 (exact f16 -> fp32, then round to nearest even: the host's f16 -> fp32 -> bf16
// of the fp32 loading path, bit for bit). Used to load f16 checkpoints.
void f16_to_bf16(const uint16_t* src, int64_t n, bf16_bits* dst, cudaStream_t s);
// Finds the first inf or NaN among n stored values of `elem_size` bytes (2: bf16 when `f16` is
// false, f16 when true; 4: f32) by their exponent bits, and lowers *first to tag + its index
// (atomicMin) when there is one. The caller keeps one slot, initialised to ~0, for many calls:
// with tag = piece number << 32 it then names the first non-finite value of the first piece that
// has one. n < 2^32.
void find_non_finite(const void* values, int64_t n, int elem_size, bool f16, uint64_t tag,
                     unsigned long long* first, cudaStream_t s);

}  // namespace sinkscope::cuda::k
