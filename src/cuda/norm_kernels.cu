// RMSNorm, the fused q/k norm + RoPE, row norms, column means, residual adds, the embedding and its
// position-0 bookkeeping, and the two-pass radix select behind the exact median of |x| (probe 0).
#include <cooperative_groups.h>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>

#include "cuda/device_common.cuh"
#include "cuda/norm_kernels.cuh"

namespace sinkscope::cuda::k {
namespace {

constexpr int kNormThreads = 256;

__global__ void rms_norm_kernel(const float* __restrict__ x, int D, int64_t ld,
                                const float* __restrict__ gamma, float eps,
                                bf16_bits* __restrict__ out_bf, float* __restrict__ out_f32,
                                float* __restrict__ inv_rms) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * ld;
  float ss = 0.f;
  for (int c = threadIdx.x; c < D; c += blockDim.x) ss += xr[c] * xr[c];
  ss = block_sum(ss);
  const float inv = 1.f / sqrtf(ss / static_cast<float>(D) + eps);
  if (inv_rms && threadIdx.x == 0) inv_rms[r] = inv;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    const float v = xr[c] * inv * gamma[c];
    out_bf[r * D + c] = f2bf(v);
    if (out_f32) out_f32[r * D + c] = v;
  }
}

// One warp per (row, head slot). The slot's d values go through shared memory (the RoPE partner of
// dimension j is j +- rot/2, usually in another lane); dims [rot, d) pass through unrotated
// (partial rotary, GPT-NeoX).
constexpr int kRopeWarps = 4;
constexpr int kMaxHeadDim = 128;

__global__ void qk_norm_rope_kernel(float* __restrict__ qkv, int64_t rows, int T, int ld, int Hl,
                                    int KVl, int d, int dp, int rot,
                                    const float* __restrict__ q_gamma,
                                    const float* __restrict__ k_gamma, float eps,
                                    const float* __restrict__ cos_tab,
                                    const float* __restrict__ sin_tab, bf16_bits* __restrict__ Qa,
                                    bf16_bits* __restrict__ Ka, bf16_bits* __restrict__ Va) {
  __shared__ float buf[kRopeWarps][kMaxHeadDim];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slot = blockIdx.y * kRopeWarps + warp;
  const int64_t r = blockIdx.x;
  if (slot >= Hl + 2 * KVl || r >= rows) return;
  float* src = qkv + r * ld + static_cast<int64_t>(slot) * d;
  bf16_bits* dst;
  if (slot < Hl)
    dst = Qa + (r * Hl + slot) * dp;
  else if (slot < Hl + KVl)
    dst = Ka + (r * KVl + (slot - Hl)) * dp;
  else
    dst = Va + (r * KVl + (slot - Hl - KVl)) * dp;
  for (int j = d + lane; j < dp; j += 32) dst[j] = 0;  // padding dims
  if (slot >= Hl + KVl) {                              // v: no norm, no rotation
    for (int j = lane; j < d; j += 32) dst[j] = f2bf(src[j]);
    return;
  }
  const float* gamma = slot < Hl ? q_gamma : k_gamma;
  float ss = 0.f;
  for (int j = lane; j < d; j += 32) {
    const float v = src[j];
    buf[warp][j] = v;
    ss += v * v;
  }
  ss = warp_sum(ss);
  // No per-head q/k norm (gamma null): plain RoPE.
  const float inv = gamma ? 1.f / sqrtf(ss / static_cast<float>(d) + eps) : 1.f;
  for (int j = lane; j < d; j += 32) buf[warp][j] *= gamma ? inv * gamma[j] : 1.f;
  __syncwarp();
  const int half = rot / 2;
  const int64_t pos = r % T;
  for (int j = lane; j < d; j += 32) {
    float o = buf[warp][j];
    if (j < half) {
      const float c = cos_tab[pos * half + j], sn = sin_tab[pos * half + j];
      o = o * c - buf[warp][j + half] * sn;
    } else if (j < rot) {
      const float c = cos_tab[pos * half + j - half], sn = sin_tab[pos * half + j - half];
      o = o * c + buf[warp][j - half] * sn;
    }
    dst[j] = f2bf(o);
    if (slot < Hl) src[j] = o;  // the normed, rotated query in fp32 (qbar)
  }
}

// The same for the common shape, head dim 128 with no padding and full or no rotation: each lane
// takes four consecutive dims (16-byte loads, 8-byte stores); the rotation partner j +- 64 of lane
// l's dims sits in lane l ^ 16. A block takes one slot over a run of `run` consecutive positions
// of one probe (the last run of a probe may be shorter), its warps interleaved over the run's rows
// (warp w: positions i0 + w, i0 + w + 8, ...). Blocks are numbered (probe, run, slot), slot
// fastest, so a block's neighbours read the rest of the same rows.
//
// qbar without writing q back (partial not null): a q slot's lanes also sum the normed rotated q
// over their rows at positions 1..nq-1, the block adds its warps' float4 sums in warp order and
// stores them at partial[b, chunk, slot * 128 + dims], chunk being the run's index in its probe,
// for the runs that start before nq (ceil(nq / run) per probe); qbar_finish_kernel adds those in
// a fixed order. No atomics: the same inputs give the same qbar, bit for bit.
constexpr int kRope128Warps = 8;

__global__ void __launch_bounds__(kRope128Warps * 32)
    qk_norm_rope128_kernel(const float* __restrict__ qkv, int T, int run, int runs, int ld, int Hl,
                           int KVl, bool rotate, const float* __restrict__ q_gamma,
                           const float* __restrict__ k_gamma, float eps,
                           const float* __restrict__ cos_tab, const float* __restrict__ sin_tab,
                           int nq, float* __restrict__ partial, bf16_bits* __restrict__ Qa,
                           bf16_bits* __restrict__ Ka, bf16_bits* __restrict__ Va) {
  constexpr int d = 128, half = 64;
  __shared__ float4 sums[kRope128Warps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slots = Hl + 2 * KVl;
  const int64_t probe_run = blockIdx.x / slots;
  const int slot = static_cast<int>(blockIdx.x - probe_run * slots);
  const int b = static_cast<int>(probe_run / runs);
  const int chunk = static_cast<int>(probe_run - static_cast<int64_t>(b) * runs);
  const int i0 = chunk * run, i1 = min(T, i0 + run);
  // The slot's operand: head `head` of `heads` per row.
  bf16_bits* out = Va;
  int heads = KVl, head = slot - Hl - KVl;
  if (slot < Hl) {
    out = Qa;
    heads = Hl;
    head = slot;
  } else if (slot < Hl + KVl) {
    out = Ka;
    head = slot - Hl;
  }
  const float* src =
      qkv + static_cast<int64_t>(b) * T * ld + static_cast<int64_t>(slot) * d + 4 * lane;
  auto load = [&](int i) {
    return *reinterpret_cast<const float4*>(src + static_cast<int64_t>(i) * ld);
  };
  // A warp loads its next row before working on this one: two loads in flight per lane.
  float4 next = i0 + warp < i1 ? load(i0 + warp) : make_float4(0.f, 0.f, 0.f, 0.f);
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int i = i0 + warp; i < i1; i += kRope128Warps) {
    const int64_t r = static_cast<int64_t>(b) * T + i;
    float4 v = next;
    if (i + kRope128Warps < i1) next = load(i + kRope128Warps);
    if (slot < Hl + KVl) {
      const float* gamma = slot < Hl ? q_gamma : k_gamma;
      if (gamma) {
        const float ss = warp_sum(v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w);
        const float inv = 1.f / sqrtf(ss / static_cast<float>(d) + eps);
        const float4 g = *reinterpret_cast<const float4*>(gamma + 4 * lane);
        v = make_float4(v.x * (inv * g.x), v.y * (inv * g.y), v.z * (inv * g.z), v.w * (inv * g.w));
      }
      if (rotate) {
        const float4 o = make_float4(
            __shfl_xor_sync(0xffffffffu, v.x, 16), __shfl_xor_sync(0xffffffffu, v.y, 16),
            __shfl_xor_sync(0xffffffffu, v.z, 16), __shfl_xor_sync(0xffffffffu, v.w, 16));
        const int64_t t = static_cast<int64_t>(i) * half + 4 * (lane & 15);
        const float4 c = *reinterpret_cast<const float4*>(cos_tab + t);
        const float4 sn = *reinterpret_cast<const float4*>(sin_tab + t);
        if (lane < 16)  // dims j < 64: x_j cos - x_{j+64} sin
          v = make_float4(v.x * c.x - o.x * sn.x, v.y * c.y - o.y * sn.y, v.z * c.z - o.z * sn.z,
                          v.w * c.w - o.w * sn.w);
        else  // dims j >= 64: x_j cos + x_{j-64} sin
          v = make_float4(v.x * c.x + o.x * sn.x, v.y * c.y + o.y * sn.y, v.z * c.z + o.z * sn.z,
                          v.w * c.w + o.w * sn.w);
      }
      if (slot < Hl && i >= 1 && i < nq) {
        acc.x += v.x;
        acc.y += v.y;
        acc.z += v.z;
        acc.w += v.w;
      }
    }
    *reinterpret_cast<uint2*>(out + (r * heads + head) * d + 4 * lane) =
        make_uint2(static_cast<uint32_t>(f2bf(v.x)) | (static_cast<uint32_t>(f2bf(v.y)) << 16),
                   static_cast<uint32_t>(f2bf(v.z)) | (static_cast<uint32_t>(f2bf(v.w)) << 16));
  }
  if (!partial || slot >= Hl || i0 >= nq) return;  // the whole block alike
  sums[warp][lane] = acc;
  __syncthreads();
  if (warp != 0) return;
  float4 t = sums[0][lane];
  for (int w = 1; w < kRope128Warps; ++w) {
    const float4 u = sums[w][lane];
    t.x += u.x;
    t.y += u.y;
    t.z += u.z;
    t.w += u.w;
  }
  const int used = (nq + run - 1) / run;
  *reinterpret_cast<float4*>(partial + (static_cast<int64_t>(b) * used + chunk) * Hl * d +
                             slot * d + 4 * lane) = t;
}

