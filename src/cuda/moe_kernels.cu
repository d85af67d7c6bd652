// The MoE block's kernels: router softmax + top-k, row gathers for the grouped expert products,
// SwiGLU, the weighted combine back to token order, and the per-(probe, expert) position-0 and
// rest-of-sequence write sums the recorder needs.
#include <algorithm>
#include <climits>
#include <cub/block/block_scan.cuh>

#include "cuda/device_common.cuh"
#include "cuda/grouped_gemm.cuh"
#include "cuda/moe_kernels.cuh"

namespace sinkscope::cuda::k {
namespace {

// A near-tie: the k-th and (k+1)-th routing scores (probabilities, or DeepSeek's corrected
// sigmoid scores) closer than this. The router's input differs from the CPU's by the bf16 rounding
// of the products before it (a few 1e-3 relative, growing over layers), which moves logits of
// order 1 by ~1e-2 and top probabilities or sigmoid scores by a few 1e-3: a gap below 1e-2 can
// flip between the backends.
constexpr float kNearTieGap = 1e-2f;

constexpr int kMaxTopK = 32;

// Warp per token row; lane holds experts e = lane + 32 t. Probabilities in double as
// src/cpu/backend.cpp.
template <int EPL>
__global__ void router_topk_kernel(const float* __restrict__ logits, int64_t n, int E, int K,
                                   bool norm_topk, int32_t* __restrict__ ids,
                                   float* __restrict__ weights, float* __restrict__ gap) {
  const int lane = threadIdx.x & 31;
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= n) return;
  const float* lr = logits + r * E;
  float mx = -INFINITY;
  float l[EPL];
#pragma unroll
  for (int t = 0; t < EPL; ++t) {
    const int e = lane + 32 * t;
    l[t] = e < E ? lr[e] : -INFINITY;
    mx = fmaxf(mx, l[t]);
  }
  mx = warp_max(mx);
  double p[EPL];
  double sum = 0;
#pragma unroll
  for (int t = 0; t < EPL; ++t) {
    const int e = lane + 32 * t;
    p[t] = e < E ? exp(static_cast<double>(l[t]) - static_cast<double>(mx)) : 0.0;
    sum += p[t];
  }
  sum = warp_sum(sum);
#pragma unroll
  for (int t = 0; t < EPL; ++t) {
    const int e = lane + 32 * t;
    p[t] = e < E ? p[t] / sum : -1.0;  // -1: not a candidate
  }
  double chosen[kMaxTopK];
  double wsum = 0, last = 0;
  const int rounds = K < E ? K + 1 : K;
  for (int k = 0; k < rounds; ++k) {
    double bv = -2.0;
    int bi = INT_MAX;
#pragma unroll
    for (int t = 0; t < EPL; ++t) {
      const int e = lane + 32 * t;
      if (p[t] > bv || (p[t] == bv && e < bi)) {
        bv = p[t];
        bi = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const double ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (k == K) {  // the (k+1)-th: only its distance to the k-th
      if (lane == 0) gap[r] = static_cast<float>(last - bv);
      break;
    }
#pragma unroll
    for (int t = 0; t < EPL; ++t)
      if (lane + 32 * t == bi) p[t] = -1.0;
    chosen[k] = bv;
    wsum += bv;
    last = bv;
    if (lane == 0) ids[r * K + k] = bi;
  }
  if (rounds == K && lane == 0) gap[r] = 1.f;
  if (lane == 0)
    for (int k = 0; k < K; ++k)
      weights[r * K + k] = static_cast<float>(norm_topk ? chosen[k] / wsum : chosen[k]);
}

// dst[i] = src[rows[i] / div], rows of `width` elements of V: bf16_bits, or uint4 (16-byte copies)
// when rows are multiples of 8 bf16 (every Qwen3 width).
template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ src, const int32_t* __restrict__ rows,
                                   int div, int width, V* __restrict__ dst) {
  const int64_t i = blockIdx.x;
  const V* s = src + static_cast<int64_t>(rows[i] / div) * width;
  for (int c = threadIdx.x; c < width; c += blockDim.x) dst[i * width + c] = s[c];
}

__global__ void swiglu_kernel(const bf16_bits* __restrict__ h, int64_t n, int I,
                              bf16_bits* __restrict__ act) {
  const int64_t total = n * I;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / I;
    const int c = static_cast<int>(idx % I);
    const float g = bf2f(h[r * 2 * I + c]), u = bf2f(h[r * 2 * I + I + c]);
    act[idx] = f2bf(g / (1.f + expf(-g)) * u);
  }
}

__global__ void pair_info_kernel(const int32_t* __restrict__ src_pair,
                                 const float* __restrict__ weights, int64_t npairs, int K,
                                 int64_t tok0, float* __restrict__ pos_w,
                                 int32_t* __restrict__ pos_tok) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < npairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t sp = src_pair[p];
    pos_w[p] = weights[sp];
    pos_tok[p] = static_cast<int32_t>(tok0 + sp / K);
  }
}

