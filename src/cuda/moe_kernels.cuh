// Host launchers of moe_kernels.cu (see kernels.cuh for the conventions shared by every launcher:
// plain pointers, bf16 as bf16_bits, stream order, empty sizes do nothing, launch errors throw).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "cuda/device_buffer.hpp"

namespace sinkscope::cuda::k {

// Router: p = softmax(logits[r, :]) in double; the top-k experts (ties -> lower index), their
// weights (renormalised when norm_topk), and gap[r] = p_(k) - p_(k+1) (1 when k == E).
void router_topk(const float* logits, int64_t n, int E, int K, bool norm_topk, int32_t* ids,
                 float* weights, float* gap, cudaStream_t s);

// dst[i, :] = src[rows[i] / div, :] (bf16 rows of width D; div = k turns pair ids into token rows).
void gather_rows(const bf16_bits* src, const int32_t* rows, int div, int64_t n, int D,
                 bf16_bits* dst, cudaStream_t s);

// Routing bookkeeping on the device (single expert-parallel rank):
// counts_and_ties [E + 1]: pairs per expert, then the rows whose gap is < 1e-2 (near-ties; zeroed
// here).
void expert_histogram(const int32_t* ids, int64_t npairs, int E, const float* gap, int64_t n,
                      int32_t* counts_and_ties, cudaStream_t s);
// Stable counting sort by expert: src_pair[pos] = pair, pos_of_pair[pair] = pos, with expert e's
// pairs at offsets[e] .. in pair order. scratch: expert_rank_scratch(npairs, E) ints.
int64_t expert_rank_scratch(int64_t npairs, int E);
void expert_rank(const int32_t* ids, int64_t npairs, int E, const int32_t* offsets,
                 int32_t* scratch, int32_t* src_pair, int32_t* pos_of_pair, cudaStream_t s);
// out_rows[b * S + e, :] = sum over expert e's rows p whose token pos_tok[p] is probe b's position
// 1..T-1 of row_w[p] * rows[p, :] (rows in source order; every (e, b) written, zeros included).
// Long segments are cut into splits summed in a fixed order (deterministic for a given shape);
// scratch holds expert_rest_sums_scratch(E, B, S, D, npairs) floats (npairs: rows in `rows`).
int64_t expert_rest_sums_scratch(int E, int B, int S, int D, int64_t npairs);
void expert_rest_sums(const bf16_bits* rows, const float* row_w, const int32_t* pos_tok,
                      const int32_t* offsets, const int32_t* counts, int E, int B, int T, int S,
                      int D, int64_t npairs, float* scratch, float* out_rows, cudaStream_t s);
// The same sums from the down product's tile sums (grouped_gemm.cuh's RestTap; tile_base from
// grouped_gemm_device_plan): every (e, b) of out_rows written, zeros included.
void expert_rest_sums_from_tiles(const float* part, const int32_t* pos_tok, const int32_t* offsets,
                                 const int32_t* counts, const int32_t* tile_base, int E, int B,
                                 int T, int S, int D, float* out_rows, cudaStream_t s);
// Position-0 pairs of the slice [s0, s1): p0_out[b * S + e, :] = w * row, n0_out = its norm,
// r0_out[b * E + e] = 1; rc_out[e] = counts[e] minus those position-0 pairs.
void expert_p0_and_counts(const bf16_bits* rows, const float* pos_w, const int32_t* ids,
                          const int32_t* pos_of_pair, const int32_t* counts, int B, int T, int K,
                          int E, int64_t s0, int64_t s1, int S, int D, float* p0_out, float* n0_out,
                          float* r0_out, float* rc_out, cudaStream_t s);

// act[r, c] = silu(h[r, c]) * h[r, I + c] for h [n, 2I] (gate | up), bf16 in and out, fp32 math.
void swiglu(const bf16_bits* h, int64_t n, int I, bf16_bits* act, cudaStream_t s);

// For the pairs in source order: pos_w[p] = weights[src_pair[p]], pos_tok[p] = tok0 + src_pair[p] /
// K.
void pair_info(const int32_t* src_pair, const float* weights, int64_t npairs, int K, int64_t tok0,
               float* pos_w, int32_t* pos_tok, cudaStream_t s);

// m[r, :] = sum_j weights[r*K + j] * back[pos_of_pair[r*K + j], :] for the n rows of a slice.
void combine(const bf16_bits* back, const int32_t* pos_of_pair, const float* weights, int64_t n,
             int K, int D, float* m, cudaStream_t s);
// The next layer's input RMSNorm, formed where the new residual rows are made: u[r] =
// bf16(x[r] * inv[r] * gamma) with inv[r] = 1 / sqrt(mean(x[r]^2) + eps) (norm_rows, kRms).
// gamma null: none.
struct NextNorm {
  const float* gamma = nullptr;
  float eps = 0.f;
  bf16_bits* u = nullptr;
  float* inv = nullptr;
};
// The combine added straight into the residual: x[r, :] += m[r, :] (m as combine() forms it) for
// the n rows of a slice, except that with held a probe's position-0 rows (r % T == 0, the slice
// starting at a probe's first row) go to held[r, :] instead, for the recording to edit before
// add_rows_norms adds them. For the rows added here: with m_norms, m_norms[r] = ||m[r]|| and
// x_norms[r] = ||x[r]|| after the add; with next.gamma, the next layer's input norm of x[r].
void combine_add(const bf16_bits* back, const int32_t* pos_of_pair, const float* weights, int64_t n,
                 int K, int D, int T, float* x, float* held, float* m_norms, float* x_norms,
                 const NextNorm& next, cudaStream_t s);

// For each segment (begin, end, out) of seg [nseg, 3]: out_rows[out, :] = sum over rows p in
// [begin, end) whose token (row_tok[p], or tok0 + p when row_tok is null) is not at position 0 of
// (row_w[p] or 1) * rows[p, :].
void segment_sums(const float* rows, const float* row_w, const int32_t* row_tok, int64_t tok0,
                  const int32_t* seg, int nseg, int D, int T, float* out_rows, cudaStream_t s);

// For each item (row, out) of items [n, 2]: p0_out[out, :] = (row_w[row] or 1) * rows[row, :] and
// n0_out[out] = its norm.
void p0_rows(const float* rows, const float* row_w, const int32_t* items, int n, int D,
             float* p0_out, float* n0_out, cudaStream_t s);

}  // namespace sinkscope::cuda::k