// Positions per run of qk_norm_rope128_kernel: the longest power of two from kRope128Warps (a row
// per warp) to kRope128MaxRun (64 rows per warp) that still leaves kRope128MinBlocks blocks, eight
// waves or more on an H200 (132 SMs of at most 8 blocks), so that the last wave's idle SMs cost
// little. Long runs keep the partial sums few: B ceil(T / run) chunks of Hl * 128 floats, at most
// max(B ceil(T / 512), 2 kRope128MinBlocks / slots) chunks (run halves only while too few blocks).
constexpr int kRope128MaxRun = 512;
constexpr int64_t kRope128MinBlocks = 8192;

int rope128_run(int B, int T, int slots) {
  int run = kRope128MaxRun;
  while (run > kRope128Warps &&
         static_cast<int64_t>(B) * ((T + run - 1) / run) * slots < kRope128MinBlocks)
    run /= 2;
  return run;
}

// qbar[b, c] = the sum of partial[b, 0..chunks-1, c] / (nq - 1). A block per (32 columns, probe):
// warp w adds chunks w, w + 32, ..., then warp 0 adds the 32 warps' sums in order (a long prompt's
// single probe has hundreds of chunks, too few columns to spread them over threads one by one).
constexpr int kQbarFinishWarps = 32;

__global__ void __launch_bounds__(kQbarFinishWarps * 32)
    qbar_finish_kernel(const float* __restrict__ partial, int chunks, int ncols, int nq,
                       float* __restrict__ qbar) {
  dependent_kernel_start();
  __shared__ float sums[kQbarFinishWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c = blockIdx.x * 32 + lane, b = blockIdx.y;  // ncols: a multiple of 128
  const float* p = partial + static_cast<int64_t>(b) * chunks * ncols + c;
  float acc = 0.f;
#pragma unroll 8
  for (int k = warp; k < chunks; k += kQbarFinishWarps) acc += p[static_cast<int64_t>(k) * ncols];
  sums[warp][lane] = acc;
  __syncthreads();
  if (warp != 0) return;
  float t = 0.f;
  for (int w = 0; w < kQbarFinishWarps; ++w) t += sums[w][lane];
  qbar[static_cast<int64_t>(b) * ncols + c] = t / static_cast<float>(nq - 1);
}

__global__ void row_norms_kernel(const float* __restrict__ x, int D, int64_t ld,
                                 float* __restrict__ norms) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * ld;
  float ss = 0.f;
  for (int c = threadIdx.x; c < D; c += blockDim.x) ss += xr[c] * xr[c];
  ss = block_sum(ss);
  if (threadIdx.x == 0) norms[r] = sqrtf(ss);
}

constexpr int kColThreads = 128, kMaxChunks = 32, kRowsPerChunkMin = 32;

int chunks_for(int T) {
  int c = (T - 1 + kRowsPerChunkMin - 1) / kRowsPerChunkMin;
  return c < 1 ? 1 : (c > kMaxChunks ? kMaxChunks : c);
}

template <typename In>
__device__ __forceinline__ float load_as_float(const In* p);
template <>
__device__ __forceinline__ float load_as_float<float>(const float* p) {
  return *p;
}
template <>
__device__ __forceinline__ float load_as_float<bf16_bits>(const bf16_bits* p) {
  return bf2f(*p);
}

// partial[b, chunk, c] = sum of rows i in the chunk's share of 1..count-1 (probe b's rows start at
// b * T).
template <typename In>
__global__ void column_partial_kernel(const In* __restrict__ x, int T, int count, int ncols,
                                      int64_t ld, int chunks, float* __restrict__ partial) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y, chunk = blockIdx.z;
  if (c >= ncols) return;
  const int64_t n = count - 1;
  const int64_t i0 = 1 + n * chunk / chunks, i1 = 1 + n * (chunk + 1) / chunks;
  const In* base = x + static_cast<int64_t>(b) * T * ld + c;
  float acc = 0.f;
  for (int64_t i = i0; i < i1; ++i) acc += load_as_float(base + i * ld);
  partial[(static_cast<int64_t>(b) * chunks + chunk) * ncols + c] = acc;
}

__global__ void column_finish_kernel(const float* __restrict__ partial, int count, int ncols,
                                     int chunks, float* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y;
  if (c >= ncols) return;
  float acc = 0.f;
  for (int k = 0; k < chunks; ++k)
    acc += partial[(static_cast<int64_t>(b) * chunks + k) * ncols + c];
  out[static_cast<int64_t>(b) * ncols + c] = acc / static_cast<float>(count - 1);
}

template <typename In>
void column_mean_rest_impl(const In* x, int B, int T, int ncols, int64_t ld, float* partial,
                           float* out, cudaStream_t s, int count) {
  if (count <= 0 || count > T) count = T;
  if (B == 0 || ncols == 0) return;
  if (count < 2) {  // no rows to average (a window of one position): zeros, as the CPU backend
    CUDA_CHECK(cudaMemsetAsync(out, 0, static_cast<size_t>(B) * ncols * sizeof(float), s));
    return;
  }
  const int chunks = chunks_for(count);
  const dim3 grid((ncols + kColThreads - 1) / kColThreads, B, chunks);
  column_partial_kernel<In><<<grid, kColThreads, 0, s>>>(x, T, count, ncols, ld, chunks, partial);
  CUDA_CHECK_LAUNCH("column_partial_kernel");
  column_finish_kernel<<<dim3(grid.x, B), kColThreads, 0, s>>>(partial, count, ncols, chunks, out);
  CUDA_CHECK_LAUNCH("column_finish_kernel");
}

// Block per row: x[r] += m[r], with ||m[r]|| and ||x[r] + m[r]|| from the same pass.
__global__ void add_rows_norms_kernel(float* __restrict__ x, const float* __restrict__ m, int D,
                                      int64_t row_step, float* __restrict__ m_norms,
                                      float* __restrict__ x_norms) {
  // Launched dependent (after the recording's bookkeeping); a grid of many waves, so the next
  // kernel is not let in early.
  dependency_wait();
  const int64_t r = blockIdx.x * row_step;
  float* xr = x + r * D;
  const float* mr = m + r * D;
  float sm = 0.f, sx = 0.f;
  if (D % 4 == 0) {  // rows 16-byte aligned (cudaMalloc'd, D floats apart)
    for (int c = threadIdx.x * 4; c < D; c += blockDim.x * 4) {
      const float4 mv = *reinterpret_cast<const float4*>(mr + c);
      float4 xv = *reinterpret_cast<const float4*>(xr + c);
      xv.x += mv.x;
      xv.y += mv.y;
      xv.z += mv.z;
      xv.w += mv.w;
      *reinterpret_cast<float4*>(xr + c) = xv;
      sm += mv.x * mv.x + mv.y * mv.y + mv.z * mv.z + mv.w * mv.w;
      sx += xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
    }
  } else {
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
      const float mv = mr[c], xv = xr[c] + mv;
      xr[c] = xv;
      sm += mv * mv;
      sx += xv * xv;
    }
  }
  sm = block_sum(sm);
  sx = block_sum(sx);
  if (threadIdx.x == 0) {
    m_norms[r] = sqrtf(sm);
    x_norms[r] = sqrtf(sx);
  }
}

__global__ void add_inplace_kernel(float* __restrict__ x, const float* __restrict__ a, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] += a[i];
}

__global__ void add_inplace4_kernel(float4* __restrict__ x, const float4* __restrict__ a,
                                    int64_t n4) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 av = a[i];
    float4 xv = x[i];
    xv.x += av.x;
    xv.y += av.y;
    xv.z += av.z;
    xv.w += av.w;
    x[i] = xv;
  }
}

__global__ void embed_gather_kernel(const bf16_bits* __restrict__ table,
                                    const int32_t* __restrict__ tokens, int D,
                                    float* __restrict__ x) {
  const int64_t r = blockIdx.x;
  const bf16_bits* row = table + static_cast<int64_t>(tokens[r]) * D;
  for (int c = threadIdx.x; c < D; c += blockDim.x) x[r * D + c] = bf2f(row[c]);
}

__global__ void embed_p0_kernel(float* __restrict__ x, int T, int D,
                                const float* __restrict__ mean_rest, bool ablate,
                                float* __restrict__ delta, int64_t delta_bstride,
                                float* __restrict__ p0_sum) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y;
  if (c >= D) return;
  float* x0 = x + static_cast<int64_t>(b) * T * D;
  const float dl = x0[c] - mean_rest[static_cast<int64_t>(b) * D + c];
  delta[b * delta_bstride + c] = dl;
  if (ablate) x0[c] -= dl;
  p0_sum[static_cast<int64_t>(b) * D + c] = x0[c];
}

