#include "cuda/gemm.hpp"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>

#include "cuda/check.hpp"
#include "sinkscope/error.hpp"

namespace sinkscope::cuda {
namespace {

cudaDataType_t dtype(Dt t) { return t == Dt::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }

constexpr int kExpertStreams = 4;

int as_int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX)
    throw RuntimeFailure(std::string("cuBLAS call: ") + what + " = " + std::to_string(v) +
                         " does not fit an int");
  return static_cast<int>(v);
}

}  // namespace

Blas::Blas(cudaStream_t stream) : stream_(stream) {
  // The expert-product settings first: a bad value fails before anything is created.
  if (const char* v = std::getenv("SINKSCOPE_CUDA_EXPERT_GEMM"); v && *v) {
    const std::string how(v);
    if (how != "auto" && how != "wgmma" && how != "grouped" && how != "per-expert")
      throw InputError("SINKSCOPE_CUDA_EXPERT_GEMM: unknown value '" + how +
                       "' (auto, wgmma, grouped or per-expert)");
    route_ = how == "grouped"      ? Route::kGrouped
             : how == "per-expert" ? Route::kPerExpert
             : how == "wgmma"      ? Route::kWgmma
                                   : Route::kAuto;
  }
  int n_sides = kExpertStreams;
  if (const char* v = std::getenv("SINKSCOPE_CUDA_EXPERT_STREAMS"); v && *v) {
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    if (*end != '\0' || n < 1 || n > 16)
      throw InputError(std::string("SINKSCOPE_CUDA_EXPERT_STREAMS: '") + v +
                       "' is not a stream count from 1 to 16");
    n_sides = static_cast<int>(n);
  }
  CUBLAS_CHECK(cublasCreate(&handle_));
  CUBLAS_CHECK(cublasSetStream(handle_, stream_));
  CUBLAS_CHECK(cublasSetPointerMode(handle_, CUBLAS_POINTER_MODE_HOST));
  if (n_sides > 1) {
    CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    sides_.resize(static_cast<size_t>(n_sides));
    for (Side& side : sides_) {
      CUDA_CHECK(cudaStreamCreateWithFlags(&side.stream, cudaStreamNonBlocking));
      CUDA_CHECK(cudaEventCreateWithFlags(&side.done, cudaEventDisableTiming));
      CUBLAS_CHECK(cublasCreate(&side.handle));
      CUBLAS_CHECK(cublasSetStream(side.handle, side.stream));
      CUBLAS_CHECK(cublasSetPointerMode(side.handle, CUBLAS_POINTER_MODE_HOST));
    }
  }
}

Blas::~Blas() {
  for (Side& side : sides_) {
    if (side.handle) cublasDestroy(side.handle);
    if (side.done) cudaEventDestroy(side.done);
    if (side.stream) cudaStreamDestroy(side.stream);
  }
  if (fork_) cudaEventDestroy(fork_);
  if (handle_) cublasDestroy(handle_);
}

void Blas::call(cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k,
                const void* A, Dt at, int64_t lda, int64_t sa, const void* B, Dt bt, int64_t ldb,
                int64_t sb, void* C, Dt ct, int64_t ldc, int64_t sc, float alpha, float beta,
                int batch, Math math) {
  if (m == 0 || n == 0 || batch == 0) return;
  const cublasComputeType_t compute = (math == Math::kTF32 && at == Dt::kF32 && bt == Dt::kF32)
                                          ? CUBLAS_COMPUTE_32F_FAST_TF32
                                          : CUBLAS_COMPUTE_32F;
  if (k == 0) {  // C = beta C; not needed by the backend
    throw RuntimeFailure("cuBLAS call with an empty inner dimension");
  }
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      handle_, ta, tb, as_int(m, "m"), as_int(n, "n"), as_int(k, "k"), &alpha, A, dtype(at),
      as_int(lda, "lda"), sa, B, dtype(bt), as_int(ldb, "ldb"), sb, &beta, C, dtype(ct),
      as_int(ldc, "ldc"), sc, batch, compute, CUBLAS_GEMM_DEFAULT));
}

// Row-major C = A B^T is column-major C^T = B A^T: cuBLAS(T, N) with the operands swapped.
void Blas::nt(int64_t M, int64_t N, int64_t K, Operand A, Operand B, Result C, float alpha,
              float beta, int batch, Math math) {
  call(CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, B.ptr, B.type, B.ld, B.stride, A.ptr, A.type, A.ld,
       A.stride, C.ptr, C.type, C.ld, C.stride, alpha, beta, batch, math);
}

void Blas::nn(int64_t M, int64_t N, int64_t K, Operand A, Operand B, Result C, float alpha,
              float beta, int batch, Math math) {
  call(CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, B.ptr, B.type, B.ld, B.stride, A.ptr, A.type, A.ld,
       A.stride, C.ptr, C.type, C.ld, C.stride, alpha, beta, batch, math);
}

void Blas::tn(int64_t M, int64_t N, int64_t K, Operand A, Operand B, Result C, float alpha,
              float beta, int batch, Math math) {
  call(CUBLAS_OP_N, CUBLAS_OP_T, N, M, K, B.ptr, B.type, B.ld, B.stride, A.ptr, A.type, A.ld,
       A.stride, C.ptr, C.type, C.ld, C.stride, alpha, beta, batch, math);
}

std::string Blas::expert_strategy() const {
  const std::string per = "one cublasGemmEx per expert on " +
                          (sides_.empty() ? std::string("the backend's stream")
                                          : std::to_string(sides_.size()) + " streams");
  switch (route_) {
    case Route::kGrouped:
      return "cublasGemmGroupedBatchedEx";
    case Route::kPerExpert:
      return per;
    case Route::kAuto:
    case Route::kWgmma:
      break;
  }
  return "cublasGemmGroupedBatchedEx below " + std::to_string(kPerExpertMinRows) +
         " rows per expert on average, else " + per;
}

