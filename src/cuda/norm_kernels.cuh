// Host launchers of norm_kernels.cu (see kernels.cuh for the conventions shared by every launcher:
// plain pointers, bf16 as bf16_bits, stream order, empty sizes do nothing, launch errors throw).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "cuda/device_buffer.hpp"

namespace sinkscope::cuda::k {

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * gamma in fp32, stored as bf16 (out_bf) and,
// where not null, fp32 (out_f32), packed rows of D; inv_rms[r] = that 1 / sqrt(...) where not
// null. x's rows are ld apart (0: D; latent attention normalises column ranges of wider rows).
void rms_norm(const float* x, int64_t rows, int D, const float* gamma, float eps, bf16_bits* out_bf,
              float* out_f32, float* inv_rms, cudaStream_t s, int64_t ld = 0);

// The fused per-head step after the qkv product. qkv [B T, ld] (B probes of T positions) holds q
// (Hl heads), k (KVl), v (KVl) of width d each, fp32. q and k get their per-head RMSNorm (q_gamma
// / k_gamma; none where null) then RoPE at position r % T on their first rot dims (rotate_half over
// those, cos/sin tables [T, rot/2]; dims rot..d-1 unrotated); q, k, v go to the attention operands
// Qa [B T, Hl, dp], Ka/Va [B T, KVl, dp] in bf16 with dims d..dp-1 zero. d <= 128.
//
// Where qbar is not null, qbar [B, Hl d] = the mean over positions i = 1..nq-1 of each probe's
// normed rotated q in fp32 (nq 0 or above T means T; zeros when nq < 2), deterministic. Head dim
// 128 without padding and with full or no rotation (the common shape) sums q as it goes and leaves
// qkv as it was; the general kernel writes the normed rotated q back into qkv's q columns (qbar
// or not) and averages them there (column_mean_rest). `scratch` holds qk_norm_rope_scratch(B, T,
// Hl, KVl, d) floats (either kernel).
void qk_norm_rope(float* qkv, int B, int T, int ld, int Hl, int KVl, int d, int dp, int rot,
                  const float* q_gamma, const float* k_gamma, float eps, const float* cos_tab,
                  const float* sin_tab, bf16_bits* Qa, bf16_bits* Ka, bf16_bits* Va, float* qbar,
                  int nq, float* scratch, cudaStream_t s);
int64_t qk_norm_rope_scratch(int B, int T, int Hl, int KVl, int d);

// norms[r] = ||x[r, 0:D]|| for rows r (row stride ld).
void row_norms(const float* x, int64_t rows, int D, int64_t ld, float* norms, cudaStream_t s);

// out[b, c] = mean over i = 1..count-1 of x[b*T + i, c] (row stride ld), for B probes and ncols
// columns; count 0 means T (a sliding window's sink queries are fewer). `partial` is scratch of
// column_mean_scratch(B, T, ncols) floats. Deterministic (no atomics).
int64_t column_mean_scratch(int B, int T, int ncols);
void column_mean_rest(const float* x, int B, int T, int ncols, int64_t ld, float* partial,
                      float* out, cudaStream_t s, int count = 0);
void column_mean_rest(const bf16_bits* x, int B, int T, int ncols, int64_t ld, float* partial,
                      float* out, cudaStream_t s, int count = 0);

// x[i] += a[i]
void add_inplace(float* x, const float* a, int64_t n, cudaStream_t s);
// x[r, :] += m[r, :] for rows r = 0, row_step, 2 row_step, ... (`rows` of them; rows of D packed
// floats), with m_norms[r] = ||m[r]|| and x_norms[r] = ||x[r]|| after the add, in one pass.
void add_rows_norms(float* x, const float* m, int64_t rows, int D, float* m_norms, float* x_norms,
                    cudaStream_t s, int64_t row_step = 1);

// x[r, :] = table[tokens[r], :] (bf16 -> fp32).
void embed_gather(const bf16_bits* table, const int32_t* tokens, int64_t n, int D, float* x,
                  cudaStream_t s);

// The embedding's position-0 bookkeeping per probe b: delta = x[b*T] - mean_rest[b] (stored at
// delta + b * delta_bstride), optional mean-ablation of x[b*T], p0_sum[b] = x[b*T].
void embed_p0(float* x, int B, int T, int D, const float* mean_rest, bool ablate, float* delta,
              int64_t delta_bstride, float* p0_sum, cudaStream_t s);

// The median of |x| over n fp32 values (the mean of the two middle ones for even n), exactly, on
// the device, on the fp32 bit patterns with the sign cleared (NaN patterns above infinity). From
// n = 2^18 on: a stratified sample brackets the middle, one read of x counts the elements below and
// at the bracket's ends and keeps those inside (about 1% of x), and a select among those finishes;
// when the bracket misses, falls back on the two-pass radix select (the top 15 bits, then the low
// 16 among the elements of the chosen bins) that smaller and very large n take directly. Three
// stream operations (the sample, the bracket pass and a cooperative finishing kernel; the two
// passes alone: a memset and that kernel); each kernel reads the route the one before it chose, so
// nothing waits for the host. scratch holds abs_median_scratch_bytes() (8.4 MB, most of it the
// candidate buffer); *out (device) receives the median. force is a test hook.
enum class AbsMedianForce {
  kNone,
  kTwoPass,      // the two passes alone
  kMissBracket,  // a collapsed bracket (hi = lo): misses, so falls back, unless the middle is a tie
  kTinyBuffer,   // room for 16 candidates: overflows, so falls back, if a middle rank needs them
};
size_t abs_median_scratch_bytes();
void abs_median(const float* x, int64_t n, void* scratch, float* out, cudaStream_t s,
                AbsMedianForce force = AbsMedianForce::kNone);

// How the last abs_median on this scratch found the median (tests; reads the device synchronously).
enum class AbsMedianRoute : unsigned {
  kTwoPass,           // the two passes alone (n < 2^18, very large n, or forced)
  kEnds,              // one read: both middle ranks at the bracket's ends (ties)
  kCandidates,        // one read and a select among the candidates
  kFallbackWide,      // the bracket spans more than 2^25 patterns: the two passes
  kFallbackMissed,    // the bracket missed a middle rank: the two passes after the read
  kFallbackOverflow,  // the candidates overflowed the buffer: the two passes after the read
};
AbsMedianRoute abs_median_route(const void* scratch);

// out[r] = mean of a[r, 0..cols) (double sums), rows with row stride ld >= cols.
void row_means(const float* a, int64_t rows, int cols, int64_t ld, float* out, cudaStream_t s);

}  // namespace sinkscope::cuda::k