// W consecutive bf16 as floats: one 2-, 8- or 16-byte load.
template <int W>
__device__ __forceinline__ void load_bf16(const bf16_bits* p, float (&v)[W]) {
  if constexpr (W == 1) {
    v[0] = bf2f(*p);
  } else if constexpr (W == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const uint32_t w[2] = {u.x, u.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else {
    static_assert(W == 8, "1, 4 or 8 bf16 per load");
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
}

// Block per token: its K weights and pair positions staged once; each thread sums W consecutive
// columns (16-byte loads of the bf16 expert outputs where D allows), the pairs in k order. The sum
// m[r] goes to out[r], or with kAdd into the residual, out[r] += m[r], except a probe's position-0
// rows (r % T == 0) when held is given: those go to held[r] for the recording's ablation to edit
// before they are added. For the rows added here, kNorms: m_norms[r] = ||m[r]|| and x_norms[r] =
// ||out[r]|| after the add; kNext: the next layer's input RMSNorm of the new row (its sum of
// squares is ||out[r]||^2), as norm_rows forms it, from the values still in registers.
template <int W, bool kAdd, bool kNorms, bool kNext>
__global__ void __launch_bounds__(256)
    combine_kernel(const bf16_bits* __restrict__ back, const int32_t* __restrict__ pos_of_pair,
                   const float* __restrict__ weights, int K, int D, int T, float* __restrict__ out,
                   float* __restrict__ held, float* __restrict__ m_norms,
                   float* __restrict__ x_norms, NextNorm next) {
  static_assert(kAdd || !(kNorms || kNext), "the norms come with the add");
  __shared__ float w_s[32];
  __shared__ int64_t row_s[32];
  const int64_t r = blockIdx.x;
  const bool hold = kAdd && held != nullptr && r % T == 0;  // the same for the whole block
  const bool add = kAdd && !hold;
  float* dst = (hold ? held : out) + r * D;
  if (threadIdx.x < K) {
    w_s[threadIdx.x] = weights[r * K + threadIdx.x];
    row_s[threadIdx.x] = static_cast<int64_t>(pos_of_pair[r * K + threadIdx.x]) * D;
  }
  __syncthreads();
  float sm = 0.f, sx = 0.f;
  float res[W];  // the last columns' new values, kept for kNext
  int c_last = -1;
  for (int c = threadIdx.x * W; c < D; c += blockDim.x * W) {
    float acc[W];
#pragma unroll
    for (int i = 0; i < W; ++i) acc[i] = 0.f;
    for (int j = 0; j < K; ++j) {
      float v[W];
      load_bf16<W>(back + row_s[j] + c, v);
#pragma unroll
      for (int i = 0; i < W; ++i) acc[i] += w_s[j] * v[i];
    }
#pragma unroll
    for (int i = 0; i < W; ++i) res[i] = acc[i];
    if (add) {
      if constexpr (W == 1) {
        res[0] += dst[c];
      } else {
#pragma unroll
        for (int i = 0; i < W; i += 4) {
          const float4 xv = *reinterpret_cast<const float4*>(dst + c + i);
          res[i] += xv.x;
          res[i + 1] += xv.y;
          res[i + 2] += xv.z;
          res[i + 3] += xv.w;
        }
      }
    }
    if constexpr (kNorms || kNext) {
#pragma unroll
      for (int i = 0; i < W; ++i) {
        sm += acc[i] * acc[i];
        sx += res[i] * res[i];
      }
    }
    if constexpr (W == 1) {
      dst[c] = res[0];
    } else {
#pragma unroll
      for (int i = 0; i < W; i += 4)
        *reinterpret_cast<float4*>(dst + c + i) =
            make_float4(res[i], res[i + 1], res[i + 2], res[i + 3]);
    }
    c_last = c;
  }
  if constexpr (kNorms || kNext) {
    if (hold) return;  // its norms come with its add, after the ablation
    if constexpr (kNorms) sm = block_sum(sm);
    sx = block_sum(sx);
    if (kNorms && threadIdx.x == 0) {
      m_norms[r] = sqrtf(sm);
      x_norms[r] = sqrtf(sx);
    }
  }
  if constexpr (kNext) {
    const float inv = 1.f / sqrtf(sx / static_cast<float>(D) + next.eps);
    if (threadIdx.x == 0) next.inv[r] = inv;
    for (int c = threadIdx.x * W; c < D; c += blockDim.x * W) {
      float v[W];
#pragma unroll
      for (int i = 0; i < W; ++i) v[i] = c == c_last ? res[i] : dst[c + i];  // own writes
      bf16_bits h[W];
#pragma unroll
      for (int i = 0; i < W; ++i) h[i] = f2bf(v[i] * inv * next.gamma[c + i]);
      if constexpr (W == 1) {
        next.u[r * D + c] = h[0];
      } else {
        uint32_t w[W / 2];
#pragma unroll
        for (int i = 0; i < W / 2; ++i)
          w[i] = static_cast<uint32_t>(h[2 * i]) | (static_cast<uint32_t>(h[2 * i + 1]) << 16);
        *reinterpret_cast<uint4*>(next.u + r * D + c) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }
}

__global__ void segment_sums_kernel(const float* __restrict__ rows, const float* __restrict__ row_w,
                                    const int32_t* __restrict__ row_tok, int64_t tok0,
                                    const int32_t* __restrict__ seg, int D, int T,
                                    float* __restrict__ out_rows) {
  const int i = blockIdx.x;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= D) return;
  const int begin = seg[3 * i], end = seg[3 * i + 1], out = seg[3 * i + 2];
  float acc = 0.f;
  for (int p = begin; p < end; ++p) {
    const int64_t tok = row_tok ? row_tok[p] : tok0 + p;
    if (tok % T == 0) continue;
    const float w = row_w ? row_w[p] : 1.f;
    acc += w * rows[static_cast<int64_t>(p) * D + c];
  }
  out_rows[static_cast<int64_t>(out) * D + c] = acc;
}

__global__ void p0_rows_kernel(const float* __restrict__ rows, const float* __restrict__ row_w,
                               const int32_t* __restrict__ items, int D, float* __restrict__ p0_out,
                               float* __restrict__ n0_out) {
  const int i = blockIdx.x;
  const int row = items[2 * i], out = items[2 * i + 1];
  const float w = row_w ? row_w[row] : 1.f;
  double ss = 0;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    const float v = w * rows[static_cast<int64_t>(row) * D + c];
    p0_out[static_cast<int64_t>(out) * D + c] = v;
    ss += static_cast<double>(v) * v;
  }
  ss = block_sum(ss);
  if (threadIdx.x == 0) n0_out[out] = static_cast<float>(sqrt(ss));
}

// counts[e] += pairs routed to e; ties[0] += rows whose k-th / (k+1)-th gap is < kNearTieGap. Ids
// outside [0, E) (NaN logits) are not counted: the caller sees fewer pairs than it routed.
__global__ void expert_histogram_kernel(const int32_t* __restrict__ ids, int64_t npairs, int E,
                                        const float* __restrict__ gap, int64_t n,
                                        int32_t* __restrict__ counts, int32_t* __restrict__ ties) {
  extern __shared__ int32_t local[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) local[e] = 0;
  __syncthreads();
  int32_t my_ties = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < npairs;
       p += stride) {
    const int e = ids[p];
    if (e >= 0 && e < E) atomicAdd(&local[e], 1);  // NaN logits pick no expert (id INT_MAX)
  }
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < n; r += stride)
    my_ties += gap[r] < kNearTieGap ? 1 : 0;
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (local[e]) atomicAdd(&counts[e], local[e]);
  if (my_ties) atomicAdd(ties, my_ties);
}

// Stable counting sort of the pairs by expert in three parallel steps. The pairs are cut into
// chunks of kSortChunk, one warp each: (1) per-chunk expert counts, (2) per expert, an exclusive
// scan of its counts over the chunks (+ offsets[e]) gives each chunk's first position, (3) each
// warp walks its chunk in order, 32 pairs a step, and places pair p at its chunk's running position
// for its expert plus its rank among the step's lanes with the same expert (__match_any_sync), so
// the pairs of an expert stay in pair order.
constexpr int kSortChunk = 1024, kSortWarps = 4;

__global__ void chunk_counts_kernel(const int32_t* __restrict__ ids, int64_t npairs, int E,
                                    int nchunks, int32_t* __restrict__ counts) {
  extern __shared__ int32_t sort_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int chunk = blockIdx.x * kSortWarps + warp;
  int32_t* local = sort_smem + warp * E;
  for (int e = lane; e < E; e += 32) local[e] = 0;
  __syncwarp();
  if (chunk < nchunks) {
    const int64_t p0 = static_cast<int64_t>(chunk) * kSortChunk;
    const int64_t p1 = p0 + kSortChunk < npairs ? p0 + kSortChunk : npairs;
    for (int64_t p = p0 + lane; p < p1; p += 32) {
      const int e = ids[p];
      if (e >= 0 && e < E) atomicAdd(&local[e], 1);  // (the caller stops before: see histogram)
    }
    __syncwarp();
    for (int e = lane; e < E; e += 32) counts[static_cast<int64_t>(chunk) * E + e] = local[e];
  }
}

constexpr int kScanThreads = 256;
__global__ void __launch_bounds__(kScanThreads)
    chunk_scan_kernel(const int32_t* __restrict__ counts, const int32_t* __restrict__ offsets,
                      int E, int nchunks, int32_t* __restrict__ base) {
  using Scan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename Scan::TempStorage scratch;
  const int e = blockIdx.x;
  int32_t carry = offsets[e];
  for (int c0 = 0; c0 < nchunks; c0 += kScanThreads) {
    const int c = c0 + static_cast<int>(threadIdx.x);
    const int32_t v = c < nchunks ? counts[static_cast<int64_t>(c) * E + e] : 0;
    int32_t before = 0, total = 0;
    Scan(scratch).ExclusiveSum(v, before, total);
    if (c < nchunks) base[static_cast<int64_t>(c) * E + e] = carry + before;
    carry += total;
    __syncthreads();  // scratch is reused by the next tile
  }
}

__global__ void chunk_place_kernel(const int32_t* __restrict__ ids, int64_t npairs, int E,
                                   int nchunks, const int32_t* __restrict__ base,
                                   int32_t* __restrict__ src_pair,
                                   int32_t* __restrict__ pos_of_pair) {
  extern __shared__ int32_t sort_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int chunk = blockIdx.x * kSortWarps + warp;
  if (chunk >= nchunks) return;  // whole warps only: no block-wide barrier follows
  int32_t* run = sort_smem + warp * E;
  for (int e = lane; e < E; e += 32) run[e] = base[static_cast<int64_t>(chunk) * E + e];
  __syncwarp();
  const int64_t p0 = static_cast<int64_t>(chunk) * kSortChunk;
  const int64_t p1 = p0 + kSortChunk < npairs ? p0 + kSortChunk : npairs;
  const unsigned lower = (1u << lane) - 1u;
  for (int64_t step = p0; step < p1; step += 32) {
    const int64_t p = step + lane;
    const bool valid = p < p1 && ids[p] >= 0 && ids[p] < E;
    const unsigned mask = __ballot_sync(0xffffffffu, valid);
    int e = 0, rank = 0, same = 0;
    if (valid) {
      e = ids[p];
      const unsigned peers = __match_any_sync(mask, e);
      rank = __popc(peers & lower);
      same = __popc(peers);
      const int32_t pos = run[e] + rank;
      src_pair[pos] = static_cast<int32_t>(p);
      pos_of_pair[p] = pos;
    }
    __syncwarp();  // every lane has read run[] before the first of each group advances it
    if (valid && rank == 0) run[e] += same;
    __syncwarp();
  }
}

__device__ __forceinline__ int lower_bound_tok(const int32_t* __restrict__ tok, int lo, int hi,
                                               int64_t value) {
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (tok[mid] < value)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// The rows [begin, end) of expert e's pairs whose token is probe b's position 1..T-1 (the pairs of
// an expert are in token order), split z of gridDim.z.
__device__ __forceinline__ void rest_rows(const int32_t* __restrict__ pos_tok,
                                          const int32_t* __restrict__ offsets,
                                          const int32_t* __restrict__ counts, int e, int b, int T,
                                          int& begin, int& end) {
  const int lo = offsets[e], hi = lo + counts[e];
  const int first = lower_bound_tok(pos_tok, lo, hi, static_cast<int64_t>(b) * T + 1);
  const int last = lower_bound_tok(pos_tok, first, hi, static_cast<int64_t>(b + 1) * T);
  const int64_t n = last - first;
  begin = first + static_cast<int>(n * blockIdx.z / gridDim.z);
  end = first + static_cast<int>(n * (blockIdx.z + 1) / gridDim.z);
}

// Block (e, b, split) sums w * row over its rows into out_rows[(split * B + b) * S + e] (the splits
// are summed in order by rest_splits_sum_kernel). Each thread owns W consecutive columns (W > 1
// needs D % W == 0: aligned loads and stores) and keeps 4 rows in flight: the pass is memory
// bound, so what counts is the bytes in flight. Every W sums each column in the same order.
constexpr int kRestThreads = 256;

template <int W>
__global__ void __launch_bounds__(kRestThreads)
    expert_rest_sums_kernel(const bf16_bits* __restrict__ rows, const float* __restrict__ row_w,
                            const int32_t* __restrict__ pos_tok,
                            const int32_t* __restrict__ offsets, const int32_t* __restrict__ counts,
                            int B, int T, int S, int D, float* __restrict__ out_rows) {
  const int e = blockIdx.x / B, b = blockIdx.x % B;
  int begin = 0, end = 0;
  rest_rows(pos_tok, offsets, counts, e, b, T, begin, end);
  const int c = (blockIdx.y * kRestThreads + threadIdx.x) * W;
  if (c >= D) return;
  float acc[W];
#pragma unroll
  for (int i = 0; i < W; ++i) acc[i] = 0.f;
  int p = begin;
  for (; p + 4 <= end; p += 4) {
    float v[4][W], w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      load_bf16<W>(rows + static_cast<int64_t>(p + j) * D + c, v[j]);
      w[j] = row_w[p + j];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < W; ++i) acc[i] += w[j] * v[j][i];
  }
  for (; p < end; ++p) {
    float v[W];
    load_bf16<W>(rows + static_cast<int64_t>(p) * D + c, v);
    const float w = row_w[p];
#pragma unroll
    for (int i = 0; i < W; ++i) acc[i] += w * v[i];
  }
  float* out = out_rows + ((static_cast<int64_t>(blockIdx.z) * B + b) * S + e) * D + c;
  if constexpr (W == 1) {
    out[0] = acc[0];
  } else {
#pragma unroll
    for (int i = 0; i < W; i += 4)
      *reinterpret_cast<float4*>(out + i) = make_float4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]);
  }
}

