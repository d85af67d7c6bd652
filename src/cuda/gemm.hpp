// cuBLAS for the backend's matrix products, in row-major terms (weights are stored [out, in], as
// in the checkpoint). bf16 operands accumulate in fp32; fp32 operands run in plain fp32 or, where
// asked, TF32.
//
// The expert products (grouped_nt) are one cublasGemmEx per non-empty expert, spread round-robin
// over 4 streams forked from and joined back into the backend's stream (one cuBLAS handle, hence
// one workspace, per stream). On an H200 this runs the Qwen3-30B-A3B expert products at 8 x 4096 in
// 4.95 ms per layer, against 5.51 ms on one stream and 9.0 ms through cublasGemmGroupedBatchedEx
// (docs/gpu-backend.md). SINKSCOPE_CUDA_EXPERT_STREAMS=N picks N streams (1: the backend's stream
// only); SINKSCOPE_CUDA_EXPERT_GEMM=grouped takes cublasGemmGroupedBatchedEx instead (falling back
// to the per-expert products where this cuBLAS refuses the types).
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
  // Whether grouped_nt tries cublasGemmGroupedBatchedEx (SINKSCOPE_CUDA_EXPERT_GEMM=grouped);
  // cleared per result type when cuBLAS refuses it.
  bool grouped_bf16_ = false, grouped_f32_ = false;
  DeviceBuffer<const void*> ptr_arrays_;
};

}  // namespace sinkscope::cuda
