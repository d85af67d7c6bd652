// Host launchers of circuit_kernels.cu (see kernels.cuh for the conventions shared by every
// launcher: plain pointers, bf16 as bf16_bits, stream order, empty sizes do nothing, launch errors
// throw).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "cuda/device_buffer.hpp"

namespace sinkscope::cuda::k {

// Head write norms ||w_h[i]||^2 = z_h[i]^T M_h z_h[i] (M_h = W_O,h^T W_O,h = gram_hi + gram_lo,
// [Hl, d, d] bf16 each, exactly symmetric), fused (z M never stored), and in the same read of z
// its column means past position 0. z [B*T, Hl*d] bf16 -> wp0 [B, Hl] = ||w[0]||, wrest [B, Hl] =
// mean_{i>=1} ||w[i]||, zbar [B, Hl*d] = mean over i = 1..T-1 of z[b*T + i] (zeros when T < 2, as
// column_mean_rest). dp: d padded to a multiple of 16 (<= 128). `scratch` holds
// head_write_norms_scratch(B, Hl, d) floats. Deterministic (no atomics).
int64_t head_write_norms_scratch(int B, int Hl, int d);
void head_write_norms(const bf16_bits* z, const bf16_bits* gram_hi, const bf16_bits* gram_lo, int B,
                      int T, int Hl, int d, int dp, float* scratch, float* wp0, float* wrest,
                      float* zbar, cudaStream_t s);

// The heads' position-0 vectors, hp [B, H, 2, D] (global head slots; zeros for the heads outside
// [head_begin, head_begin + Hl)): hp[b, head_begin + h, 0] = W_O,h (z_h[b, 0] - zbar[b, h]) and
// hp[b, head_begin + h, 1] = W_O,h z_h[b, 0], with z [B*T, Hl*d] bf16 (row 0 of each probe read),
// zbar [B, Hl*d] (head_write_norms), W_O [D, Hl*d] bf16; fp32 arithmetic, W_O read once for
// every probe. Even d <= 128.
void head_vectors(const bf16_bits* z, const float* zbar, const bf16_bits* Wo, int B, int T, int Hl,
                  int d, int D, int H, int head_begin, float* hp, cudaStream_t s);

// Stores the position-0 deltas of S component slots per probe, applies the mean-ablations and adds
// the (ablated) position-0 writes to p0_sum, in slot order (as src/cpu/backend.cpp does):
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

// rows [B, 2, D]: (P p0_sum[b] * gamma, P x[b*T] * gamma), P the centring when `centre` (LayerNorm)
// and the identity otherwise; gamma null: unit gains (post-norm blocks have no input norm).
void identity_rows(const float* p0_sum, const float* x, int B, int T, int D, const float* gamma,
                   bool centre, float* rows, cudaStream_t s);

// W[r, :] -= mean(W[r, :]) for rows x cols (fp32, in place).
void centre_rows(float* W, int64_t rows, int cols, cudaStream_t s);

// out[r, n] = sum_k A[r, k] * W[n, k] in fp32 (A fp32 [R, K], W bf16 [N, K] with row stride ldw).
void rows_times_wt(const float* A, int R, int K, const bf16_bits* W, int N, int64_t ldw, float* out,
                   cudaStream_t s);
// rows_times_wt of identity_rows' rows without centring, read from their sources in the same pass
// ([2 B, N]). Needs D, ldw multiples of 8 and every operand 16-byte aligned: false (nothing run)
// where they are not.
bool identity_keys(const float* p0_sum, const float* x, int B, int T, int D, const float* gamma,
                   const bf16_bits* W, int N, int64_t ldw, float* out, cudaStream_t s);

// The key's normalisation as the attribution sees it (docs/metrics.md section 4, "Model families"):
// gain of held KV head g, dimension j = gain[g * gain_stride + j] (per-head norm: stride 0; full
// width: d; none: gain null, unit gains); 1 / r_k from the key of x[0] itself (per-head norm), from
// inv_rk_rows[b * T] (the full-width norm's factor, computed over every KV head), or 1 (no norm);
// kconst [KVl*d] = W_K beta_in + b_K, the part of the key no component writes (null: zero).
// YaRN's attention factor multiplies the rotated dims j < rot of every key, also the one at
// position 0 (RoPE at position 0 is the identity otherwise): qk's dims j < rot carry rope_factor.
struct KeyNorm {
  const float* gain = nullptr;
  int64_t gain_stride = 0;
  const float* inv_rk_rows = nullptr;
  const float* kconst = nullptr;
  int rot = 0;
  float rope_factor = 1.f;
};

// Per probe b and held KV head g, from kid [B, 2, KVl*d] = (K-rows of p0_sum*gamma, x[0]*gamma)
// without the 1/r_x factor: r_k, k0_model [B, KVl, d] (the key at position 0 after k_norm, in
// fp32), k0_sum [B, KVl, d] = sum over components of K(c[0]) plus kconst, and qk [B, Hl, d] = qbar
// * gain / (r_x r_k) / sqrt(d) (what the attribution contracts G with).
void circuit_finish(const float* kid, const float* inv_rx, int B, int T, const float* qbar,
                    const KeyNorm& k_norm, int Hl, int KVl, int d, int head_begin, int group,
                    int kv_begin, float eps, float scale, float* k0_model, float* k0_sum, float* qk,
                    cudaStream_t s);

// dir[b, h, :] = sum_j qk[b, h, j] W_K,g[g(h)*d + j, :] ([B, Hl, D]; W_K,g = Wk [KVl*d, D] with
// its columns scaled by gamma (null: 1) and, with centre, its rows centred (LayerNorm: applied to
// dir, the same by linearity); g(h) the held KV head of local head h): the key attribution of
// every upstream component c of head h is then attr[b, h, c] = delta[b, c, :] . dir[b, h, :], the
// same sums as contracting G = delta W_K,g^T with qk (attr_contract) in Hl / (KVl d) of its
// products.
void key_directions(const bf16_bits* Wk, const float* gamma, bool centre, const float* qk, int B,
                    int Hl, int KVl, int d, int D, int head_begin, int group, int kv_begin,
                    float* dir, cudaStream_t s);

// attr[b, h, c] = sum_j G[b, c, g(h)*d + j] * qk[b, h, j] for c < C; G rows have width KVl*d and
// probe stride g_bstride.
void attr_contract(const float* G, int64_t g_bstride, const float* qk, int B, int C, int Hl,
                   int KVl, int d, int head_begin, int group, int kv_begin, float* attr,
                   cudaStream_t s);

}  // namespace sinkscope::cuda::k