// Block (e, b) x columns: expert e's rest sum over probe b from the down product's tile sums
// (RestTap, grouped_gemm.cuh), added in tile order over the expert's row tiles whose first and
// last rows' probes bracket b: exactly the tiles whose epilogue wrote a sum for b.
constexpr int kTileSumThreads = 128;

template <int W>
__global__ void __launch_bounds__(kTileSumThreads)
    rest_from_tiles_kernel(const float* __restrict__ part, const int32_t* __restrict__ pos_tok,
                           const int32_t* __restrict__ offsets, const int32_t* __restrict__ counts,
                           const int32_t* __restrict__ tile_base, int B, int T, int S, int D,
                           float* __restrict__ out_rows) {
  dependent_kernel_start();
  const int e = blockIdx.x / B, b = blockIdx.x % B;
  const int c = (blockIdx.y * kTileSumThreads + threadIdx.x) * W;
  float acc[W];
#pragma unroll
  for (int i = 0; i < W; ++i) acc[i] = 0.f;
  // The tiles holding probe b are consecutive (rows in token order): the block's threads test
  // one tile each for its first and last tile, then every thread adds that run in order.
  __shared__ int run_lo, run_hi;
  if (threadIdx.x == 0) {
    run_lo = INT_MAX;
    run_hi = -1;
  }
  __syncthreads();
  const int off = offsets[e], rows = counts[e], base = tile_base[e];
  for (int i = threadIdx.x; i * kGroupedTileRows < rows; i += blockDim.x) {
    const int first = off + i * kGroupedTileRows,
              last = off + min(rows, (i + 1) * kGroupedTileRows) - 1;
    if (pos_tok[first] / T <= b && pos_tok[last] / T >= b) {
      atomicMin(&run_lo, i);
      atomicMax(&run_hi, i);
    }
  }
  __syncthreads();
  if (c < D) {
    for (int i = run_lo; i <= run_hi; ++i) {
      const float* src = part + (static_cast<int64_t>(base + i) * B + b) * D + c;
      if constexpr (W == 4) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(src));
        acc[0] += v.x;
        acc[1] += v.y;
        acc[2] += v.z;
        acc[3] += v.w;
      } else {
        acc[0] += __ldg(src);
      }
    }
  }
  if (c >= D) return;
  float* out = out_rows + (static_cast<int64_t>(b) * S + e) * D + c;
  if constexpr (W == 4)
    *reinterpret_cast<float4*>(out) = make_float4(acc[0], acc[1], acc[2], acc[3]);
  else
    out[0] = acc[0];
}

