#include "cpu/kernels.hpp"

#include <cblas.h>

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "sinkscope/error.hpp"

namespace sinkscope::cpu {
namespace {

// Threads per rank (--threads). OpenBLAS itself runs single-threaded: sinkscope calls it from
// inside its own parallel loops (attention per head, experts), where a threaded OpenBLAS would
// serialise concurrent calls on its thread pool; a large product called outside such a loop is
// split into row blocks over the threads here instead.
int g_threads = 1;

int threads_for_rows(int64_t M) {
  if (g_threads <= 1 || omp_in_parallel()) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(g_threads, M / 64)));
}

// Runs `gemm(rows, A offset, C offset)` on row blocks of an M-row product over the threads;
// returns false (nothing done) when the product should run in one call.
template <typename Gemm>
bool split_rows(int64_t M, int64_t lda, int64_t ldc, Gemm&& gemm) {
  const int t = threads_for_rows(M);
  if (t <= 1) return false;
#pragma omp parallel for num_threads(t) schedule(static)
  for (int i = 0; i < t; ++i) {
    const int64_t r0 = M * i / t, r1 = M * (i + 1) / t;
    gemm(r1 - r0, r0 * lda, r0 * ldc);
  }
  return true;
}

}  // namespace

namespace {

// C = alpha A op(B) + beta C, row-major, rows split over threads where large enough.
void gemm_rows(CBLAS_TRANSPOSE tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
               const float* B, int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
  if (M == 0 || N == 0) return;
  if (split_rows(M, lda, ldc, [&](int64_t rows, int64_t a_off, int64_t c_off) {
        gemm_rows(tb, rows, N, K, A + a_off, lda, B, ldb, C + c_off, ldc, alpha, beta);
      }))
    return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, tb, static_cast<blasint>(M), static_cast<blasint>(N),
              static_cast<blasint>(K), alpha, A, static_cast<blasint>(lda), B,
              static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
}

}  // namespace

void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
  gemm_rows(CblasTrans, M, N, K, A, lda, B, ldb, C, ldc, alpha, beta);
}

void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
  gemm_rows(CblasNoTrans, M, N, K, A, lda, B, ldb, C, ldc, alpha, beta);
}

void rms_norm(const float* x, int64_t rows, int64_t n, const float* gamma, double eps, float* out,
              float* inv_rms) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    if (inv_rms) inv_rms[r] = inv;
    float* o = out + r * n;
    for (int64_t i = 0; i < n; ++i) o[i] = xr[i] * inv * gamma[i];
  }
}

void layer_norm(const float* x, int64_t rows, int64_t n, const float* gamma, const float* beta,
                double eps, float* out, float* inv_std) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += xr[i];
    const double mean = sum / static_cast<double>(n);
    double var = 0;
    for (int64_t i = 0; i < n; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const double inv = 1.0 / std::sqrt(var / static_cast<double>(n) + eps);
    if (inv_std) inv_std[r] = static_cast<float>(inv);
    float* o = out + r * n;
    for (int64_t i = 0; i < n; ++i)
      o[i] = static_cast<float>((xr[i] - mean) * inv) * gamma[i] + (beta ? beta[i] : 0.f);
  }
}

void activation(Activation act, float* x, int64_t n) {
  switch (act) {
    case Activation::kSilu:
      for (int64_t i = 0; i < n; ++i) x[i] = x[i] / (1.f + std::exp(-x[i]));
      return;
    case Activation::kGeluErf:
      for (int64_t i = 0; i < n; ++i)
        x[i] = static_cast<float>(0.5 * x[i] * (1.0 + std::erf(x[i] / std::sqrt(2.0))));
      return;
    case Activation::kGeluTanh:
      for (int64_t i = 0; i < n; ++i) {
        const double v = x[i];
        x[i] = static_cast<float>(
            0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v))));
      }
      return;
    case Activation::kSwigluClamped:  // two inputs: cpu::swiglu_clamped (sink_kernels.hpp)
      throw RuntimeFailure("the clamped SwiGLU is not an element-wise activation");
  }
}

void rope(float* x, int64_t rows, int64_t d, int64_t ld, int64_t pos0, const double* inv_freq) {
  const int64_t half = d / 2;
  for (int64_t r = 0; r < rows; ++r) {
    float* v = x + r * ld;
    const double pos = static_cast<double>(pos0 + r);
    for (int64_t j = 0; j < half; ++j) {
      const double angle = pos * inv_freq[j];
      const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
      const float a = v[j], b = v[j + half];
      v[j] = a * c - b * s;
      v[j + half] = b * c + a * s;
    }
  }
}

void causal_softmax_rows(float* s, int64_t rows, int64_t ld, int64_t first) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = first + r;
    float* row = s + r * ld;
    float m = row[0];
    for (int64_t j = 1; j <= i; ++j) m = std::max(m, row[j]);
    double sum = 0;
    for (int64_t j = 0; j <= i; ++j) {
      row[j] = std::exp(row[j] - m);
      sum += row[j];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
    for (int64_t j = i + 1; j < ld; ++j) row[j] = 0.f;
  }
}

void causal_softmax(float* s, int64_t T) { causal_softmax_rows(s, T, T, 0); }

void swiglu(const float* g, const float* u, float* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

float l2_norm(const float* x, int64_t n) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  return static_cast<float>(std::sqrt(ss));
}

void set_threads(int n) {
  g_threads = std::max(1, n);
  openblas_set_num_threads(1);
}

}  // namespace sinkscope::cpu
