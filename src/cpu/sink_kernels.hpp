// CPU kernels of the gpt-oss features (docs/metrics.md "Model families II"): attention within a
// sliding window and with a learned sink logit per head, and the clamped SwiGLU of its experts.
#pragma once

#include <cstdint>

namespace sinkscope::cpu {

// Softmax of a block of `rows` query rows starting at query `first` (row r is query first + r,
// stored with leading dimension ld; column c holds key key0 + c), in place: row i keeps keys j
// with i - window < j <= i (window 0: every j <= i), the rest set to 0. With a sink logit,
// exp(sink) joins the denominator (the max is taken over the kept scores and the sink, as
// transformers' eager gpt-oss attention) and is dropped: the kept weights then sum to
// 1 - sink_mass[r] (written when not null).
void window_sink_softmax_rows(float* s, int64_t rows, int64_t ld, int64_t first, int64_t window,
                              const float* sink_logit, float* sink_mass, int64_t key0 = 0);

// h[i] = (clamp(u[i], -limit, limit) + 1) * g' sigmoid(alpha g'), g' = min(g[i], limit).
void swiglu_clamped(const float* g, const float* u, float* h, int64_t n, float limit, float alpha);

}  // namespace sinkscope::cpu