// out[i] = sum over the splits, in split order, of parts[split * n + i].
__global__ void rest_splits_sum_kernel(const float* __restrict__ parts, int64_t n, int splits,
                                       float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int z = 0; z < splits; ++z) acc += parts[z * n + i];
    out[i] = acc;
  }
}

// Block (b, k) < B K: the k-th pair of probe b's position 0 when that token is in the slice
// [s0, s1); the last block: the rest counts (no atomics: the same sums every run).
__global__ void p0_pairs_kernel(const bf16_bits* __restrict__ rows, const float* __restrict__ pos_w,
                                const int32_t* __restrict__ ids,
                                const int32_t* __restrict__ pos_of_pair,
                                const int32_t* __restrict__ counts, int B, int T, int K, int64_t s0,
                                int64_t s1, int S, int E1, int D, bool vec,
                                float* __restrict__ p0_out, float* __restrict__ n0_out,
                                float* __restrict__ r0_out, float* __restrict__ rc_out) {
  dependent_kernel_start();
  if (blockIdx.x == gridDim.x - 1) {  // the last block: rc_out[e] = counts[e] - e's p0 pairs
    for (int e = threadIdx.x; e < E1; e += blockDim.x) {
      int c = counts[e];
      for (int b = 0; b < B; ++b) {
        const int64_t token = static_cast<int64_t>(b) * T;
        if (token < s0 || token >= s1) continue;
        for (int k = 0; k < K; ++k) c -= ids[(token - s0) * K + k] == e;
      }
      rc_out[e] = static_cast<float>(c);  // exact: small integers
    }
    return;
  }
  const int b = blockIdx.x / K, k = blockIdx.x % K;
  const int64_t token = static_cast<int64_t>(b) * T;
  if (token < s0 || token >= s1) return;
  const int64_t p = (token - s0) * K + k;
  const int pos = pos_of_pair[p], e = ids[p];
  // A NaN-routed pair (no expert) is left out; the backend reports the router once the counts
  // reach the host.
  if (e < 0 || e >= E1) return;
  const float w = pos_w[pos];
  float* out = p0_out + (static_cast<int64_t>(b) * S + e) * D;
  const bf16_bits* row = rows + static_cast<int64_t>(pos) * D;
  double ss = 0;
  if (vec) {  // 8 values a load (D % 8 == 0, 16-byte aligned rows and out)
    for (int c = threadIdx.x * 8; c < D; c += blockDim.x * 8) {
      const uint4 u = *reinterpret_cast<const uint4*>(row + c);
      const uint32_t pr[4] = {u.x, u.y, u.z, u.w};
      float v[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[2 * j] = w * __uint_as_float(pr[j] << 16);
        v[2 * j + 1] = w * __uint_as_float(pr[j] & 0xffff0000u);
      }
      *reinterpret_cast<float4*>(out + c) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(out + c + 4) = make_float4(v[4], v[5], v[6], v[7]);
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += static_cast<double>(v[j]) * v[j];
    }
  } else {
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
      const float v = w * bf2f(row[c]);
      out[c] = v;
      ss += static_cast<double>(v) * v;
    }
  }
  ss = block_sum(ss);
  if (threadIdx.x == 0) {
    n0_out[static_cast<int64_t>(b) * S + e] = static_cast<float>(sqrt(ss));
    r0_out[static_cast<int64_t>(b) * E1 + e] = 1.f;
  }
}

}  // namespace

