// Host launchers of mla_kernels.cu: DeepSeek-V3's multi-head latent attention and its routing (see
// kernels.cuh for the conventions shared by every launcher: plain pointers, bf16 as bf16_bits,
// stream order, empty sizes do nothing, launch errors throw). The definitions are those of
// docs/metrics.md "DeepSeek-V3" (contract 1.3), computed on the CPU by src/cpu/mla.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/device_buffer.hpp"

namespace sinkscope::cuda::k {

// The shape of one rank's latent attention: Hl local heads, per head a key of nope + rope dims
// (the attention's head dim) and a value of dv dims; the latent has Rkv dims and the shared rope
// key rope dims; interleave: transformers' rope_interleave (rope dims taken as (x0, x2, ..., x1,
// x3, ...) before rotating, for q and k alike).
struct MlaShape {
  int Hl = 0, nope = 0, rope = 0, dv = 0, Rkv = 0;
  bool interleave = false;
  constexpr int dqk() const { return nope + rope; }
  constexpr int dkv() const { return nope + dv; }
};

// The attention operands of rows r = b * T + i: q [rows, ldq] fp32 holds every local head's
// [nope ; rope] query, kv [rows, Hl * dkv] each head's [k_nope ; v], a [rows, lda] the shared rope
// key at column rope_col. The rope dims of q and k are de-interleaved where asked and rotated at
// position i with the cos / sin tables [T, rope / 2] (which carry yarn's attention factor). Writes
// Qa and Ka [rows, Hl, dp] = [nope ; rotated rope ; zeros] and Va [rows, Hl, dp] = [v ; zeros] in
// bf16, and the rotated query back into q (for qbar).
void mla_pack(float* q, int64_t ldq, const float* kv, const float* a, int64_t lda, int rope_col,
              int64_t rows, int T, const MlaShape& m, int dp, const float* cos_tab,
              const float* sin_tab, bf16_bits* Qa, bf16_bits* Ka, bf16_bits* Va, cudaStream_t s);

// The key attribution through the latent (docs/metrics.md, DeepSeek-V3), per probe b. kid [B, 2,
// Rkv + rope] holds W_kva (gamma (.) row) for row 0 = p0_sum and row 1 = x[b T] (no 1 / r_x yet);
// inv_rx[b T] and inv_rl[b T] are position 0's input and latent scales; kv_b [Hl * dkv, Rkv] bf16,
// kv_gain [Rkv]. Writes k0_model and k0_sum [B, Hl, dqk] (the key at position 0 from x and from
// the components' sum: [kv_b,nope,h (gain (.) l) / (r_x r_l) ; af P rope / r_x], P the
// de-interleave) and qk [B, Hl, Rkv + rope] such that attr[b, h, c] = G[b, c, :] . qk[b, h, :]
// for G = (gamma (.) delta_c) W_kva^T: the latent part scale (gain (.) kv_b,nope,h^T qbar_nope) /
// (r_x r_l), the rope part scale af qbar_rope / r_x placed where P takes it from.
void mla_circuit_finish(const float* kid, const float* inv_rx, const float* inv_rl, int B, int T,
                        const float* qbar, const bf16_bits* kv_b, const float* kv_gain,
                        const MlaShape& m, float af, float scale, float* k0_model, float* k0_sum,
                        float* qk, cudaStream_t s);

// DeepSeek-V3 routing of n rows of router logits [n, E] (src/cpu/mla.cpp's route_sigmoid_groups):
// scores sigmoid(logit), selection on score + bias within the topk_group of n_group groups with
// the largest sums of their two best corrected scores (other groups' corrected scores 0), top K
// (ties to the lower index); weights the scores of the selected, over their sum + 1e-20 when
// norm_topk, times `scaling`. gap[r] = the smaller of the K-th minus the (K+1)-th corrected score
// and the topk_group-th minus the next group's score (near-ties of either choice).
// n_group <= 64, K <= 32.
void router_sigmoid_groups(const float* logits, int64_t n, int E, int K, int n_group,
                           int topk_group, const float* bias, bool norm_topk, float scaling,
                           int32_t* ids, float* weights, float* gap, cudaStream_t s);

}  // namespace sinkscope::cuda::k