// The exact median of |x|. Clearing the sign leaves a 31-bit pattern that orders like |x| itself
// (zeros, denormals and normals alike, -0 as +0, NaN patterns above infinity), so the middle ranks
// k0 = n/2 - 1 and k1 = n/2 (k1 alone for odd n) are ranks of patterns, selected on the device
// with nothing waiting for the host. Two routes: one read of x near a sampled middle, and the
// two-pass radix select it falls back to.
//
// One read (n from 2^18 up to what the candidate buffer takes, about 160M elements):
//
// abs_median_sample_kernel: G blocks (1 to 128, a block per 2^16 elements) each take 4096 elements
// (8192 from 2^25 elements on: 4 or 8 loads a thread, all in flight at once) in runs of 8 (one
// 32-byte sector each), one run in each of 512 (1024) equal strata of x at an offset hashed from
// the stratum and the block (a stratified sample of all of x per block, with no stride that a
// period of the data, such as a row length, could line up with), and select two ranks of their
// sample exactly (a radix select of 13, 9 and 9 bits in shared memory): a margin below k0's share
// of the sample and a margin above k1's. Block 0 also zeroes the counters the later kernels add to.
// Many blocks with few loads each: the sample costs about one trip to memory, not one per load.
//
// abs_median_bracket_kernel: the bracket [lo, hi] is the lower median of the blocks' low ends and
// the upper median of their high ends. A median of G estimates is nearly as sharp as one estimate
// from the G samples together, and more than half of them must miss for it to miss: the margins
// (kSampleMargin16K) put the chance that a random sample misses a middle rank below 1e-9 a side,
// with about 1.1% of x inside from 8M elements on (0.8% from 2^25 on; 9% for G = 1). One read of x
// counts the elements below lo, equal to lo, strictly inside and equal to hi, appends the inside
// patterns to a candidate buffer (each warp stages them in shared memory and reserves buffer space
// once per 512 or more) and counts them in 1024 bins by their first digit (the offset from lo + 1,
// shifted so that 1024 bins cover the bracket; shared counters per block, added to global ones at
// the end). The last block to finish places k0 and k1: at lo or at hi (equal elements are counted,
// never staged, so a middle inside a tie finishes here) or among the candidates, in a bin of the
// 1024 and at a rank inside it.
//
// abs_median_finish_kernel, on that route: reads the candidates (about 1% of x, just written, so
// from L2) and settles the second digit (the shift's low bits) of the elements of those bins: a
// maximum and a minimum when the two ranks fell in different bins, else a histogram; its last block
// writes the median.
//
// The fallback: the bracket kernel leaves a route in the state, and the finish kernel after it
// reads it and either returns at once or runs the two-pass select below. It runs when the bracket
// missed a middle rank, when the candidates needed overflow the buffer, when lo and hi are more
// than 2^25 patterns apart (more than the two digits cover: a wide gap at the middle), and for n
// outside the one-read range. A wrong guess costs time, never exactness.
//
// Two passes, in one cooperative launch of abs_median_finish_kernel (a block per SM, all resident)
// with a grid-wide barrier between them. Pass 1 (two_pass_hi) histograms the top 15 bits: a block
// per SM keeps its own 32768 counters in 128 KB of dynamic shared memory, streams x with 16-byte
// loads (four per thread, the next four issued before these are looked at; the unaligned head and
// the tail of at most three elements each are read one by one) and adds its nonzero counters to the
// global histogram at the end. The last block to finish (a counter behind a fence) scans the global
// histogram and stores, per rank, the bin holding it and the rank left inside the bin.
//
// Pass 2 (two_pass_lo) reads x again and looks only at the elements of those bins. When
// the two ranks fell in different bins, k0 is the largest element of its bin and k1 the smallest
// of its own (consecutive ranks with nothing between the bins), so a maximum and a minimum of the
// low 16 bits settle them: warp reductions, one global atomicMax each per warp (the minimum as the
// maximum of 0xffff - bits). Otherwise both ranks (or the one) sit in one bin and a histogram of
// its low 16 bits decides: 65536 counters of 16 bits, two to a 32-bit shared word (128 KB), added
// to the global histogram before any could overflow (the block counts the elements it added and
// empties its histogram whenever one more chunk could take a counter past 65535, which happens
// only for heavily tied inputs), then the last block scans the global histogram. Either way the
// last block of pass 2 writes the median (the mean of the two middle values in double for even n).
//
// Ties are why four equal patterns in one thread's 16-byte load count as one shared atomic of 4;
// wide ties still serialise the shared atomics of a warp, which costs time, never exactness. The
// counts and the selections do not depend on the order of the atomics (nor on the order of the
// candidates in their buffer), and the route depends on exact counts only: the result is exact and
// deterministic. Launches: the sample and bracket kernels (or, for the two passes alone, a memset
// of the state) and the finish kernel, all on the stream.
constexpr int kMedThreads = 1024, kMedUnroll = 4;
constexpr int kMedChunk = kMedThreads * kMedUnroll * 4;  // elements per block iteration
constexpr int kHiBins = 1 << 15, kLoBins = 1 << 16;
constexpr int kMedSmemBytes = kHiBins * static_cast<int>(sizeof(unsigned));  // every pass
// Pass 2 empties its 16-bit counters once this many were added since the last time: one more chunk
// then keeps every counter <= 65535 (the <= 6 scalar elements come before the first chunk).
constexpr unsigned kLoFlushAt = 65535u - kMedChunk;

// The sample: keys (4 or 8) elements per thread, in runs of kSampleRun, keys * kMedThreads /
// kSampleRun strata a block.
constexpr int kSampleRun = 8;
constexpr int kMaxSampleBlocks = 128;
// By log2 G: the margin (in ranks of a sample of 16384) that puts the lower median of G low ends
// above the true rank, or the upper median of the high ends below it, at a chance < 1e-9 for a
// random sample (ceil(64 z), z: the normal quantile at which the binomial tail of G blocks, more
// than half of them past the rank, reaches 1e-9). A sample of S takes ceil(z sqrt(S) / 2).
constexpr int kSampleMargin16K[8] = {384, 257, 207, 158, 116, 84, 60, 43};
constexpr int64_t kOneReadMinN = int64_t{1} << 18;
// Inside patterns: a first digit of kInBits bits, the second of at most kInShiftMax bits (its
// histogram fits kHiBins counters).
constexpr int kInBits = 10, kInBins = 1 << kInBits, kInShiftMax = 15;
static_assert(kInBins == kMedThreads, "the bracket's last block loads a first-digit bin a thread");
constexpr uint32_t kMaxSpan = uint32_t{kInBins} << kInShiftMax;
constexpr unsigned long long kCandCap = 1ull << 21;  // the candidate buffer, 8 MB
// A warp stages up to kStage candidates and reserves buffer space when more than kStage - 512 are
// waiting: a chunk adds at most 512 (32 lanes x 4 loads x 4).
constexpr int kStage = 1024, kWarpChunk = 32 * kMedUnroll * 4;
static_assert((kMedThreads / 32) * kStage * 4 == kMedSmemBytes, "the stages fill the shared pool");

// Routes (AbsMedianRoute) and how a middle rank resolved in the bracket.
constexpr unsigned kRouteEnds = static_cast<unsigned>(AbsMedianRoute::kEnds),
                   kRouteCandidates = static_cast<unsigned>(AbsMedianRoute::kCandidates),
                   kRouteWide = static_cast<unsigned>(AbsMedianRoute::kFallbackWide),
                   kRouteMissed = static_cast<unsigned>(AbsMedianRoute::kFallbackMissed),
                   kRouteOverflow = static_cast<unsigned>(AbsMedianRoute::kFallbackOverflow);
__device__ __forceinline__ bool two_pass_route(unsigned route) {
  return route != kRouteEnds && route != kRouteCandidates;
}
constexpr unsigned kRankAtEnd = 0, kRankInside = 1;

struct MedianState {
  // The two-pass select.
  unsigned done[4];             // blocks finished: passes 1 and 2, the bracket pass, the select
  unsigned bin[2];              // the top-15-bit bins holding ranks k0 and k1
  unsigned long long rank[2];   // the ranks left inside those bins
  unsigned lo_max, lo_inv_min;  // split bins: max low bits in bin[0], max of 0xffff - low in bin[1]
  // The one-read route (lo_max / lo_inv_min serve its split bins too).
  unsigned route;
  uint32_t base;                  // lo + 1: inside patterns are base + d, 0 <= d < span
  unsigned shift;                 // d's first digit d >> shift (of kInBins), its second the rest
  unsigned kind[2];               // rank k0 / k1: kRankAtEnd (pattern end[q]) or kRankInside
  uint32_t end[2];                // lo or hi
  unsigned in_bin[2];             // kRankInside: the first-digit bin holding the rank
  unsigned long long in_rank[2];  // and the rank left inside it
  unsigned long long tally[4];    // elements below lo, equal to lo, inside, equal to hi
  unsigned long long ncand;       // candidates appended (past kCandCap: overflowed)
  // Written by the sample kernel, never zeroed.
  uint32_t sample_lo[kMaxSampleBlocks], sample_hi[kMaxSampleBlocks];
};
constexpr size_t kMedStateBytes = 2048;  // the histograms start 2048 bytes in
static_assert(sizeof(MedianState) <= kMedStateBytes, "MedianState outgrew its slot");
constexpr int kMedZeroWords = static_cast<int>(offsetof(MedianState, sample_lo) / sizeof(unsigned));
// The scratch: the state, the first-digit counters, the two-pass histograms (pass 1's also the
// candidates' second digit), the candidate buffer.
constexpr size_t kMedInOffset = kMedStateBytes;
constexpr size_t kMedHiOffset = kMedInOffset + kInBins * sizeof(unsigned);
constexpr size_t kMedCandOffset = kMedHiOffset + (kHiBins + kLoBins) * sizeof(unsigned);
static_assert(kMedCandOffset % 256 == 0, "the candidate buffer is 256-byte aligned");