void router_topk(const float* logits, int64_t n, int E, int K, bool norm_topk, int32_t* ids,
                 float* weights, float* gap, cudaStream_t s) {
  if (n == 0) return;
  if (K > kMaxTopK || K > E || E > 32 * 32)
    throw_api_failure(
        "CUDA",
        "unsupported router shape (E=" + std::to_string(E) + ", k=" + std::to_string(K) + ")",
        "router_topk", __FILE__, __LINE__);
  constexpr int warps = 4;
  const unsigned grid = static_cast<unsigned>((n + warps - 1) / warps);
#define SINKSCOPE_ROUTER_CASE(N)                                                     \
  if (E <= 32 * N) {                                                                 \
    router_topk_kernel<N>                                                            \
        <<<grid, warps * 32, 0, s>>>(logits, n, E, K, norm_topk, ids, weights, gap); \
    CUDA_CHECK_LAUNCH("router_topk_kernel");                                         \
    return;                                                                          \
  }
  SINKSCOPE_ROUTER_CASE(1)
  SINKSCOPE_ROUTER_CASE(2)
  SINKSCOPE_ROUTER_CASE(4)
  SINKSCOPE_ROUTER_CASE(8)
  SINKSCOPE_ROUTER_CASE(16)
  SINKSCOPE_ROUTER_CASE(32)
#undef SINKSCOPE_ROUTER_CASE
}

