// Device-side helpers shared by the .cu files (never included from .cpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/check.hpp"
#include "cuda/device_buffer.hpp"

namespace sinkscope::cuda::k {

__device__ __forceinline__ float bf2f(bf16_bits v) {
  return __uint_as_float(static_cast<uint32_t>(v) << 16);
}
__device__ __forceinline__ bf16_bits f2bf(float v) {
  const __nv_bfloat16 b = __float2bfloat16_rn(v);
  return *reinterpret_cast<const bf16_bits*>(&b);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = lane < warps ? partial[lane] : T(0);
  total = warp_sum(total);
  return total;
}

__device__ __forceinline__ uint32_t ld32(const bf16_bits* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// D += A B on the tensor cores: A 16x16 bf16 (row), B 16x8 bf16 (col), D 16x8 fp32. Fragments as
// PTX's m16n8k16: lane (g = lane / 4, t = lane % 4) holds A rows g, g + 8 at columns 2t, 2t + 1
// (a0, a1) and 2t + 8, 2t + 9 (a2, a3); B column g at rows 2t, 2t + 1 (b0) and 2t + 8, 2t + 9
// (b1); D rows g (d0, d1) and g + 8 (d2, d3) at columns 2t, 2t + 1.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as packed bf16 (lo in the low half).
// Two values rounded to bf16 by one conversion (cvt.rn.bf16x2.f32), lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&b);
}

// 16-byte asynchronous copies from global to shared memory (cp.async.cg); with valid false the
// 16 bytes are zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(uint32_t smem_addr, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's copy groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

inline unsigned grid_for(int64_t n, int threads, int64_t cap = 1 << 20) {
  int64_t g = (n + threads - 1) / threads;
  if (g > cap) g = cap;
  if (g < 1) g = 1;
  return static_cast<unsigned>(g);
}

// Programmatic dependent launch (compute capability 9.0 on): a kernel started by
// launch_dependent() may be scheduled while the kernel before it in the stream is finishing, so
// the launch's latency hides behind that kernel's tail. Such a kernel calls dependency_wait()
// before its first memory access: it returns once the kernel before has completed and its writes
// are visible, so the stream's order holds for everything the kernel reads and writes. It may
// call dependents_may_launch() (after the wait) to let the next such kernel be scheduled early;
// that one still waits for this one to complete. On other devices and builds these are no-ops and
// the launch is an ordinary one.
__device__ __forceinline__ void dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void dependents_may_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// The start of every kernel launched with launch_dependent(): the wait, then the next one may be
// scheduled.
__device__ __forceinline__ void dependent_kernel_start() {
  dependency_wait();
  dependents_may_launch();
}
// The current device takes programmatic dependent launches (compute capability 9.0 or later).
bool dependent_launch_supported();
template <typename... Params, typename... Args>
void launch_dependent(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                      size_t smem, cudaStream_t s, Args... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cfg.attrs = &attr;
  cfg.numAttrs = dependent_launch_supported() ? 1 : 0;
  check_status(cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...), name, __FILE__,
               __LINE__);
}

}  // namespace sinkscope::cuda::k
