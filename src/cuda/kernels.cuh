// Host launchers of the CUDA backend's kernels (one thin launcher per kernel family; the kernels
// themselves live in the .cu files named beside each group). Plain pointers, no CUDA device types:
// bf16 tensors travel as bf16_bits (uint16_t). Every launcher returns at once (stream order) and
// does nothing for empty sizes; launch errors throw RuntimeFailure through CUDA_CHECK_LAUNCH.
// Row-major everywhere; "ld" is a row stride in elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "cuda/device_buffer.hpp"

namespace sinkscope::cuda::k {

// ---- norm_kernels.cu ----------------------------------------------------------------------
// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * gamma in fp32, stored as bf16 (out_bf) and,
// where not null, fp32 (out_f32); inv_rms[r] = that 1 / sqrt(...) where not null.
void rms_norm(const float* x, int64_t rows, int D, const float* gamma, float eps, bf16_bits* out_bf,
              float* out_f32, float* inv_rms, cudaStream_t s);

// The fused per-head step after the qkv product. qkv [rows, ld] holds q (Hl heads), k (KVl), v
// (KVl) of width d each, fp32. q and k get their RMSNorm (q_gamma / k_gamma) then RoPE at position
// r % T (rotate_half, cos/sin tables [T, d/2]); the normed rotated q is written back into qkv (for
// qbar) and q, k, v go to the attention operands Qa [rows, Hl, dp], Ka/Va [rows, KVl, dp] in bf16
// with dims d..dp-1 zero.
void qk_norm_rope(float* qkv, int64_t rows, int T, int ld, int Hl, int KVl, int d, int dp,
                  const float* q_gamma, const float* k_gamma, float eps, const float* cos_tab,
                  const float* sin_tab, bf16_bits* Qa, bf16_bits* Ka, bf16_bits* Va,
                  cudaStream_t s);

// norms[r] = ||x[r, 0:D]|| for rows r (row stride ld).
void row_norms(const float* x, int64_t rows, int D, int64_t ld, float* norms, cudaStream_t s);

// out[b, c] = mean over i = 1..T-1 of x[b*T + i, c] (row stride ld), for B probes and ncols
// columns. `partial` is scratch of column_mean_scratch(B, T, ncols) floats. Deterministic (no
// atomics).
int64_t column_mean_scratch(int B, int T, int ncols);
void column_mean_rest(const float* x, int B, int T, int ncols, int64_t ld, float* partial,
                      float* out, cudaStream_t s);
void column_mean_rest(const bf16_bits* x, int B, int T, int ncols, int64_t ld, float* partial,
                      float* out, cudaStream_t s);

// x[i] += a[i]
void add_inplace(float* x, const float* a, int64_t n, cudaStream_t s);
// x[r, :] += m[r, :] for rows x D (packed), with m_norms[r] = ||m[r]|| and x_norms[r] = ||x[r]||
// after the add, in one pass.
void add_rows_norms(float* x, const float* m, int64_t rows, int D, float* m_norms, float* x_norms,
                    cudaStream_t s);

// x[r, :] = table[tokens[r], :] (bf16 -> fp32).
void embed_gather(const bf16_bits* table, const int32_t* tokens, int64_t n, int D, float* x,
                  cudaStream_t s);

// The embedding's position-0 bookkeeping per probe b: delta = x[b*T] - mean_rest[b] (stored at
// delta + b * delta_bstride), optional mean-ablation of x[b*T], p0_sum[b] = x[b*T].
void embed_p0(float* x, int B, int T, int D, const float* mean_rest, bool ablate, float* delta,
              int64_t delta_bstride, float* p0_sum, cudaStream_t s);

// The median of |x| over n fp32 values (the mean of the two middle ones for even n), exactly, on
// the device: a three-pass radix select on the bit patterns (11 + 11 + 10 bits) per middle rank;
// the bins are picked on the device, so nothing waits for the host. scratch holds
// abs_median_scratch_bytes(); *out (device) receives the median.
size_t abs_median_scratch_bytes();
void abs_median(const float* x, int64_t n, void* scratch, float* out, cudaStream_t s);

// out[r] = mean of a[r, 0..cols) (double sums), rows x cols row-major.
void row_means(const float* a, int64_t rows, int cols, float* out, cudaStream_t s);

// ---- attention.cu -------------------------------------------------------------------------
// Whether this build carries sm_90a code (wgmma) for the current device (compute capability 9.0):
// probed once per device.
bool sm90a_kernels_available();

// Causal attention of B probes x Hl local heads over T positions, flash style (online softmax in
// fp32, bf16 tensor-core products, T x T never stored). Q [B*T, Hl, dp], K/V [B*T, KVl, dp] bf16;
// local head h reads held KV head (head_begin + h) / group - kv_begin. Writes z [B*T, Hl * d] bf16
// (dims < d) and a0 [B, Hl, T] = exp(q_i . k_0 * scale - lse_i). dp is a multiple of 16, <= 128.
// Two kernels keep this contract: mma.sync (any dp; every GPU this build targets) and, for dp 64
// and 128 on an sm_90a build running on compute capability 9.0, warpgroup products (wgmma), which
// need vt_scratch of flash_attention_scratch() elements. kAuto takes wgmma where it can run and
// vt_scratch is given, unless SINKSCOPE_ATTN_WGMMA=0; asking for kWgmma where it cannot run throws.
enum class AttnKernel { kAuto, kMmaSync, kWgmma };
bool flash_attention_wgmma_available(int dp);
int64_t flash_attention_scratch(int B, int T, int KVl, int dp);
void flash_attention(const bf16_bits* Q, const bf16_bits* K, const bf16_bits* V, bf16_bits* z,
                     float* a0, int B, int T, int Hl, int KVl, int d, int dp, int head_begin,
                     int group, int kv_begin, float scale, bf16_bits* vt_scratch, cudaStream_t s,
                     AttnKernel kernel = AttnKernel::kAuto);

// ---- circuit_kernels.cu -------------------------------------------------------------------
// Head write norms ||w_h[i]||^2 = z_h[i]^T M_h z_h[i] (M_h = W_O,h^T W_O,h = gram_hi + gram_lo,
// [Hl, d, d] bf16 each), fused (z M never stored). z [B*T, Hl*d] bf16 -> wp0 [B, Hl] = ||w[0]||,
// wrest [B, Hl] = mean_{i>=1} ||w[i]||. dp: d padded to a multiple of 16 (<= 128). `partial` is
// scratch of head_write_norms_scratch(B, Hl) floats.
int64_t head_write_norms_scratch(int B, int Hl);
void head_write_norms(const bf16_bits* z, const bf16_bits* gram_hi, const bf16_bits* gram_lo, int B,
                      int T, int Hl, int d, int dp, float* partial, float* wp0, float* wrest,
                      cudaStream_t s);

// zr [Hl, B, 2, d]: (z_h[b, 0] - zbar[b, h], z_h[b, 0]) for the head writes' position-0 vectors.
void z_rows(const bf16_bits* z, const float* zbar, int B, int T, int Hl, int d, float* zr,
            cudaStream_t s);

// hp [B, H, 2, D] (global head slots; zero elsewhere): hp[b, head_begin + h, s] = W_O,h zr[h, b,
// s], W_O [D, Hl*d] bf16, fp32 arithmetic.
void head_pack(const float* zr, const bf16_bits* Wo, int B, int Hl, int d, int D, int H,
               int head_begin, float* hp, cudaStream_t s);

// Stores the position-0 deltas of S component slots per probe, applies the mean-ablations and adds
// the (ablated) position-0 writes to p0_sum, in slot order (as forward.cpp does):
//   p = p0(b, s); delta = rest_is_sum ? p - second(b, s) / (T - 1) : second(b, s)
//   delta_store[b * delta_bstride + s * D] = delta
//   if ablated[s]: target[b * target_bstride] -= delta;  p0_sum[b] += ablated[s] ? p - delta : p
struct ComponentRows {
  const float* p0;
  int64_t p0_bstride, p0_sstride;
  const float* second;
  int64_t second_bstride, second_sstride;
  bool second_is_rest_sum;
};
void finish_components(const ComponentRows& rows, int B, int S, int D, int T,
                       const uint8_t* ablated, float* delta_store, int64_t delta_bstride,
                       float* target, int64_t target_bstride, float* p0_sum, cudaStream_t s);

// out[r, c] = W[r, c] * col_scale[c] in fp32 (W bf16 [rows, cols]).
void scale_columns(const bf16_bits* W, int64_t rows, int cols, const float* col_scale, float* out,
                   cudaStream_t s);

// rows [B, 2, D]: (p0_sum[b] * gamma, x[b*T] * gamma).
void identity_rows(const float* p0_sum, const float* x, int B, int T, int D, const float* gamma,
                   float* rows, cudaStream_t s);

// out[r, n] = sum_k A[r, k] * W[n, k] in fp32 (A fp32 [R, K], W bf16 [N, K] with row stride ldw).
void rows_times_wt(const float* A, int R, int K, const bf16_bits* W, int N, int64_t ldw, float* out,
                   cudaStream_t s);

// Per probe b and held KV head g, from kid [B, 2, KVl*d] = (K-rows of p0_sum*gamma, x[0]*gamma)
// without the 1/r_x factor: r_k, k0_model [B, KVl, d] (the key at position 0 after k_norm, in
// fp32), k0_sum [B, KVl, d] = sum over components of K(c[0]), and qk [B, Hl, d] = qbar * k_norm /
// (r_x r_k) / sqrt(d) (what the attribution contracts G with).
void circuit_finish(const float* kid, const float* inv_rx, int B, int T, const float* qbar,
                    const float* k_norm, int Hl, int KVl, int d, int head_begin, int group,
                    int kv_begin, float eps, float scale, float* k0_model, float* k0_sum, float* qk,
                    cudaStream_t s);

// attr[b, h, c] = sum_j G[b, c, g(h)*d + j] * qk[b, h, j] for c < C; G rows have width KVl*d and
// probe stride g_bstride.
void attr_contract(const float* G, int64_t g_bstride, const float* qk, int B, int C, int Hl,
                   int KVl, int d, int head_begin, int group, int kv_begin, float* attr,
                   cudaStream_t s);

// ---- moe_kernels.cu -----------------------------------------------------------------------
// Router: p = softmax(logits[r, :]) in double; the top-k experts (ties -> lower index), their
// weights (renormalised when norm_topk), and gap[r] = p_(k) - p_(k+1) (1 when k == E).
void router_topk(const float* logits, int64_t n, int E, int K, bool norm_topk, int32_t* ids,
                 float* weights, float* gap, cudaStream_t s);

// dst[i, :] = src[rows[i] / div, :] (bf16 rows of width D; div = k turns pair ids into token rows).
void gather_rows(const bf16_bits* src, const int32_t* rows, int div, int64_t n, int D,
                 bf16_bits* dst, cudaStream_t s);

// Routing bookkeeping on the device (single expert-parallel rank):
// counts_and_ties [E + 1]: pairs per expert, then the rows whose gap is < 1e-3 (zeroed here).
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
// Position-0 pairs of the slice [s0, s1): p0_out[b * S + e, :] = w * row, n0_out = its norm,
// r0_out[b * E + e] = 1; rc_out[e] = counts[e] minus those position-0 pairs.
void expert_p0_and_counts(const bf16_bits* rows, const float* pos_w, const int32_t* ids,
                          const int32_t* pos_of_pair, const int32_t* counts, int B, int T, int K,
                          int E, int64_t s0, int64_t s1, int S, int D, float* p0_out, float* n0_out,
                          float* r0_out, float* rc_out, cudaStream_t s);

// act[r, c] = silu(h[r, c]) * h[r, I + c] for h [n, 2I] (gate | up), bf16 in and out, fp32 math.
void swiglu(const bf16_bits* h, int64_t n, int I, bf16_bits* act, cudaStream_t s);

// ---- grouped_gemm.cu ------------------------------------------------------------------------
// The expert products in one launch each on Hopper (wgmma; sm_90a builds on compute capability
// 9.0): for every group g with rows[g] > 0, packed rows p = row_offset[g] + r (r < rows[g]):
//   store:  C[p, 0:N] = A[src(p), 0:K] W_g[0:N, 0:K]^T                      (W_g = W + w_g N K)
//   swiglu: C[p, 0:N] = silu(A[src(p)] W_g[0:N]^T) * (A[src(p)] W_g[N:2N]^T)   (W_g = W + w_g 2N K)
// with src(p) = a_rows ? a_rows[p] / a_div : p (rows gathered by index), bf16 in and out, fp32
// accumulation. Needs K % 8 == 0 and N even. The host builds the tile list (GroupedGemmPlan);
// dev_plan holds plan.groups.size() + plan.tiles.size() ints (a distinct buffer per product that
// is in flight).
bool grouped_gemm_sm90_supported(int K, int N);
struct GroupedGemmPlan {
  std::vector<int32_t> groups, tiles;  // 4 ints each: see grouped_gemm.cu
  void build(const std::vector<int>& rows, const std::vector<int64_t>& row_offset,
             const std::vector<int64_t>& weight_index, int N, bool swiglu);
  size_t ints() const { return groups.size() + tiles.size(); }
};
void grouped_gemm_sm90(const bf16_bits* A, const int32_t* a_rows, int a_div, const bf16_bits* W,
                       bf16_bits* C, int K, int N, bool swiglu, const GroupedGemmPlan& plan,
                       int32_t* dev_plan, cudaStream_t s);

// For the pairs in source order: pos_w[p] = weights[src_pair[p]], pos_tok[p] = tok0 + src_pair[p] /
// K.
void pair_info(const int32_t* src_pair, const float* weights, int64_t npairs, int K, int64_t tok0,
               float* pos_w, int32_t* pos_tok, cudaStream_t s);

// m[r, :] = sum_j weights[r*K + j] * back[pos_of_pair[r*K + j], :] for the n rows of a slice.
void combine(const bf16_bits* back, const int32_t* pos_of_pair, const float* weights, int64_t n,
             int K, int D, float* m, cudaStream_t s);

// For each segment (begin, end, out) of seg [nseg, 3]: out_rows[out, :] = sum over rows p in
// [begin, end) whose token (row_tok[p], or tok0 + p when row_tok is null) is not at position 0 of
// (row_w[p] or 1) * rows[p, :].
void segment_sums(const float* rows, const float* row_w, const int32_t* row_tok, int64_t tok0,
                  const int32_t* seg, int nseg, int D, int T, float* out_rows, cudaStream_t s);

// For each item (row, out) of items [n, 2]: p0_out[out, :] = (row_w[row] or 1) * rows[row, :] and
// n0_out[out] = its norm.
void p0_rows(const float* rows, const float* row_w, const int32_t* items, int n, int D,
             float* p0_out, float* n0_out, cudaStream_t s);

// ---- util_kernels.cu ----------------------------------------------------------------------
// Deterministic pseudo-random weights for benchmarks: element (row_offset + r, col_offset + c) of
// a [*, global_cols] tensor gets a uniform value of standard deviation `stddev`, so any sharding of
// the same tensor id sees the same global tensor.
void fill_random_bf16(bf16_bits* dst, int64_t rows, int64_t cols, int64_t row_offset,
                      int64_t col_offset, int64_t global_cols, uint64_t seed, uint64_t tensor_id,
                      float stddev, cudaStream_t s);
void fill_random_f32(float* dst, int64_t rows, int64_t cols, int64_t row_offset, int64_t col_offset,
                     int64_t global_cols, uint64_t seed, uint64_t tensor_id, float stddev,
                     cudaStream_t s);
void fill(float* dst, int64_t n, float value, cudaStream_t s);
// `count` d x d matrices m (fp32, symmetric up to rounding) -> hi = bf16(v), lo = bf16(v - hi)
// with v = (m + m^T) / 2: v ~= hi + lo to about 16 significant bits, hi and lo exactly symmetric.
void gram_split(const float* m, int64_t count, int d, bf16_bits* hi, bf16_bits* lo, cudaStream_t s);
void bf16_to_f32(const bf16_bits* src, int64_t n, float* dst, cudaStream_t s);
void f32_to_bf16(const float* src, int64_t n, bf16_bits* dst, cudaStream_t s);

}  // namespace sinkscope::cuda::k