void gather_rows(const bf16_bits* src, const int32_t* rows, int div, int64_t n, int D,
                 bf16_bits* dst, cudaStream_t s) {
  if (n == 0) return;
  const bool aligned = D % 8 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  if (aligned) {
    gather_rows_kernel<uint4><<<static_cast<unsigned>(n), 128, 0, s>>>(
        reinterpret_cast<const uint4*>(src), rows, div, D / 8, reinterpret_cast<uint4*>(dst));
  } else {
    gather_rows_kernel<bf16_bits><<<static_cast<unsigned>(n), 256, 0, s>>>(src, rows, div, D, dst);
  }
  CUDA_CHECK_LAUNCH("gather_rows_kernel");
}

void swiglu(const bf16_bits* h, int64_t n, int I, bf16_bits* act, cudaStream_t s) {
  if (n == 0) return;
  swiglu_kernel<<<grid_for(n * I, 256, 65536), 256, 0, s>>>(h, n, I, act);
  CUDA_CHECK_LAUNCH("swiglu_kernel");
}

void pair_info(const int32_t* src_pair, const float* weights, int64_t npairs, int K, int64_t tok0,
               float* pos_w, int32_t* pos_tok, cudaStream_t s) {
  if (npairs == 0) return;
  pair_info_kernel<<<grid_for(npairs, 256, 4096), 256, 0, s>>>(src_pair, weights, npairs, K, tok0,
                                                               pos_w, pos_tok);
  CUDA_CHECK_LAUNCH("pair_info_kernel");
}

void combine(const bf16_bits* back, const int32_t* pos_of_pair, const float* weights, int64_t n,
             int K, int D, float* m, cudaStream_t s) {
  if (n == 0) return;
  // Rows of back and m are D elements apart from cudaMalloc'd bases: 16-byte aligned when D % 8 ==
  // 0.
  const unsigned g = static_cast<unsigned>(n);
  if (D % 8 == 0)
    combine_kernel<8, false, false, false>
        <<<g, 256, 0, s>>>(back, pos_of_pair, weights, K, D, 1, m, nullptr, nullptr, nullptr, {});
  else
    combine_kernel<1, false, false, false>
        <<<g, 256, 0, s>>>(back, pos_of_pair, weights, K, D, 1, m, nullptr, nullptr, nullptr, {});
  CUDA_CHECK_LAUNCH("combine_kernel");
}

