// Fills, conversions and the counter-based random weights of the synthetic (benchmark) backend.
#include <cuda_fp16.h>

#include <atomic>

#include "cuda/device_common.cuh"
#include "cuda/util_kernels.cuh"

namespace sinkscope::cuda::k {
namespace {

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform on [-sqrt(3), sqrt(3)) (unit variance) from the element's global index.
__device__ __forceinline__ float unit_uniform(uint64_t seed, uint64_t tensor_id, uint64_t index) {
  const uint64_t h = splitmix64(splitmix64(seed ^ splitmix64(tensor_id)) + index);
  const float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);  // [0, 1)
  return (2.f * u - 1.f) * 1.7320508075688772f;
}

template <typename Out>
__global__ void fill_random_kernel(Out* __restrict__ dst, int64_t rows, int64_t cols,
                                   int64_t row_offset, int64_t col_offset, int64_t global_cols,
                                   uint64_t seed, uint64_t tensor_id, float stddev) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const uint64_t global = static_cast<uint64_t>((row_offset + r) * global_cols + col_offset + c);
    const float v = unit_uniform(seed, tensor_id, global) * stddev;
    if constexpr (sizeof(Out) == 2)
      dst[i] = f2bf(v);
    else
      dst[i] = v;
  }
}

__global__ void fill_kernel(float* __restrict__ dst, int64_t n, float value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = value;
}

__global__ void gram_split_kernel(const float* __restrict__ m, int64_t count, int d,
                                  bf16_bits* __restrict__ hi, bf16_bits* __restrict__ lo) {
  const int64_t n = count * d * d;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = i / (static_cast<int64_t>(d) * d) * d * d;
    const int r = static_cast<int>((i - base) / d), c = static_cast<int>((i - base) % d);
    // (a + b) / 2 is the same float for (r, c) and (c, r): the parts are exactly symmetric.
    const float v = 0.5f * (m[i] + m[base + static_cast<int64_t>(c) * d + r]);
    const bf16_bits h = f2bf(v);
    hi[i] = h;
    lo[i] = f2bf(v - bf2f(h));
  }
}

__global__ void bf16_to_f32_kernel(const bf16_bits* __restrict__ src, int64_t n,
                                   float* __restrict__ dst) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = bf2f(src[i]);
}

__global__ void f32_to_bf16_kernel(const float* __restrict__ src, int64_t n,
                                   bf16_bits* __restrict__ dst) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = f2bf(src[i]);
}

__global__ void f16_to_bf16_kernel(const uint16_t* __restrict__ src, int64_t n,
                                   bf16_bits* __restrict__ dst) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = f2bf(__half2float(__ushort_as_half(src[i])));
}

// Exponent bits all ones (inf or NaN) for each stored width; each thread keeps its first hit and
// only threads with one touch the slot, so a finite piece costs one read of its values.
template <typename Bits>
__global__ void find_non_finite_kernel(const Bits* __restrict__ v, int64_t n, Bits exponent,
                                       uint64_t tag, unsigned long long* first) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += stride) {
    if ((v[i] & exponent) == exponent) {
      atomicMin(first, static_cast<unsigned long long>(tag + static_cast<uint64_t>(i)));
      return;  // this thread's later elements come after i
    }
  }
}

}  // namespace

void find_non_finite(const void* values, int64_t n, int elem_size, bool f16, uint64_t tag,
                     unsigned long long* first, cudaStream_t s) {
  if (n == 0) return;
  if (elem_size == 4) {
    find_non_finite_kernel<uint32_t><<<grid_for(n, 256, 4096), 256, 0, s>>>(
        static_cast<const uint32_t*>(values), n, 0x7f800000u, tag, first);
  } else {
    find_non_finite_kernel<uint16_t><<<grid_for(n, 256, 4096), 256, 0, s>>>(
        static_cast<const uint16_t*>(values), n, static_cast<uint16_t>(f16 ? 0x7c00u : 0x7f80u),
        tag, first);
  }
  CUDA_CHECK_LAUNCH("find_non_finite_kernel");
}

void fill_random_bf16(bf16_bits* dst, int64_t rows, int64_t cols, int64_t row_offset,
                      int64_t col_offset, int64_t global_cols, uint64_t seed, uint64_t tensor_id,
                      float stddev, cudaStream_t s) {
  if (rows * cols == 0) return;
  fill_random_kernel<bf16_bits><<<grid_for(rows * cols, 256, 65536), 256, 0, s>>>(
      dst, rows, cols, row_offset, col_offset, global_cols, seed, tensor_id, stddev);
  CUDA_CHECK_LAUNCH("fill_random_kernel<bf16>");
}

void fill_random_f32(float* dst, int64_t rows, int64_t cols, int64_t row_offset, int64_t col_offset,
                     int64_t global_cols, uint64_t seed, uint64_t tensor_id, float stddev,
                     cudaStream_t s) {
  if (rows * cols == 0) return;
  fill_random_kernel<float><<<grid_for(rows * cols, 256, 65536), 256, 0, s>>>(
      dst, rows, cols, row_offset, col_offset, global_cols, seed, tensor_id, stddev);
  CUDA_CHECK_LAUNCH("fill_random_kernel<f32>");
}

void fill(float* dst, int64_t n, float value, cudaStream_t s) {
  if (n == 0) return;
  fill_kernel<<<grid_for(n, 256, 65536), 256, 0, s>>>(dst, n, value);
  CUDA_CHECK_LAUNCH("fill_kernel");
}

void gram_split(const float* m, int64_t count, int d, bf16_bits* hi, bf16_bits* lo,
                cudaStream_t s) {
  const int64_t n = count * d * d;
  if (n == 0) return;
  gram_split_kernel<<<grid_for(n, 256, 65536), 256, 0, s>>>(m, count, d, hi, lo);
  CUDA_CHECK_LAUNCH("gram_split_kernel");
}

void bf16_to_f32(const bf16_bits* src, int64_t n, float* dst, cudaStream_t s) {
  if (n == 0) return;
  bf16_to_f32_kernel<<<grid_for(n, 256, 65536), 256, 0, s>>>(src, n, dst);
  CUDA_CHECK_LAUNCH("bf16_to_f32_kernel");
}

void f32_to_bf16(const float* src, int64_t n, bf16_bits* dst, cudaStream_t s) {
  if (n == 0) return;
  f32_to_bf16_kernel<<<grid_for(n, 256, 65536), 256, 0, s>>>(src, n, dst);
  CUDA_CHECK_LAUNCH("f32_to_bf16_kernel");
}

void f16_to_bf16(const uint16_t* src, int64_t n, bf16_bits* dst, cudaStream_t s) {
  if (n == 0) return;
  f16_to_bf16_kernel<<<grid_for(n, 256, 65536), 256, 0, s>>>(src, n, dst);
  CUDA_CHECK_LAUNCH("f16_to_bf16_kernel");
}

bool dependent_launch_supported() {
  static std::atomic<int> known[64];  // per device: 0 unknown, 1 no, 2 yes
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) return false;
  const int k = known[dev].load();
  if (k != 0) return k == 2;
  int major = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  known[dev].store(major >= 9 ? 2 : 1);
  return major >= 9;
}

}  // namespace sinkscope::cuda::k