void Blas::grouped_nt(const std::vector<int>& rows, const std::vector<int64_t>& row_offset,
                      const std::vector<int64_t>& weight_index, int64_t N, int64_t K,
                      const bf16_bits* A, const bf16_bits* W, void* C, Dt ct) {
  const size_t cbytes = ct == Dt::kF32 ? 4 : 2;
  std::vector<int> live;
  for (size_t g = 0; g < rows.size(); ++g)
    if (rows[g] > 0) live.push_back(static_cast<int>(g));
  if (live.empty()) return;
  const int G = static_cast<int>(live.size());
  int64_t total = 0;
  for (int g : live) total += rows[static_cast<size_t>(g)];
  const bool grouped = route_ == Route::kGrouped ||
                       (route_ == Route::kAuto && total < int64_t{kPerExpertMinRows} * G);
  bool& available = ct == Dt::kF32 ? grouped_f32_ : grouped_bf16_;
  if (grouped && available) {
    std::vector<const void*> host(static_cast<size_t>(3 * G));
    std::vector<cublasOperation_t> ta(static_cast<size_t>(G), CUBLAS_OP_T),
        tb(static_cast<size_t>(G), CUBLAS_OP_N);
    std::vector<int> m(static_cast<size_t>(G), as_int(N, "N")), n(static_cast<size_t>(G)),
        k(static_cast<size_t>(G), as_int(K, "K")), lda(static_cast<size_t>(G), as_int(K, "K")),
        ldb(static_cast<size_t>(G), as_int(K, "K")), ldc(static_cast<size_t>(G), as_int(N, "N")),
        size(static_cast<size_t>(G), 1);
    std::vector<float> alpha(static_cast<size_t>(G), 1.f), beta(static_cast<size_t>(G), 0.f);
    for (int i = 0; i < G; ++i) {
      const int g = live[static_cast<size_t>(i)];
      n[static_cast<size_t>(i)] = rows[static_cast<size_t>(g)];
      host[static_cast<size_t>(i)] = W + weight_index[static_cast<size_t>(g)] * N * K;
      host[static_cast<size_t>(G + i)] = A + row_offset[static_cast<size_t>(g)] * K;
      host[static_cast<size_t>(2 * G + i)] =
          static_cast<const char*>(C) +
          static_cast<size_t>(row_offset[static_cast<size_t>(g)] * N) * cbytes;
    }
    ptr_arrays_.reserve(host.size());
    // Pageable source: the copy takes the bytes before returning, so `host` may go away.
    CUDA_CHECK(cudaMemcpyAsync(ptr_arrays_.get(), host.data(), host.size() * sizeof(void*),
                               cudaMemcpyHostToDevice, stream_));
    const void* const* dA = ptr_arrays_.get();
    const void* const* dB = ptr_arrays_.get() + G;
    void* const* dC = const_cast<void* const*>(ptr_arrays_.get() + 2 * G);
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(
        handle_, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(), dA, CUDA_R_16BF,
        lda.data(), dB, CUDA_R_16BF, ldb.data(), beta.data(), dC, dtype(ct), ldc.data(), G,
        size.data(), CUBLAS_COMPUTE_32F);
    if (st == CUBLAS_STATUS_SUCCESS) return;
    if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE &&
        st != CUBLAS_STATUS_ARCH_MISMATCH)
      CUBLAS_CHECK(st);
    available =
        false;  // this cuBLAS does not group these types: one product per expert from now on
  }
  per_expert(live, rows, row_offset, weight_index, N, K, A, W, C, ct);
}

void Blas::per_expert(const std::vector<int>& live, const std::vector<int>& rows,
                      const std::vector<int64_t>& row_offset,
                      const std::vector<int64_t>& weight_index, int64_t N, int64_t K,
                      const bf16_bits* A, const bf16_bits* W, void* C, Dt ct) {
  const size_t cbytes = ct == Dt::kF32 ? 4 : 2;
  const float one = 1.f, zero = 0.f;
  if (!sides_.empty()) CUDA_CHECK(cudaEventRecord(fork_, stream_));
  for (size_t i = 0; i < live.size(); ++i) {
    const size_t g = static_cast<size_t>(live[i]);
    cublasHandle_t h = handle_;
    if (!sides_.empty()) {
      const Side& side = sides_[i % sides_.size()];
      if (i < sides_.size()) CUDA_CHECK(cudaStreamWaitEvent(side.stream, fork_, 0));
      h = side.handle;
    }
    // Row-major C_g = A_g W_g^T is column-major C_g^T = W_g A_g^T.
    CUBLAS_CHECK(
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, as_int(N, "N"), rows[g], as_int(K, "K"), &one,
                     W + weight_index[g] * N * K, CUDA_R_16BF, as_int(K, "K"),
                     A + row_offset[g] * K, CUDA_R_16BF, as_int(K, "K"), &zero,
                     static_cast<char*>(C) + static_cast<size_t>(row_offset[g] * N) * cbytes,
                     dtype(ct), as_int(N, "N"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  if (sides_.empty()) return;
  const size_t used = std::min(live.size(), sides_.size());
  for (size_t i = 0; i < used; ++i) {
    CUDA_CHECK(cudaEventRecord(sides_[i].done, sides_[i].stream));
    CUDA_CHECK(cudaStreamWaitEvent(stream_, sides_[i].done, 0));
  }
}

}  // namespace sinkscope::cuda