namespace {
template <int W>
void launch_combine_add(const bf16_bits* back, const int32_t* pos_of_pair, const float* weights,
                        unsigned n, int K, int D, int T, float* x, float* held, float* m_norms,
                        float* x_norms, const NextNorm& next, cudaStream_t s) {
  const bool norms = m_norms != nullptr, nx = next.gamma != nullptr;
  auto go = [&](auto kernel) {
    kernel<<<n, 256, 0, s>>>(back, pos_of_pair, weights, K, D, T, x, held, m_norms, x_norms, next);
  };
  if (norms && nx)
    go(combine_kernel<W, true, true, true>);
  else if (norms)
    go(combine_kernel<W, true, true, false>);
  else if (nx)
    go(combine_kernel<W, true, false, true>);
  else
    go(combine_kernel<W, true, false, false>);
}
}  // namespace

void combine_add(const bf16_bits* back, const int32_t* pos_of_pair, const float* weights, int64_t n,
                 int K, int D, int T, float* x, float* held, float* m_norms, float* x_norms,
                 const NextNorm& next, cudaStream_t s) {
  if (n == 0) return;
  const unsigned g = static_cast<unsigned>(n);
  if (D % 8 == 0)
    launch_combine_add<8>(back, pos_of_pair, weights, g, K, D, T, x, held, m_norms, x_norms, next,
                          s);
  else
    launch_combine_add<1>(back, pos_of_pair, weights, g, K, D, T, x, held, m_norms, x_norms, next,
                          s);
  CUDA_CHECK_LAUNCH("combine_kernel");
}

void segment_sums(const float* rows, const float* row_w, const int32_t* row_tok, int64_t tok0,
                  const int32_t* seg, int nseg, int D, int T, float* out_rows, cudaStream_t s) {
  if (nseg == 0) return;
  segment_sums_kernel<<<dim3(nseg, (D + 127) / 128), 128, 0, s>>>(rows, row_w, row_tok, tok0, seg,
                                                                  D, T, out_rows);
  CUDA_CHECK_LAUNCH("segment_sums_kernel");
}

void p0_rows(const float* rows, const float* row_w, const int32_t* items, int n, int D,
             float* p0_out, float* n0_out, cudaStream_t s) {
  if (n == 0) return;
  p0_rows_kernel<<<n, 256, 0, s>>>(rows, row_w, items, D, p0_out, n0_out);
  CUDA_CHECK_LAUNCH("p0_rows_kernel");
}

void expert_histogram(const int32_t* ids, int64_t npairs, int E, const float* gap, int64_t n,
                      int32_t* counts_and_ties, cudaStream_t s) {
  CUDA_CHECK(cudaMemsetAsync(counts_and_ties, 0, static_cast<size_t>(E + 1) * sizeof(int32_t), s));
  if (npairs == 0 && n == 0) return;
  expert_histogram_kernel<<<grid_for(std::max(npairs, n), 256, 1024), 256,
                            static_cast<size_t>(E) * sizeof(int32_t), s>>>(
      ids, npairs, E, gap, n, counts_and_ties, counts_and_ties + E);
  CUDA_CHECK_LAUNCH("expert_histogram_kernel");
}

int64_t expert_rank_scratch(int64_t npairs, int E) {
  return 2 * ((npairs + kSortChunk - 1) / kSortChunk) * static_cast<int64_t>(E);
}

void expert_rank(const int32_t* ids, int64_t npairs, int E, const int32_t* offsets,
                 int32_t* scratch, int32_t* src_pair, int32_t* pos_of_pair, cudaStream_t s) {
  if (npairs == 0) return;
  const int nchunks = static_cast<int>((npairs + kSortChunk - 1) / kSortChunk);
  int32_t* counts = scratch;
  int32_t* base = scratch + static_cast<int64_t>(nchunks) * E;
  const unsigned blocks = static_cast<unsigned>((nchunks + kSortWarps - 1) / kSortWarps);
  const size_t smem = static_cast<size_t>(kSortWarps) * E * sizeof(int32_t);
  chunk_counts_kernel<<<blocks, kSortWarps * 32, smem, s>>>(ids, npairs, E, nchunks, counts);
  CUDA_CHECK_LAUNCH("chunk_counts_kernel");
  chunk_scan_kernel<<<E, kScanThreads, 0, s>>>(counts, offsets, E, nchunks, base);
  CUDA_CHECK_LAUNCH("chunk_scan_kernel");
  chunk_place_kernel<<<blocks, kSortWarps * 32, smem, s>>>(ids, npairs, E, nchunks, base, src_pair,
                                                           pos_of_pair);
  CUDA_CHECK_LAUNCH("chunk_place_kernel");
}

