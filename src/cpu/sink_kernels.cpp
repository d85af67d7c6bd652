#include "cpu/sink_kernels.hpp"

#include <algorithm>
#include <cmath>

namespace sinkscope::cpu {

void window_sink_softmax_rows(float* s, int64_t rows, int64_t ld, int64_t first, int64_t window,
                              const float* sink_logit, float* sink_mass, int64_t key0) {
  for (int64_t r = 0; r < rows; ++r) {
    // Columns: j0..i of this row, in column coordinates (key - key0).
    const int64_t i = first + r - key0,
                  j0 = std::max<int64_t>(0, window > 0 ? first + r - window + 1 - key0 : -key0);
    float* row = s + r * ld;
    float m = row[j0];
    for (int64_t j = j0 + 1; j <= i; ++j) m = std::max(m, row[j]);
    if (sink_logit) m = std::max(m, *sink_logit);
    double sum = 0;
    for (int64_t j = j0; j <= i; ++j) {
      row[j] = std::exp(row[j] - m);
      sum += row[j];
    }
    const double sink = sink_logit ? std::exp(static_cast<double>(*sink_logit) - m) : 0.0;
    sum += sink;
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t j = 0; j < j0; ++j) row[j] = 0.f;
    for (int64_t j = j0; j <= i; ++j) row[j] *= inv;
    for (int64_t j = i + 1; j < ld; ++j) row[j] = 0.f;
    if (sink_mass) sink_mass[r] = static_cast<float>(sink / sum);
  }
}

void swiglu_clamped(const float* g, const float* u, float* h, int64_t n, float limit, float alpha) {
  for (int64_t i = 0; i < n; ++i) {
    const float gc = std::min(g[i], limit), uc = std::clamp(u[i], -limit, limit);
    h[i] = (uc + 1.f) * (gc / (1.f + std::exp(-alpha * gc)));
  }
}

}  // namespace sinkscope::cpu