// Visits |x|'s bit patterns: visit(u, count) with count 4 (one 16-byte load) or 1 (u[0] only, the
// head before the first 16-byte boundary and the tail, block 0); chunk_end() after every chunk of
// kMedChunk elements, the same number of times in every thread of a block.
template <bool kStream, typename Visit, typename ChunkEnd>
__device__ __forceinline__ void for_each_abs_bits(const float* __restrict__ x, int64_t n,
                                                  Visit&& visit, ChunkEnd&& chunk_end) {
  const int64_t head =
      min(n, static_cast<int64_t>(((16u - (reinterpret_cast<uintptr_t>(x) & 15u)) & 15u) / 4u));
  const int64_t nvec = (n - head) / 4, tail = head + nvec * 4;
  if (blockIdx.x == 0 && threadIdx.x < head + (n - tail)) {
    const int64_t i = threadIdx.x < head ? threadIdx.x : tail + (threadIdx.x - head);
    const uint32_t u[4] = {__float_as_uint(x[i]) & 0x7fffffffu, 0u, 0u, 0u};
    visit(u, 1);
  }
  const float4* v4 = reinterpret_cast<const float4*>(x + head);
  const int64_t per_chunk = kMedThreads * kMedUnroll;
  const int64_t chunks = (nvec + per_chunk - 1) / per_chunk;
  // The next chunk's loads are issued before this chunk is visited: with one block per SM, the
  // SM's loads would otherwise stop while it works on what arrived, and the reads come in bursts.
  auto load = [&](int64_t c, float4(&v)[kMedUnroll]) {
    const int64_t base = c * per_chunk + threadIdx.x;
#pragma unroll
    for (int j = 0; j < kMedUnroll; ++j) {
      const int64_t i = base + j * kMedThreads;
      if (c < chunks && i < nvec) v[j] = kStream ? __ldcs(v4 + i) : __ldg(v4 + i);
    }
  };
  float4 v[kMedUnroll];
  load(blockIdx.x, v);
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    float4 next[kMedUnroll];
    load(c + gridDim.x, next);
    const int64_t base = c * per_chunk + threadIdx.x;
#pragma unroll
    for (int j = 0; j < kMedUnroll; ++j) {
      if (base + j * kMedThreads >= nvec) break;
      const uint32_t u[4] = {
          __float_as_uint(v[j].x) & 0x7fffffffu, __float_as_uint(v[j].y) & 0x7fffffffu,
          __float_as_uint(v[j].z) & 0x7fffffffu, __float_as_uint(v[j].w) & 0x7fffffffu};
      visit(u, 4);
    }
    chunk_end();
#pragma unroll
    for (int j = 0; j < kMedUnroll; ++j) v[j] = next[j];
  }
}

// True in the block that finished last (counter zeroed before the kernel); its later reads of what
// the other blocks added (through L2: __ldcg) see all of it.
__device__ __forceinline__ bool last_block_done(unsigned* counter) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// For the nk (1 or 2) ranks k[q] < total count, the bin of hist (kBins global counters, 16-byte
// aligned) holding rank k[q] and the rank left inside it, in bin[q] / rank[q] (shared, valid after
// the call in every thread). Each thread sums kBins / 1024 consecutive counters for a block-wide
// scan; then warp q rescans the segment holding rank q, one or two counters a lane.
template <int kBins>
__device__ void find_ranks(const unsigned* __restrict__ hist, int nk, const unsigned long long* k,
                           unsigned* bin, unsigned long long* rank) {
  constexpr int kPer = kBins / kMedThreads, kPerLane = kPer / 32;
  static_assert(kPer % 32 == 0, "segments are split over the 32 lanes of a warp");
  using Scan = cub::BlockScan<unsigned long long, kMedThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int seg[2];
  __shared__ unsigned long long seg_below[2];
  const uint4* mine = reinterpret_cast<const uint4*>(hist) + threadIdx.x * (kPer / 4);
  unsigned long long sum = 0, before = 0;
#pragma unroll 4
  for (int j = 0; j < kPer / 4; ++j) {
    const uint4 c = __ldcg(mine + j);
    sum += static_cast<unsigned long long>(c.x) + c.y + static_cast<unsigned long long>(c.z) + c.w;
  }
  Scan(scan_tmp).ExclusiveSum(sum, before);
  for (int q = 0; q < nk; ++q)
    if (before <= k[q] && k[q] < before + sum) {
      seg[q] = threadIdx.x;
      seg_below[q] = before;
    }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp < nk) {
    const int first = seg[warp] * kPer + lane * kPerLane;
    unsigned c[kPerLane];
    unsigned long long incl = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      c[j] = __ldcg(hist + first + j);
      incl += c[j];
    }
    const unsigned long long own = incl;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long up = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += up;
    }
    const unsigned long long kk = k[warp] - seg_below[warp];
    unsigned long long below = incl - own;
    if (below <= kk && kk < incl) {
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        if (kk < below + c[j]) {
          bin[warp] = static_cast<unsigned>(first + j);
          rank[warp] = kk - below;
          break;
        }
        below += c[j];
      }
    }
  }
  __syncthreads();
}

// The bin among [first, first + per) that holds key rank k, and k's rank inside it: `count(j)` is
// bin first + j's count and `below` the number of keys before bin first (k lies in the run).
template <class Rank, class Count>
__device__ __forceinline__ void rank_in_run(Rank k, Rank below, int first, int per, Count count,
                                            unsigned* bin, Rank* rank) {
  for (int j = 0; j < per; ++j) {
    const Rank c = count(j);
    if (k < below + c) {
      *bin = static_cast<unsigned>(first + j);
      *rank = k - below;
      return;
    }
    below += c;
  }
}

// find_ranks over bins (a power of two <= 32768) counters in shared memory: thread t sums bins
// [t per, (t + 1) per) for a block-wide scan, then walks its own bins for the ranks inside them.
__device__ void find_ranks_shared(const unsigned* hist, int bins, int nk,
                                  const unsigned long long* k, unsigned* bin,
                                  unsigned long long* rank) {
  using Scan = cub::BlockScan<unsigned long long, kMedThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename Scan::TempStorage scan_tmp;
  const int per = bins > kMedThreads ? bins / kMedThreads : 1, first = threadIdx.x * per;
  unsigned long long sum = 0, before = 0;
  if (first < bins)
    for (int j = 0; j < per; ++j) sum += hist[first + j];
  Scan(scan_tmp).ExclusiveSum(sum, before);
  for (int q = 0; q < nk; ++q) {
    if (k[q] < before || k[q] >= before + sum) continue;
    rank_in_run(
        k[q], before, first, per, [&](int j) { return hist[first + j]; }, &bin[q], &rank[q]);
  }
  __syncthreads();
}

// The median from the patterns at ranks k0 and k1, as the two-pass kernels write it.
__device__ __forceinline__ float median_of_patterns(uint32_t p0, uint32_t p1, bool odd) {
  const double hi = static_cast<double>(__uint_as_float(p1));
  return odd ? static_cast<float>(hi)
             : static_cast<float>(0.5 * (static_cast<double>(__uint_as_float(p0)) + hi));
}

