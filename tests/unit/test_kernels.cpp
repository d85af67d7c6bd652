#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "cpu/kernels.hpp"

using namespace sinkscope;

TEST(Kernels, RmsNormMatchesDefinition) {
  std::vector<float> x = {1, -2, 3, 4}, g = {1, 0.5f, 2, 1}, out(4), inv(1);
  cpu::rms_norm(x.data(), 1, 4, g.data(), 1e-6, out.data(), inv.data());
  const double rms = std::sqrt((1 + 4 + 9 + 16) / 4.0 + 1e-6);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(out[i], x[i] / rms * g[i], 1e-6);
  EXPECT_NEAR(inv[0], 1 / rms, 1e-7);
}

TEST(Kernels, RopeRotatesHalvesByPosition) {
  const int d = 8;
  std::vector<double> inv_freq(d / 2);
  for (int j = 0; j < d / 2; ++j) inv_freq[j] = std::pow(10000.0, -2.0 * j / d);
  std::mt19937 rng(1);
  std::normal_distribution<float> n;
  std::vector<float> x(3 * d), y;
  for (auto& v : x) v = n(rng);
  y = x;
  cpu::rope(y.data(), 3, d, d, 0, inv_freq.data());
  for (int r = 0; r < 3; ++r)
    for (int j = 0; j < d / 2; ++j) {
      const double a = r * inv_freq[j];
      EXPECT_NEAR(y[r * d + j], x[r * d + j] * std::cos(a) - x[r * d + j + d / 2] * std::sin(a),
                  1e-6);
      EXPECT_NEAR(y[r * d + j + d / 2],
                  x[r * d + j + d / 2] * std::cos(a) + x[r * d + j] * std::sin(a), 1e-6);
    }
  for (int j = 0; j < d; ++j) EXPECT_EQ(y[j], x[j]);  // position 0 is the identity
  // Relative position property: q_i . k_j depends only on i - j.
  std::vector<float> q(d), k(d);
  for (int j = 0; j < d; ++j) q[j] = n(rng), k[j] = n(rng);
  auto dot_at = [&](int i, int jpos) {
    std::vector<float> qq(static_cast<size_t>((i + 1) * d)),
        kk(static_cast<size_t>((jpos + 1) * d));
    std::copy(q.begin(), q.end(), qq.begin() + i * d);
    std::copy(k.begin(), k.end(), kk.begin() + jpos * d);
    cpu::rope(qq.data(), i + 1, d, d, 0, inv_freq.data());
    cpu::rope(kk.data(), jpos + 1, d, d, 0, inv_freq.data());
    double s = 0;
    for (int j = 0; j < d; ++j) s += qq[i * d + j] * kk[jpos * d + j];
    return s;
  };
  EXPECT_NEAR(dot_at(5, 2), dot_at(7, 4), 1e-4);
}

TEST(Kernels, CausalSoftmaxIsStableOnLargeLogits) {
  const int T = 4;
  std::vector<float> s = {1e30f, 0, 0,    0, 1e4f, 1e4f + 1, 0,    0,
                          -1e4f, 0, 1e4f, 0, 88.f, 89.f,     90.f, 1000.f};
  cpu::causal_softmax(s.data(), T);
  for (float v : s) EXPECT_TRUE(std::isfinite(v));
  EXPECT_FLOAT_EQ(s[0], 1.f);
  EXPECT_NEAR(s[4], 1 / (1 + std::exp(1.0)), 1e-6);
  EXPECT_EQ(s[6], 0.f);  // masked
  EXPECT_NEAR(s[10], 1.f, 1e-6);
  EXPECT_NEAR(s[15], 1.f, 1e-6);
  for (int i = 0; i < T; ++i) {
    double sum = 0;
    for (int j = 0; j < T; ++j) sum += s[i * T + j];
    EXPECT_NEAR(sum, 1.0, 1e-6);
  }
}

TEST(Kernels, CausalSoftmaxBlocksMatchTheFullMatrix) {
  const int T = 7;
  std::vector<float> full(T * T);
  for (int i = 0; i < T * T; ++i) full[i] = std::sin(0.7f * i) * 5.f;
  std::vector<float> block(full.begin() + 3 * T, full.begin() + 5 * T);  // rows 3-4, ld T
  cpu::causal_softmax(full.data(), T);
  cpu::causal_softmax_rows(block.data(), 2, T, 3);
  for (int r = 0; r < 2; ++r)
    for (int j = 0; j < T; ++j) EXPECT_FLOAT_EQ(block[r * T + j], full[(3 + r) * T + j]);
}

TEST(Kernels, GemmNtMatchesLoops) {
  const int M = 3, N = 5, K = 7;
  std::vector<float> a(M * K), b(N * K), c(M * N);
  for (int i = 0; i < M * K; ++i) a[i] = 0.1f * i;
  for (int i = 0; i < N * K; ++i) b[i] = 1.f - 0.05f * i;
  cpu::gemm_nt(M, N, K, a.data(), K, b.data(), K, c.data(), N);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double s = 0;
      for (int k = 0; k < K; ++k) s += a[i * K + k] * b[j * K + k];
      EXPECT_NEAR(c[i * N + j], s, 1e-4);
    }
}

TEST(Kernels, SwiGlu) {
  const float g[3] = {-2, 0, 3}, u[3] = {1, 5, 2};
  float h[3];
  cpu::swiglu(g, u, h, 3);
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(h[i], g[i] / (1 + std::exp(-g[i])) * u[i], 1e-6);
}
