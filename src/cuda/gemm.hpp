// cuBLAS for the backend's matrix products, in row-major terms (weights are stored [out, in], as
// in the checkpoint). bf16 operands accumulate in fp32; fp32 operands run in plain fp32 or, where
// asked, TF32.
//
// The expert products (grouped_nt) take one of two routes. cublasGemmGroupedBatchedEx is one call
// for all experts but, on an H200 with cuBLAS 13, runs big groups slowly (the Qwen3-30B-A3B expert
// products at 8 x 4096, about 2048 rows per expert: 9.0 ms per layer); one cublasGemmEx per
// non-empty expert, spread round-robin over 4 streams forked from and joined back into the
// backend's stream (one cuBLAS handle, hence one workspace, per stream), runs those in 4.95 ms but
// pays a host call per expert, which small groups cannot hide (1 x 4096, about 256 rows per
// expert: 2.8 ms against 1.27 grouped). So by default (auto) groups averaging fewer than
// kPerExpertMinRows rows take the grouped call, larger ones the per-expert products
// (docs/gpu-backend.md has the measurements). SINKSCOPE_CUDA_EXPERT_GEMM=grouped or per-expert
// forces a route; SINKSCOPE_CUDA_EXPERT_STREAMS=N (1..16) sets the streams of the per-expert route
// (1: the backend's stream only). Where this cuBLAS refuses the grouped call's types, the
// per-expert route serves every size.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/device_buffer.hpp"

namespace sinkscope::cuda {

enum class Dt { kBF16, kF32 };
enum class Math { kDefault, kTF32 };

struct Operand {
  const void* ptr;
  Dt type;
  int64_t ld;
  int64_t stride = 0;  // batch stride in elements
};
struct Result {
  void* ptr;
  Dt type;
  int64_t ld;
  int64_t stride = 0;
};

class Blas {
 public:
  explicit Blas(cudaStream_t stream);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;

  // C[M, N] = alpha * A[M, K] B[N, K]^T + beta * C, `batch` times with the operands' strides.
  void nt(int64_t M, int64_t N, int64_t K, Operand A, Operand B, Result C, float alpha = 1.f,
          float beta = 0.f, int batch = 1, Math math = Math::kDefault);
  // C[M, N] = alpha * A[M, K] B[K, N] + beta * C.
  void nn(int64_t M, int64_t N, int64_t K, Operand A, Operand B, Result C, float alpha = 1.f,
          float beta = 0.f, int batch = 1, Math math = Math::kDefault);
  // C[M, N] = alpha * A[K, M]^T B[K, N] + beta * C.
  void tn(int64_t M, int64_t N, int64_t K, Operand A, Operand B, Result C, float alpha = 1.f,
          float beta = 0.f, int batch = 1, Math math = Math::kDefault);

  // Expert products: for each group g with rows[g] > 0, C_g[rows[g], N] = A_g[rows[g], K] W_g[N,
  // K]^T, A_g = A + row_offset[g] * K (bf16), W_g = W + weight_index[g] * N * K (bf16), C_g = C +
  // row_offset[g] * N (type ct). Row-major, packed.
  void grouped_nt(const std::vector<int>& rows, const std::vector<int64_t>& row_offset,
                  const std::vector<int64_t>& weight_index, int64_t N, int64_t K,
                  const bf16_bits* A, const bf16_bits* W, void* C, Dt ct);

  cublasHandle_t handle() const { return handle_; }
  // How the expert products run, for logs and benchmarks.
  std::string expert_strategy() const;
  static constexpr int kPerExpertMinRows = 768;
  // SINKSCOPE_CUDA_EXPERT_GEMM leaves the backend free to use its Hopper kernel (auto, wgmma), or
  // demands it (wgmma).
  bool allows_wgmma() const { return route_ == Route::kAuto || route_ == Route::kWgmma; }
  bool requires_wgmma() const { return route_ == Route::kWgmma; }

 private:
  void call(cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k,
            const void* A, Dt at, int64_t lda, int64_t sa, const void* B, Dt bt, int64_t ldb,
            int64_t sb, void* C, Dt ct, int64_t ldc, int64_t sc, float alpha, float beta, int batch,
            Math math);

  void per_expert(const std::vector<int>& live, const std::vector<int>& rows,
                  const std::vector<int64_t>& row_offset, const std::vector<int64_t>& weight_index,
                  int64_t N, int64_t K, const bf16_bits* A, const bf16_bits* W, void* C, Dt ct);

  cublasHandle_t handle_ = nullptr;
  cudaStream_t stream_ = nullptr;
  // The expert streams (none when SINKSCOPE_CUDA_EXPERT_STREAMS=1): stream, handle, and the event
  // each one records when its share is done.
  struct Side {
    cudaStream_t stream = nullptr;
    cublasHandle_t handle = nullptr;
    cudaEvent_t done = nullptr;
  };
  std::vector<Side> sides_;
  cudaEvent_t fork_ = nullptr;
  enum class Route { kAuto, kWgmma, kGrouped, kPerExpert };
  Route route_ = Route::kAuto;
  // Whether cuBLAS takes the grouped call for a result type (cleared when it refuses).
  bool grouped_bf16_ = true, grouped_f32_ = true;
  DeviceBuffer<const void*> ptr_arrays_;
};

}  // namespace sinkscope::cuda