__device__ __forceinline__ uint32_t mix32(uint32_t h) {  // murmur3's finaliser
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Sample block b of G: a run of kSampleRun elements in each of R = kKeys * kMedThreads / kSampleRun
// strata of x, stratum j starting at element floor(j * step_fp / 2^16) (step_fp = n * 2^16 / R),
// the run a hashed offset (of j and b) below `room` into it (room = floor(n / R) - 7), moved down
// to a 32-byte boundary. Every block samples all of x, each at its own offsets (strata interleaved
// over the blocks would hand block b the same columns of a matrix whose row length divides the
// strata's spacing). Lane l of a warp reads element l % 8 of run 4 * (the warp's load) + l / 8: a
// warp load takes four whole sectors. Then the ranks r_lo <= r_hi of the block's kSampleSize
// patterns, exactly, into st->sample_lo[b] / sample_hi[b]. Few keys a thread (all loads in flight
// at once) over many blocks (one an SM): the sample costs about one trip to memory.
template <int kKeys>
__global__ void __launch_bounds__(kMedThreads, 1)
    abs_median_sample_kernel(const float* __restrict__ x, uint64_t step_fp, uint32_t room,
                             unsigned r_lo, unsigned r_hi, MedianState* st,
                             unsigned* __restrict__ in_hist) {
  dependent_kernel_start();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t align = static_cast<int64_t>((reinterpret_cast<uintptr_t>(x) >> 2) & 7u);
  uint32_t key[kKeys];
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    const uint32_t run = static_cast<uint32_t>((warp * kKeys + j) * 4 + (lane >> 3));
    const uint32_t h = mix32((run * gridDim.x + blockIdx.x) * 0x9e3779b9u + 0x7f4a7c15u);
    int64_t s = static_cast<int64_t>((run * step_fp) >> 16) +
                static_cast<int64_t>((static_cast<uint64_t>(h) * room) >> 32);
    s -= (align + s) & 7;
    if (s < 0) s += 8;
    key[j] = __float_as_uint(__ldg(x + s + (lane & 7))) & 0x7fffffffu;
  }
  if (blockIdx.x == 0) {  // the counters of the kernels after this one
    unsigned* words = reinterpret_cast<unsigned*>(st);
    for (int i = threadIdx.x; i < kMedZeroWords; i += kMedThreads) words[i] = 0;
    for (int i = threadIdx.x; i < kInBins; i += kMedThreads) in_hist[i] = 0;
  }
  // Three rounds of a radix select for both ranks at once: the two histograms (of the keys whose
  // higher bits match each rank's prefix) share a word, the counts (<= 8192) in its halves.
  __shared__ unsigned hist[1 << 13];
  __shared__ unsigned sel_bin[2], sel_rank[2];
  using Scan = cub::BlockScan<unsigned, kMedThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename Scan::TempStorage scan_tmp;
  constexpr int kShift[3] = {18, 9, 0}, kBits[3] = {13, 9, 9};
  unsigned rk[2] = {r_lo, r_hi};
  uint32_t pre[2] = {0u, 0u}, fixed = 0u;
#pragma unroll
  for (int round = 0; round < 3; ++round) {
    const int shift = kShift[round], nb = 1 << kBits[round];
    for (int i = threadIdx.x; i < nb; i += kMedThreads) hist[i] = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kKeys; ++j) {
      const uint32_t top = key[j] & fixed;
      const unsigned inc = (top == pre[0] ? 1u : 0u) + (top == pre[1] ? 0x10000u : 0u);
      if (inc) atomicAdd(&hist[(key[j] >> shift) & (nb - 1)], inc);
    }
    __syncthreads();
    const int per = nb > kMedThreads ? nb / kMedThreads : 1, first = threadIdx.x * per;
    unsigned sum = 0, before = 0;
    if (first < nb)
      for (int j = 0; j < per; ++j) sum += hist[first + j];
    Scan(scan_tmp).ExclusiveSum(sum, before);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int h = 16 * q;
      const unsigned below = (before >> h) & 0xffffu;
      if (rk[q] < below || rk[q] >= below + ((sum >> h) & 0xffffu)) continue;
      rank_in_run(
          rk[q], below, first, per, [&](int j) { return (hist[first + j] >> h) & 0xffffu; },
          &sel_bin[q], &sel_rank[q]);
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      pre[q] |= sel_bin[q] << shift;
      rk[q] = sel_rank[q];
    }
    fixed |= static_cast<uint32_t>(nb - 1) << shift;
    __syncthreads();  // sel_bin, sel_rank and hist are the next round's
  }
  if (threadIdx.x == 0) {
    st->sample_lo[blockIdx.x] = pre[0];
    st->sample_hi[blockIdx.x] = pre[1];
  }
}

// The bracket from the G sample blocks, then one read of x (see the comment above kMedThreads).
// Zeroes the two-pass histograms (two_pass_hist, vecs uint4) first, for a fallback. collapse (a
// test hook) takes hi = lo, a bracket that misses unless the middle is a tie.
__global__ void __launch_bounds__(kMedThreads, 1)
    abs_median_bracket_kernel(const float* __restrict__ x, int64_t n, int G, MedianState* st,
                              unsigned* __restrict__ in_hist, uint4* __restrict__ two_pass_hist,
                              int vecs, uint32_t* __restrict__ cand, unsigned long long cap,
                              bool collapse, float* __restrict__ out) {
  dependent_kernel_start();
  for (int i = blockIdx.x * kMedThreads + threadIdx.x; i < vecs; i += gridDim.x * kMedThreads)
    two_pass_hist[i] = make_uint4(0, 0, 0, 0);
  // lo: the lower median of the low ends (rank (G - 1) / 2), hi: the upper median of the high ends
  // (rank G / 2); ties ranked by block.
  __shared__ uint32_t ends[2][kMaxSampleBlocks], bounds[2];
  const int q = threadIdx.x / kMaxSampleBlocks, i = threadIdx.x % kMaxSampleBlocks;
  if (q < 2 && i < G) ends[q][i] = q ? st->sample_hi[i] : st->sample_lo[i];
  __syncthreads();
  if (q < 2 && i < G) {
    const uint32_t v = ends[q][i];
    int r = 0;
    for (int j = 0; j < G; ++j) {
      const uint32_t w = ends[q][j];
      r += w < v || (w == v && j < i);
    }
    if (r == (q ? G / 2 : (G - 1) / 2)) bounds[q] = v;
  }
  __syncthreads();
  const uint32_t lo = bounds[0], hi = collapse ? lo : bounds[1];
  const uint32_t base = lo + 1, span = hi > lo ? hi - base : 0;
  if (span > kMaxSpan) {
    if (blockIdx.x == 0 && threadIdx.x == 0) st->route = kRouteWide;
    return;
  }
  const int shift = span > kInBins ? 32 - __clz(span - 1) - kInBits : 0;
  const uint32_t hi_eq = hi != lo ? hi : 0xffffffffu;  // no pattern: lo was counted

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  extern __shared__ uint4 med_smem[];
  uint32_t* stage = reinterpret_cast<uint32_t*>(med_smem) + warp * kStage;
  __shared__ unsigned fill[kMedThreads / 32], warp_at[kMedThreads / 32], in_local[kInBins];
  __shared__ unsigned long long tally[4], block_at;
  if (threadIdx.x < kMedThreads / 32) fill[threadIdx.x] = 0;
  if (threadIdx.x < 4) tally[threadIdx.x] = 0;
  in_local[threadIdx.x] = 0;  // kInBins == kMedThreads
  __syncthreads();
  unsigned below = 0, eq_lo = 0, inside = 0, eq_hi = 0;
  bool full = false;  // the buffer overflowed (warp-uniform): stop staging
  for_each_abs_bits<false>(
      x, n,
      [&](const uint32_t(&u)[4], int count) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j >= count) break;
          const uint32_t p = u[j], d = p - base;
          below += p < lo;
          eq_lo += p == lo;
          eq_hi += p == hi_eq;
          if (d < span) {
            ++inside;
            if (!full) {
              stage[atomicAdd(&fill[warp], 1u)] = p;
              atomicAdd(&in_local[d >> shift], 1u);
            }
          }
        }
      },
      [&] {  // the warp's staged candidates to the buffer once a chunk more might not fit
        __syncwarp();
        const unsigned f = fill[warp];
        if (f <= kStage - kWarpChunk) return;
        unsigned long long at = 0;
        if (lane == 0) at = atomicAdd(&st->ncand, static_cast<unsigned long long>(f));
        at = __shfl_sync(0xffffffffu, at, 0);
        for (unsigned k = lane; k < f; k += 32)
          if (at + k < cap) cand[at + k] = stage[k];
        full = at + f > cap;
        __syncwarp();
        if (lane == 0) fill[warp] = 0;
        __syncwarp();
      });
  // The rest of the block's candidates in one reservation, and its counts (the first-digit counts
  // are the block's own until here: ties inside the bracket would queue on few global counters).
  __syncthreads();
  if (in_local[threadIdx.x]) atomicAdd(&in_hist[threadIdx.x], in_local[threadIdx.x]);
  if (threadIdx.x == 0) {
    unsigned total = 0;
    for (int w = 0; w < kMedThreads / 32; ++w) {
      warp_at[w] = total;
      total += fill[w];
    }
    block_at = total ? atomicAdd(&st->ncand, static_cast<unsigned long long>(total)) : 0;
  }
  below = __reduce_add_sync(0xffffffffu, below);
  eq_lo = __reduce_add_sync(0xffffffffu, eq_lo);
  inside = __reduce_add_sync(0xffffffffu, inside);
  eq_hi = __reduce_add_sync(0xffffffffu, eq_hi);
  if (lane == 0) {
    atomicAdd(&tally[0], static_cast<unsigned long long>(below));
    atomicAdd(&tally[1], static_cast<unsigned long long>(eq_lo));
    atomicAdd(&tally[2], static_cast<unsigned long long>(inside));
    atomicAdd(&tally[3], static_cast<unsigned long long>(eq_hi));
  }
  __syncthreads();
  {
    const unsigned f = fill[warp];
    const unsigned long long at = block_at + warp_at[warp];
    for (unsigned k = lane; k < f; k += 32)
      if (at + k < cap) cand[at + k] = stage[k];
  }
  if (threadIdx.x < 4) atomicAdd(&st->tally[threadIdx.x], tally[threadIdx.x]);
  if (!last_block_done(&st->done[2])) return;

  // The last block: where k0 and k1 fall.
  __shared__ unsigned route, nk, in_bin[2];
  __shared__ unsigned long long in_k[2], in_rank[2];
  const bool odd = n % 2 == 1;
  if (threadIdx.x == 0) {
    unsigned long long t[4];
    for (int j = 0; j < 4; ++j) t[j] = __ldcg(&st->tally[j]);
    const unsigned long long mid = static_cast<unsigned long long>(n / 2);
    const unsigned long long k[2] = {odd ? mid : mid - 1, mid};
    route = kRouteEnds;
    nk = 0;
    for (int r = 0; r < 2 && route == kRouteEnds; ++r) {
      unsigned long long kk = k[r];
      unsigned kind = kRankAtEnd;
      uint32_t end = 0;
      if (kk < t[0]) {
        route = kRouteMissed;
      } else if ((kk -= t[0]) < t[1]) {
        end = lo;
      } else if ((kk -= t[1]) < t[2]) {
        kind = kRankInside;
        in_k[nk++] = kk;
      } else if ((kk -= t[2]) < t[3]) {
        end = hi;
      } else {
        route = kRouteMissed;
      }
      st->kind[r] = kind;
      st->end[r] = end;
    }
    if (route == kRouteEnds && nk > 0)
      route = __ldcg(&st->ncand) > cap ? kRouteOverflow : kRouteCandidates;
    if (route == kRouteEnds) *out = median_of_patterns(st->end[0], st->end[1], odd);
    if (route != kRouteCandidates) st->route = route;
  }
  __syncthreads();
  if (route != kRouteCandidates) return;
  // The candidates' first-digit bins holding the ranks (the stages are done with: reuse them).
  unsigned* h = reinterpret_cast<unsigned*>(med_smem);
  h[threadIdx.x] = __ldcg(&in_hist[threadIdx.x]);
  __syncthreads();
  find_ranks_shared(h, kInBins, static_cast<int>(nk), in_k, in_bin, in_rank);
  if (threadIdx.x == 0) {
    int j = 0;
    for (int r = 0; r < 2; ++r)
      if (st->kind[r] == kRankInside) {
        st->in_bin[r] = in_bin[j];
        st->in_rank[r] = in_rank[j];
        ++j;
      }
    st->base = base;
    st->shift = static_cast<unsigned>(shift);
    st->route = kRouteCandidates;
  }
}

