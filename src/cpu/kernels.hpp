// CPU kernels of the reference backend: fp32, OpenBLAS for every matrix product.
#pragma once

#include <cstdint>

#include "sinkscope/config.hpp"

namespace sinkscope::cpu {

// C[M, N] = alpha * A[M, K] * B[N, K]^T + beta * C   (weights are stored [out, in])
void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, float alpha = 1.f, float beta = 0.f);
// C[M, N] = alpha * A[M, K] * B[K, N] + beta * C
void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, float alpha = 1.f, float beta = 0.f);

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * gamma; also returns each row's
// 1 / rms in inv_rms[r] when inv_rms is not null.
void rms_norm(const float* x, int64_t rows, int64_t n, const float* gamma, double eps, float* out,
              float* inv_rms = nullptr);

// LayerNorm with gain and optional bias: out = (x - mean) / sqrt(var + eps) * gamma + beta
// (population variance, as torch); inv_std[r] = 1 / sqrt(var + eps) when not null.
void layer_norm(const float* x, int64_t rows, int64_t n, const float* gamma, const float* beta,
                double eps, float* out, float* inv_std = nullptr);

// x = act(x) in place.
void activation(Activation act, float* x, int64_t n);

// Rotates pairs (j, j + d/2) of each row of x[rows, d] (stride ld) by position pos0 + r
// (the rotate_half convention of HF Llama/Qwen), with inv_freq[j] = theta^(-2j/d).
void rope(float* x, int64_t rows, int64_t d, int64_t ld, int64_t pos0_stride_rows,
          const double* inv_freq);

// Causal softmax of the rows of s[T, T] in place (row i keeps j <= i), fp32 with max subtraction
// and a double-precision sum.
void causal_softmax(float* s, int64_t T);
// The same for a block of `rows` query rows starting at query `first` (row r is query first + r,
// keeps keys j <= first + r) stored with leading dimension ld.
void causal_softmax_rows(float* s, int64_t rows, int64_t ld, int64_t first);

// h[i] = silu(g[i]) * u[i]
void swiglu(const float* g, const float* u, float* h, int64_t n);

float l2_norm(const float* x, int64_t n);

void set_threads(int n);

}  // namespace sinkscope::cpu