namespace {
// Row splits per (expert, probe): enough blocks to fill the device, and at most ~256 rows a block
// (the work is a chain of loads per thread), so long probes with few experts per probe still
// spread; with many probes a split of 1 writes the sums directly.
// Columns per thread of the rest sums: 16-byte loads where D allows.
int rest_width(int D) { return D % 8 == 0 ? 8 : D % 4 == 0 ? 4 : 1; }

int rest_splits(int E, int B, int D, int64_t npairs) {
  const int cols = kRestThreads * rest_width(D);
  const int64_t base = static_cast<int64_t>(E) * B * ((D + cols - 1) / cols);
  if (base == 0) return 1;  // a rank with no probes left (B = 0) still joins the collectives
  const int64_t by_blocks = (2048 + base - 1) / base;
  const int64_t by_rows = (npairs / std::max<int64_t>(static_cast<int64_t>(E) * B, 1) + 255) / 256;
  return static_cast<int>(std::min<int64_t>(64, std::max<int64_t>({1, by_blocks, by_rows})));
}
}  // namespace

int64_t expert_rest_sums_scratch(int E, int B, int S, int D, int64_t npairs) {
  const int splits = rest_splits(E, B, D, npairs);
  return splits > 1 ? static_cast<int64_t>(splits) * B * S * D : 0;
}

void expert_rest_sums(const bf16_bits* rows, const float* row_w, const int32_t* pos_tok,
                      const int32_t* offsets, const int32_t* counts, int E, int B, int T, int S,
                      int D, int64_t npairs, float* scratch, float* out_rows, cudaStream_t s) {
  if (E == 0 || B == 0) return;
  const int splits = rest_splits(E, B, D, npairs);
  // With splits, every (split, b, slot) of the scratch is written except the slots >= E of the
  // S-slot rows, which the final sum also reads: zero them once.
  float* dst = splits > 1 ? scratch : out_rows;
  if (splits > 1 && S > E)
    CUDA_CHECK(
        cudaMemsetAsync(scratch, 0, static_cast<size_t>(splits) * B * S * D * sizeof(float), s));
  const int W = rest_width(D), cols = kRestThreads * W;
  const dim3 grid(static_cast<unsigned>(E * B), static_cast<unsigned>((D + cols - 1) / cols),
                  static_cast<unsigned>(splits));
  // Rows are D elements apart from a cudaMalloc'd base: W-aligned loads and stores.
  if (W == 8)
    expert_rest_sums_kernel<8>
        <<<grid, kRestThreads, 0, s>>>(rows, row_w, pos_tok, offsets, counts, B, T, S, D, dst);
  else if (W == 4)
    expert_rest_sums_kernel<4>
        <<<grid, kRestThreads, 0, s>>>(rows, row_w, pos_tok, offsets, counts, B, T, S, D, dst);
  else
    expert_rest_sums_kernel<1>
        <<<grid, kRestThreads, 0, s>>>(rows, row_w, pos_tok, offsets, counts, B, T, S, D, dst);
  CUDA_CHECK_LAUNCH("expert_rest_sums_kernel");
  if (splits > 1) {
    const int64_t n = static_cast<int64_t>(B) * S * D;
    rest_splits_sum_kernel<<<grid_for(n, 256, 8192), 256, 0, s>>>(scratch, n, splits, out_rows);
    CUDA_CHECK_LAUNCH("rest_splits_sum_kernel");
  }
}

void expert_rest_sums_from_tiles(const float* part, const int32_t* pos_tok, const int32_t* offsets,
                                 const int32_t* counts, const int32_t* tile_base, int E, int B,
                                 int T, int S, int D, float* out_rows, cudaStream_t s) {
  if (E == 0 || B == 0) return;
  const int W = D % 4 == 0 ? 4 : 1, cols = kTileSumThreads * W;
  const dim3 grid(static_cast<unsigned>(E * B), static_cast<unsigned>((D + cols - 1) / cols));
  // part and out_rows: cudaMalloc'd bases, rows D floats apart: 16-byte aligned for W == 4.
  if (W == 4)
    launch_dependent("rest_from_tiles_kernel", rest_from_tiles_kernel<4>, dim3(grid),
                     dim3(kTileSumThreads), 0, s, part, pos_tok, offsets, counts, tile_base, B, T,
                     S, D, out_rows);
  else
    launch_dependent("rest_from_tiles_kernel", rest_from_tiles_kernel<1>, dim3(grid),
                     dim3(kTileSumThreads), 0, s, part, pos_tok, offsets, counts, tile_base, B, T,
                     S, D, out_rows);
}

void expert_p0_and_counts(const bf16_bits* rows, const float* pos_w, const int32_t* ids,
                          const int32_t* pos_of_pair, const int32_t* counts, int B, int T, int K,
                          int E, int64_t s0, int64_t s1, int S, int D, float* p0_out, float* n0_out,
                          float* r0_out, float* rc_out, cudaStream_t s) {
  if (E == 0) return;
  const bool vec = D % 8 == 0 && reinterpret_cast<uintptr_t>(rows) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p0_out) % 16 == 0;
  launch_dependent("p0_pairs_kernel", p0_pairs_kernel, dim3(B * K + 1), dim3(256), 0, s, rows,
                   pos_w, ids, pos_of_pair, counts, B, T, K, s0, s1, S, E, D, vec, p0_out, n0_out,
                   r0_out, rc_out);
}

}  // namespace sinkscope::cuda::k