// The candidates' second digit (abs_median_finish_kernel on the one-read route; see the comment
// above kMedThreads): the block's share of the buffer, then its last block writes the median. hist:
// the (zeroed) two-pass histogram of pass 1, 2^shift counters of it.
__device__ void select_candidates(MedianState* st, int64_t n, const uint32_t* __restrict__ cand,
                                  unsigned* __restrict__ hist, float* __restrict__ out) {
  const bool odd = n % 2 == 1;
  const int64_t count = static_cast<int64_t>(st->ncand);  // <= kCandCap on this route
  const uint32_t base = st->base;
  const int shift = static_cast<int>(st->shift), bins = 1 << shift;
  const uint32_t mask = static_cast<uint32_t>(bins - 1);
  const bool in0 = st->kind[0] == kRankInside, in1 = st->kind[1] == kRankInside;
  const uint32_t b0 = st->in_bin[0], b1 = st->in_bin[1];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kMedThreads + threadIdx.x,
                stride = static_cast<int64_t>(gridDim.x) * kMedThreads;
  if (in0 && in1 && b0 != b1) {  // k0 the largest of bin b0, k1 the smallest of bin b1
    unsigned lo_max = 0, lo_inv_min = 0;
    for (int64_t i = first; i < count; i += stride) {
      const uint32_t d = cand[i] - base, bin = d >> shift, low = d & mask;
      if (bin == b0) lo_max = max(lo_max, low);
      if (bin == b1) lo_inv_min = max(lo_inv_min, mask - low);
    }
    lo_max = __reduce_max_sync(0xffffffffu, lo_max);
    lo_inv_min = __reduce_max_sync(0xffffffffu, lo_inv_min);
    if ((threadIdx.x & 31) == 0 && lo_max) atomicMax(&st->lo_max, lo_max);
    if ((threadIdx.x & 31) == 0 && lo_inv_min) atomicMax(&st->lo_inv_min, lo_inv_min);
    if (!last_block_done(&st->done[3])) return;
    if (threadIdx.x == 0)
      *out = median_of_patterns(base + ((b0 << shift) | __ldcg(&st->lo_max)),
                                base + ((b1 << shift) | (mask - __ldcg(&st->lo_inv_min))), false);
    return;
  }
  // The rank(s) inside one bin: a histogram of its second digit.
  const uint32_t b = in0 ? b0 : b1;
  extern __shared__ uint4 med_smem[];
  unsigned* local = reinterpret_cast<unsigned*>(med_smem);
  for (int i = threadIdx.x; i < bins; i += kMedThreads) local[i] = 0;
  __syncthreads();
  for (int64_t i = first; i < count; i += stride) {
    const uint32_t d = cand[i] - base;
    if ((d >> shift) == b) atomicAdd(&local[d & mask], 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += kMedThreads) {
    const unsigned c = local[i];
    if (c) atomicAdd(&hist[i], c);
  }
  if (!last_block_done(&st->done[3])) return;
  for (int i = threadIdx.x; i < bins; i += kMedThreads) local[i] = __ldcg(&hist[i]);
  __syncthreads();
  unsigned long long k[2];
  int nk = 0;
  if (in0) k[nk++] = st->in_rank[0];
  if (in1) k[nk++] = st->in_rank[1];
  __shared__ unsigned bin[2];
  __shared__ unsigned long long rank[2];
  find_ranks_shared(local, bins, nk, k, bin, rank);
  if (threadIdx.x == 0) {
    const uint32_t v0 = in0 ? base + ((b << shift) | bin[0]) : st->end[0];
    const uint32_t v1 = in1 ? base + ((b << shift) | bin[nk - 1]) : st->end[1];
    *out = median_of_patterns(v0, v1, odd);
  }
}

// Pass 1 of the two passes (see the comment above kMedThreads): its last block stores the bins of
// k0 and k1 and the ranks left inside them in st.
__device__ void two_pass_hi(const float* __restrict__ x, int64_t n, MedianState* st,
                            unsigned* __restrict__ hist) {
  extern __shared__ uint4 med_smem[];
  unsigned* local = reinterpret_cast<unsigned*>(med_smem);
  for (int i = threadIdx.x; i < kHiBins / 4; i += kMedThreads) med_smem[i] = make_uint4(0, 0, 0, 0);
  __syncthreads();
  for_each_abs_bits<false>(
      x, n,
      [&](const uint32_t(&u)[4], int count) {
        const uint32_t b = u[0] >> 16;
        const bool same4 =
            count == 4 && (u[1] >> 16) == b && (u[2] >> 16) == b && (u[3] >> 16) == b;
        if (count == 4) {  // the converged lanes all at one bin: one atomic for the warp
          const unsigned m = __activemask();
          const int leader = __ffs(m) - 1;
          const uint32_t lead_b = __shfl_sync(m, b, leader);  // every lane of m: no && before it
          if (__all_sync(m, same4 && b == lead_b)) {
            if ((threadIdx.x & 31) == leader) atomicAdd(&local[b], 4u * __popc(m));
            return;
          }
        }
        if (same4) {
          atomicAdd(&local[b], 4u);
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (j < count) atomicAdd(&local[u[j] >> 16], 1u);
        }
      },
      [] {});
  __syncthreads();
  for (int i = threadIdx.x; i < kHiBins; i += kMedThreads) {
    const unsigned c = local[i];
    if (c) atomicAdd(&hist[i], c);
  }
  if (!last_block_done(&st->done[0])) return;  // the whole block alike
  __shared__ unsigned bin[2];
  __shared__ unsigned long long rank[2];
  const unsigned long long mid = static_cast<unsigned long long>(n / 2);
  const unsigned long long k[2] = {mid > 0 ? mid - 1 : 0, mid};
  find_ranks<kHiBins>(hist, 2, k, bin, rank);
  if (threadIdx.x == 0) {
    st->bin[0] = bin[0];
    st->bin[1] = bin[1];
    st->rank[0] = rank[0];
    st->rank[1] = rank[1];
  }
}

// Pass 2: after a grid-wide barrier behind pass 1 (st's bins come through L2: __ldcg).
__device__ void two_pass_lo(const float* __restrict__ x, int64_t n, MedianState* st,
                            unsigned* __restrict__ hist, float* __restrict__ out) {
  const bool odd = n % 2 == 1;
  const uint32_t b1 = __ldcg(&st->bin[1]), b0 = odd ? b1 : __ldcg(&st->bin[0]);
  const int lane = threadIdx.x & 31;
  if (b0 != b1) {  // k0 is the largest of bin b0, k1 the smallest of bin b1
    unsigned lo_max = 0, lo_inv_min = 0;
    for_each_abs_bits<true>(
        x, n,
        [&](const uint32_t(&u)[4], int count) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (j >= count) break;
            const uint32_t hi = u[j] >> 16, lo = u[j] & 0xffffu;
            if (hi == b0) lo_max = max(lo_max, lo);
            if (hi == b1) lo_inv_min = max(lo_inv_min, 0xffffu - lo);
          }
        },
        [] {});
    lo_max = __reduce_max_sync(0xffffffffu, lo_max);
    lo_inv_min = __reduce_max_sync(0xffffffffu, lo_inv_min);
    if (lane == 0 && lo_max) atomicMax(&st->lo_max, lo_max);
    if (lane == 0 && lo_inv_min) atomicMax(&st->lo_inv_min, lo_inv_min);
    if (!last_block_done(&st->done[1])) return;
    if (threadIdx.x == 0) {
      const float lo = __uint_as_float((b0 << 16) | __ldcg(&st->lo_max));
      const float hi = __uint_as_float((b1 << 16) | (0xffffu - __ldcg(&st->lo_inv_min)));
      *out = static_cast<float>(0.5 * (static_cast<double>(lo) + static_cast<double>(hi)));
    }
    return;
  }
  // One bin: a histogram of its low 16 bits, two 16-bit counters per shared word.
  extern __shared__ uint4 med_smem[];
  unsigned* local = reinterpret_cast<unsigned*>(med_smem);
  __shared__ unsigned added;  // elements counted since the shared histogram was last emptied
  for (int i = threadIdx.x; i < kLoBins / 8; i += kMedThreads) med_smem[i] = make_uint4(0, 0, 0, 0);
  if (threadIdx.x == 0) added = 0;
  __syncthreads();
  auto empty_local = [&] {  // after a __syncthreads
    for (int i = threadIdx.x; i < kLoBins / 2; i += kMedThreads) {
      const unsigned w = local[i];
      if (w == 0) continue;
      local[i] = 0;
      if (w & 0xffffu) atomicAdd(&hist[2 * i], w & 0xffffu);
      if (w >> 16) atomicAdd(&hist[2 * i + 1], w >> 16);
    }
  };
  unsigned mine = 0;
  for_each_abs_bits<true>(
      x, n,
      [&](const uint32_t(&u)[4], int count) {
        // Four values of the bin in one shared word (two neighbouring patterns): one atomic.
        const uint32_t word = (u[0] & 0xffffu) >> 1;
        bool one_word = count == 4;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          one_word = one_word && (u[j] >> 16) == b1 && ((u[j] & 0xffffu) >> 1) == word;
        const uint32_t inc = (1u << ((u[0] & 1u) << 4)) + (1u << ((u[1] & 1u) << 4)) +
                             (1u << ((u[2] & 1u) << 4)) + (1u << ((u[3] & 1u) << 4));
        if (count == 4) {  // the converged lanes all at one word: one atomic for the warp
          const unsigned m = __activemask();
          const int leader = __ffs(m) - 1;
          const uint32_t lead_word = __shfl_sync(m, word, leader);  // every lane of m
          if (__all_sync(m, one_word && word == lead_word)) {
            const unsigned total = __reduce_add_sync(m, inc);  // <= 128 per half
            if (lane == leader) atomicAdd(&local[word], total);
            mine += 4;
            return;
          }
        }
        if (one_word) {
          atomicAdd(&local[word], inc);
          mine += 4;
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (j < count && (u[j] >> 16) == b1) {
              atomicAdd(&local[(u[j] & 0xffffu) >> 1], 1u << ((u[j] & 1u) << 4));
              ++mine;
            }
        }
      },
      [&] {
        const unsigned w = __reduce_add_sync(0xffffffffu, mine);
        mine = 0;
        if (lane == 0 && w) atomicAdd(&added, w);
        __syncthreads();
        const bool full = added > kLoFlushAt;
        __syncthreads();  // every thread has read `added`
        if (full) {
          empty_local();
          if (threadIdx.x == 0) added = 0;
          __syncthreads();
        }
      });
  __syncthreads();
  empty_local();
  if (!last_block_done(&st->done[1])) return;
  __shared__ unsigned bin[2];
  __shared__ unsigned long long rank[2];
  const unsigned long long k[2] = {odd ? __ldcg(&st->rank[1]) : __ldcg(&st->rank[0]),
                                   __ldcg(&st->rank[1])};
  find_ranks<kLoBins>(hist, odd ? 1 : 2, k, bin, rank);
  if (threadIdx.x == 0) {
    const double hi = static_cast<double>(__uint_as_float((b1 << 16) | bin[odd ? 0 : 1]));
    *out = odd ? static_cast<float>(hi)
               : static_cast<float>(
                     0.5 * (static_cast<double>(__uint_as_float((b1 << 16) | bin[0])) + hi));
  }
}

