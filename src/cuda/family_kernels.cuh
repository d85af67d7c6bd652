// Host launchers of family_kernels.cu: the block variants of the families beyond Qwen3-MoE
// (docs/families.md): LayerNorm with bias, projection biases, the full-width q/k RMSNorm, the
// post-norm output scaling, ungated and biased MLP activations and the shared expert's sigmoid
// gate. See kernels.cuh for the conventions shared by every launcher (plain pointers, bf16 as
// bf16_bits, stream order, empty sizes do nothing, launch errors throw).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device_buffer.hpp"
#include "sinkscope/config.hpp"

namespace sinkscope::cuda::k {

// The normalisation of a block's input, as src/cpu/kernels.cpp: RMSNorm (gamma), LayerNorm
// (centred, gamma and beta, 1 / std), or none (post-norm blocks read the residual itself; scale 1).
enum class NormMode : int { kRms = 0, kLayer = 1, kNone = 2 };

// out[r, :] = norm(x[r, :]) stored as bf16 (out_bf) and, where not null, fp32 (out_f32) and the
// fp32 value's two lower bf16 parts (out_split [rows, 2D]: mid, then lo; out_bf + mid + lo is the
// fp32 value exactly); inv_scale[r] = 1 / rms (RMSNorm), 1 / std (LayerNorm) or 1 (none) where not
// null. beta is read by LayerNorm only and may be null there (no bias). The rows are r = 0,
// row_step, 2 row_step, ... (`rows` of them), each written at its own index r.
void norm_rows(NormMode mode, const float* x, int64_t rows, int D, const float* gamma,
               const float* beta, float eps, bf16_bits* out_bf, float* out_f32,
               bf16_bits* out_split, float* inv_scale, cudaStream_t s, int64_t row_step = 1);

// x[r, j] += bias[j] for r < rows, j < n (row stride ld).
void add_row_bias(float* x, int64_t rows, int n, int64_t ld, const float* bias, cudaStream_t s);

// The full-width q/k RMSNorm (OLMoE, OLMo-2: one RMS over every head's q, and over every KV head's
// k). Step 1: per row, the partial sums of squares of this rank's q columns [0, qw) and of the
// k columns of the held KV heads it counts (count_kv[g] != 0; a KV head held by several tp ranks is
// counted once): sums[r] (q) and sums[rows + r] (k). They are summed over the tp group by the
// caller. Step 2: q[j] *= gain_q[j] / sqrt(sums_q / qn + eps), k likewise with kn; inv_rk[r] =
// that k factor (the key's 1 / r_k, docs/metrics.md section 4).
void full_width_sumsq(const float* qkv, int64_t rows, int64_t ld, int qw, int KVl, int d,
                      const uint8_t* count_kv, float* sums, cudaStream_t s);
void full_width_apply(float* qkv, int64_t rows, int64_t ld, int qw, int kw, const float* sums,
                      float qn, float kn, float eps, const float* gain_q, const float* gain_k,
                      float* inv_rk, cudaStream_t s);

// Post-norm blocks (OLMo-2): a[r, :] *= gain / sqrt(mean(a[r, :]^2) + eps) in place, with
// scale[r] = that 1 / rms where not null.
void post_norm_rows(float* a, int64_t rows, int D, const float* gain, float eps, float* scale,
                    cudaStream_t s);

// out[r, c] = bf16(z[r, c] * scale[r]).
void scale_rows_bf16(const bf16_bits* z, int64_t rows, int cols, const float* scale, bf16_bits* out,
                     cudaStream_t s);

// The MLP activation from fp32 pre-activations with biases: gated h [n, 2I] = (gate | up):
// out = act(gate + b_gate) * (up + b_up); ungated h [n, I]: out = act(h + b_up). bias is [2I]
// (gate | up) or [I], or null; out bf16 [n, I].
void bias_activation(const float* h, int64_t n, int I, bool gated, Activation act,
                     const float* bias, bf16_bits* out, cudaStream_t s);

// Expert rows in groups, as the expert products pack them: packed rows [start[g], start[g] +
// rows[g]) run on local expert expert[g], for g < count, starts non-decreasing (device memory).
// Rows in no group (another call's rows between the groups) are left alone.
struct ExpertGroups {
  const int32_t* start = nullptr;
  const int32_t* rows = nullptr;
  const int32_t* expert = nullptr;
  int count = 0;
};

// Experts with biases (gpt-oss): h fp32 [total, 2I] = (gate | up) pre-activations of the packed
// rows, bias [El, 2I] (gate | up) per local expert (null: none); out bf16 [total, I] = act(gate +
// b) * (up + b), or for Activation::kSwigluClamped (up' + 1) * gate' * sigmoid(alpha gate') with
// gate' = min(gate, limit), up' = clamp(up, -limit, limit).
void expert_bias_activation(const float* h, int64_t total, int I, const ExpertGroups& groups,
                            Activation act, float limit, float alpha, const float* bias,
                            bf16_bits* out, cudaStream_t s);

// out[r, :] = bf16(y[r, :] + bias[e(r), :]) for the packed rows (y fp32 [total, D], bias [El, D] or
// null).
void expert_add_bias(const float* y, int64_t total, int D, const ExpertGroups& groups,
                     const float* bias, bf16_bits* out, cudaStream_t s);

// The shared expert's gate (Qwen2-MoE): y[r, :] *= sigmoid(x[r, :] . w) for rows r (x fp32 [n, D]).
void sigmoid_gate_rows(float* y, const float* x, int64_t n, int D, const float* w, cudaStream_t s);

// out[b, :] += a[b * T, :] - sum_h hp[b, h, 1, :] over H heads: the part of the attention block's
// position-0 write that is no head's (its output bias, scaled as the block writes it).
void add_p0_remainder(const float* a, int B, int T, int D, const float* hp, int H, float* out,
                      cudaStream_t s);

}  // namespace sinkscope::cuda::k