// The median's last kernel, launched cooperatively (a block per SM, all resident at once): on the
// candidate route the select among the candidates; on a two-pass route pass 1, a grid-wide barrier
// and pass 2 (one launch rather than two: a launch that finds nothing to do still costs its
// start-up); on the ends route nothing. The route is the same in every block.
__global__ void __launch_bounds__(kMedThreads, 1)
    abs_median_finish_kernel(const float* __restrict__ x, int64_t n, MedianState* st,
                             unsigned* __restrict__ hist_hi, unsigned* __restrict__ hist_lo,
                             const uint32_t* __restrict__ cand, float* __restrict__ out) {
  const unsigned route = st->route;
  if (route == kRouteCandidates) select_candidates(st, n, cand, hist_hi, out);
  if (!two_pass_route(route)) return;
  two_pass_hi(x, n, st, hist_hi);
  cooperative_groups::this_grid().sync();
  two_pass_lo(x, n, st, hist_lo, out);
}

// Block per row: mean of the row in double (each thread's sum, then the block's in a fixed order);
// 16-byte loads where the row allows (cols and ld multiples of 4, a 16-byte aligned start).
constexpr int kMeanThreads = 128;
__global__ void __launch_bounds__(kMeanThreads)
    row_means_kernel(const float* __restrict__ a, int cols, int64_t ld, bool vec,
                     float* __restrict__ out) {
  dependent_kernel_start();
  const float* row = a + static_cast<int64_t>(blockIdx.x) * ld;
  double sum = 0;
  if (vec) {
    const float4* r4 = reinterpret_cast<const float4*>(row);
#pragma unroll 4
    for (int i = threadIdx.x; i < cols / 4; i += kMeanThreads) {
      const float4 v = r4[i];
      sum += static_cast<double>(v.x) + v.y + static_cast<double>(v.z) + v.w;
    }
  } else {
    for (int i = threadIdx.x; i < cols; i += kMeanThreads) sum += row[i];
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<float>(sum / static_cast<double>(cols));
}

// The sample for n: G = 2^lg blocks of `keys` elements a thread (lg -1: the two passes alone), and
// the margin of their ranks. A block per 2^16 elements, a power of two from 1 to kMaxSampleBlocks
// (128 from 8M elements on: the sample reads are spread over the SMs), 4 keys a thread below 2^25
// elements and 8 from there (a sample of 8192 a block keeps the candidates of 67M elements near
// half a million), while the expected candidates (a share 2 margin / sample size of x) stay under
// 60% of the buffer.
struct SamplePlan {
  int lg = -1, keys = 0;
  int64_t size = 0, margin = 0;  // per block
};
SamplePlan sample_plan(int64_t n) {
  SamplePlan p;
  if (n < kOneReadMinN) return p;
  const int64_t want = std::clamp<int64_t>(n >> 16, 1, kMaxSampleBlocks);
  int lg = 0;
  while ((int64_t{2} << lg) <= want) ++lg;
  p.keys = n < (int64_t{1} << 25) ? 4 : 8;
  p.size = int64_t{kMedThreads} * p.keys;
  p.margin = static_cast<int64_t>(
      std::ceil(kSampleMargin16K[lg] * std::sqrt(static_cast<double>(p.size)) / 128.0));
  if (n * 2 * p.margin > static_cast<int64_t>(kCandCap) * 6 / 10 * p.size) return p;
  p.lg = lg;
  return p;
}

}  // namespace

size_t abs_median_scratch_bytes() { return kMedCandOffset + kCandCap * sizeof(uint32_t); }

void abs_median(const float* x, int64_t n, void* scratch, float* out, cudaStream_t s,
                AbsMedianForce force) {
  if (n == 0) return;
  // Per device, once: the kernels' 128 KB of dynamic shared memory, and the SM count (a block per
  // SM: the shared histograms allow one, each block then empties its histogram once, and the
  // finishing kernel's blocks are all resident, as its grid-wide barrier needs).
  constexpr int kMaxDevices = 64;
  static std::atomic<int> sm_count[kMaxDevices];
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  int sms = dev < kMaxDevices ? sm_count[dev].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    CUDA_CHECK(cudaFuncSetAttribute(abs_median_bracket_kernel,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, kMedSmemBytes));
    CUDA_CHECK(cudaFuncSetAttribute(abs_median_finish_kernel,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, kMedSmemBytes));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    if (dev < kMaxDevices) sm_count[dev].store(sms, std::memory_order_relaxed);
  }
  const int64_t chunks = (n / 4 + kMedThreads * kMedUnroll - 1) / (kMedThreads * kMedUnroll);
  const unsigned blocks =
      static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(chunks, sms)));
  char* base = static_cast<char*>(scratch);
  auto* st = reinterpret_cast<MedianState*>(base);
  auto* in_hist = reinterpret_cast<unsigned*>(base + kMedInOffset);
  auto* hist_hi = reinterpret_cast<unsigned*>(base + kMedHiOffset);
  auto* cand = reinterpret_cast<uint32_t*>(base + kMedCandOffset);
  const SamplePlan plan = force == AbsMedianForce::kTwoPass ? SamplePlan{} : sample_plan(n);
  const int lg = plan.lg;
  if (lg < 0) {  // the two passes alone: zero counters, route kTwoPass
    CUDA_CHECK(cudaMemsetAsync(scratch, 0, kMedCandOffset, s));
  } else {
    const int G = 1 << lg;
    const int64_t size = plan.size, runs = size / kSampleRun;
    const uint64_t step_fp = (static_cast<uint64_t>(n) << 16) / static_cast<uint64_t>(runs);
    const auto room = static_cast<uint32_t>(n / runs - (kSampleRun - 1));
    // The sample's ranks: a margin below k0's share, a margin above k1's.
    const int64_t mid = n / 2, k0 = n % 2 ? mid : mid - 1, k1 = mid;
    const int64_t r_lo = std::max<int64_t>(0, k0 * size / n - plan.margin);
    const int64_t r_hi = std::min<int64_t>(size - 1, (k1 * size + n - 1) / n + plan.margin);
    auto* sample = plan.keys == 4 ? abs_median_sample_kernel<4> : abs_median_sample_kernel<8>;
    launch_dependent("abs_median_sample_kernel", sample, dim3(static_cast<unsigned>(G)),
                     dim3(kMedThreads), 0, s, x, step_fp, room, static_cast<unsigned>(r_lo),
                     static_cast<unsigned>(r_hi), st, in_hist);
    const unsigned long long cap = force == AbsMedianForce::kTinyBuffer ? 16 : kCandCap;
    launch_dependent("abs_median_bracket_kernel", abs_median_bracket_kernel, dim3(blocks),
                     dim3(kMedThreads), kMedSmemBytes, s, x, n, G, st, in_hist,
                     reinterpret_cast<uint4*>(hist_hi), static_cast<int>((kHiBins + kLoBins) / 4),
                     cand, cap, force == AbsMedianForce::kMissBracket, out);
  }
  // Cooperative: the two passes' grid-wide barrier needs every block resident.
  unsigned* hist_lo = hist_hi + kHiBins;
  const uint32_t* cand_in = cand;
  void* args[] = {&x, &n, &st, &hist_hi, &hist_lo, &cand_in, &out};
  CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(abs_median_finish_kernel),
                                         dim3(blocks), dim3(kMedThreads), args, kMedSmemBytes, s));
  CUDA_CHECK_LAUNCH("abs_median_finish_kernel");
}

AbsMedianRoute abs_median_route(const void* scratch) {
  unsigned route = 0;
  CUDA_CHECK(cudaMemcpy(&route, static_cast<const char*>(scratch) + offsetof(MedianState, route),
                        sizeof route, cudaMemcpyDeviceToHost));
  return static_cast<AbsMedianRoute>(route);
}

void row_means(const float* a, int64_t rows, int cols, int64_t ld, float* out, cudaStream_t s) {
  if (rows == 0) return;
  const bool vec = cols % 4 == 0 && ld % 4 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0;
  launch_dependent("row_means_kernel", row_means_kernel, dim3(static_cast<unsigned>(rows)),
                   dim3(kMeanThreads), 0, s, a, cols, ld, vec, out);
}

void rms_norm(const float* x, int64_t rows, int D, const float* gamma, float eps, bf16_bits* out_bf,
              float* out_f32, float* inv_rms, cudaStream_t s, int64_t ld) {
  if (rows == 0) return;
  rms_norm_kernel<<<static_cast<unsigned>(rows), kNormThreads, 0, s>>>(
      x, D, ld > 0 ? ld : D, gamma, eps, out_bf, out_f32, inv_rms);
  CUDA_CHECK_LAUNCH("rms_norm_kernel");
}

void qk_norm_rope(float* qkv, int B, int T, int ld, int Hl, int KVl, int d, int dp, int rot,
                  const float* q_gamma, const float* k_gamma, float eps, const float* cos_tab,
                  const float* sin_tab, bf16_bits* Qa, bf16_bits* Ka, bf16_bits* Va, float* qbar,
                  int nq, float* scratch, cudaStream_t s) {
  if (B == 0 || T == 0) return;
  if (nq <= 0 || nq > T) nq = T;
  const int slots = Hl + 2 * KVl, qw = Hl * d;
  const bool want_qbar = qbar && qw > 0;
  if (d == 128 && dp == 128 && (rot == 128 || rot == 0) && ld % 4 == 0) {
    const int run = rope128_run(B, T, slots), runs = (T + run - 1) / run;
    const bool sums = want_qbar && nq >= 2;
    qk_norm_rope128_kernel<<<static_cast<unsigned>(static_cast<int64_t>(B) * runs * slots),
                             kRope128Warps * 32, 0, s>>>(qkv, T, run, runs, ld, Hl, KVl, rot == 128,
                                                         q_gamma, k_gamma, eps, cos_tab, sin_tab,
                                                         nq, sums ? scratch : nullptr, Qa, Ka, Va);
    CUDA_CHECK_LAUNCH("qk_norm_rope128_kernel");
    if (!want_qbar) return;
    if (!sums) {  // no rows to average (a window of one position): zeros, as column_mean_rest
      CUDA_CHECK(cudaMemsetAsync(qbar, 0, static_cast<size_t>(B) * qw * sizeof(float), s));
      return;
    }
    launch_dependent("qbar_finish_kernel", qbar_finish_kernel, dim3(qw / 32, B),
                     dim3(kQbarFinishWarps * 32), 0, s, scratch, (nq + run - 1) / run, qw, nq,
                     qbar);
    return;
  }
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(B) * T),
                  (slots + kRopeWarps - 1) / kRopeWarps);
  qk_norm_rope_kernel<<<grid, kRopeWarps * 32, 0, s>>>(qkv, static_cast<int64_t>(B) * T, T, ld, Hl,
                                                       KVl, d, dp, rot, q_gamma, k_gamma, eps,
                                                       cos_tab, sin_tab, Qa, Ka, Va);
  CUDA_CHECK_LAUNCH("qk_norm_rope_kernel");
  if (want_qbar) column_mean_rest_impl(qkv, B, T, qw, ld, scratch, qbar, s, nq);
}

int64_t qk_norm_rope_scratch(int B, int T, int Hl, int KVl, int d) {
  const int64_t general = column_mean_scratch(B, T, Hl * d);
  if (d != 128) return general;
  const int run = rope128_run(B, T, Hl + 2 * KVl);
  return std::max(general, static_cast<int64_t>(B) * ((T + run - 1) / run) * Hl * d);
}

void row_norms(const float* x, int64_t rows, int D, int64_t ld, float* norms, cudaStream_t s) {
  if (rows == 0) return;
  row_norms_kernel<<<static_cast<unsigned>(rows), kNormThreads, 0, s>>>(x, D, ld, norms);
  CUDA_CHECK_LAUNCH("row_norms_kernel");
}

int64_t column_mean_scratch(int B, int T, int ncols) {
  return static_cast<int64_t>(B) * chunks_for(T) * ncols;
}

void column_mean_rest(const float* x, int B, int T, int ncols, int64_t ld, float* partial,
                      float* out, cudaStream_t s, int count) {
  column_mean_rest_impl(x, B, T, ncols, ld, partial, out, s, count);
}

void column_mean_rest(const bf16_bits* x, int B, int T, int ncols, int64_t ld, float* partial,
                      float* out, cudaStream_t s, int count) {
  column_mean_rest_impl(x, B, T, ncols, ld, partial, out, s, count);
}

void add_rows_norms(float* x, const float* m, int64_t rows, int D, float* m_norms, float* x_norms,
                    cudaStream_t s, int64_t row_step) {
  if (rows == 0) return;
  launch_dependent("add_rows_norms_kernel", add_rows_norms_kernel,
                   dim3(static_cast<unsigned>(rows)), dim3(kNormThreads), 0, s, x, m, D, row_step,
                   m_norms, x_norms);
}

void add_inplace(float* x, const float* a, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  // 16-byte loads where both bases are 16-byte aligned (cudaMalloc'd buffers, offsets of whole
  // rows of a width divisible by 4): a quarter of the load instructions.
  if (n % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(a) % 16 == 0) {
    const int64_t n4 = n / 4;
    add_inplace4_kernel<<<grid_for(n4, 256, 65536), 256, 0, s>>>(
        reinterpret_cast<float4*>(x), reinterpret_cast<const float4*>(a), n4);
  } else {
    add_inplace_kernel<<<grid_for(n, 256, 65536), 256, 0, s>>>(x, a, n);
  }
  CUDA_CHECK_LAUNCH("add_inplace_kernel");
}

void embed_gather(const bf16_bits* table, const int32_t* tokens, int64_t n, int D, float* x,
                  cudaStream_t s) {
  if (n == 0) return;
  embed_gather_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(table, tokens, D, x);
  CUDA_CHECK_LAUNCH("embed_gather_kernel");
}

void embed_p0(float* x, int B, int T, int D, const float* mean_rest, bool ablate, float* delta,
              int64_t delta_bstride, float* p0_sum, cudaStream_t s) {
  if (B == 0) return;
  embed_p0_kernel<<<dim3((D + 255) / 256, B), 256, 0, s>>>(x, T, D, mean_rest, ablate, delta,
                                                           delta_bstride, p0_sum);
  CUDA_CHECK_LAUNCH("embed_p0_kernel");
}

}  // namespace sinkscope::cuda::k
