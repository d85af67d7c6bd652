// RMSNorm, the fused q/k norm + RoPE, row norms, column means, residual adds, the embedding and its
// position-0 bookkeeping, and the radix histogram behind the exact median of |x| (probe 0).
#include <cub/block/block_scan.cuh>
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
                                      float* __restrict__ m_norms, float* __restrict__ x_norms) {
  const int64_t r = blockIdx.x;
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

constexpr int kMaxBins = 2048;

// The state of one k-th-smallest selection: the rank left inside the current prefix, and the
// prefix bits chosen so far.
struct RadixState {
  unsigned long long k;
  uint32_t prefix, hi_mask;
};

__global__ void radix_init_kernel(RadixState* st, unsigned long long k0, unsigned long long k1) {
  st[0] = RadixState{k0, 0u, 0u};
  st[1] = RadixState{k1, 0u, 0u};
}

// One pass of the selection for both middle ranks at once (nsel = 1 or 2): histograms of the
// next `bits` bits of |x| among the elements matching each rank's prefix so far. While the two
// ranks share their prefix (always in the first pass, and usually after) one histogram serves
// both: one read of x and one shared-memory atomic per element.
__global__ void abs_radix_hist_state_kernel(const float* __restrict__ x, int64_t n,
                                            const RadixState* __restrict__ st, int nsel, int shift,
                                            int bits, unsigned* __restrict__ hist) {
  __shared__ unsigned local[2][kMaxBins];
  const int nbins = 1 << bits;
  for (int i = threadIdx.x; i < 2 * kMaxBins; i += blockDim.x)
    local[i / kMaxBins][i % kMaxBins] = 0;
  __syncthreads();
  const uint32_t mask = static_cast<uint32_t>(nbins - 1);
  const uint32_t prefix[2] = {st[0].prefix, nsel > 1 ? st[1].prefix : 0u};
  const uint32_t hi_mask[2] = {st[0].hi_mask, nsel > 1 ? st[1].hi_mask : 0u};
  const bool same = nsel == 1 || (prefix[0] == prefix[1] && hi_mask[0] == hi_mask[1]);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t u = __float_as_uint(x[i]) & 0x7fffffffu;
    const uint32_t bin = (u >> shift) & mask;
    if ((u & hi_mask[0]) == prefix[0]) atomicAdd(&local[0][bin], 1u);
    if (!same && (u & hi_mask[1]) == prefix[1]) atomicAdd(&local[1][bin], 1u);
  }
  __syncthreads();
  for (int q = 0; q < nsel; ++q) {
    const unsigned* src = local[same ? 0 : q];
    for (int i = threadIdx.x; i < nbins; i += blockDim.x)
      if (src[i]) atomicAdd(&hist[q * kMaxBins + i], src[i]);
  }
}

// The bin holding the k-th element: one block, two bins per thread, a block-wide exclusive scan
// of the counts; the one thread whose bin straddles rank k updates the state.
constexpr int kPickThreads = kMaxBins / 2;
__global__ void __launch_bounds__(kPickThreads)
    radix_pick_kernel(const unsigned* __restrict__ hist, int bits, int shift, RadixState* st) {
  using Scan = cub::BlockScan<unsigned long long, kPickThreads>;
  __shared__ typename Scan::TempStorage scratch;
  const int nb = 1 << bits, i0 = 2 * threadIdx.x, i1 = i0 + 1;
  const unsigned long long h0 = i0 < nb ? hist[i0] : 0, h1 = i1 < nb ? hist[i1] : 0;
  unsigned long long before = 0;  // elements in the bins below i0
  Scan(scratch).ExclusiveSum(h0 + h1, before);
  const unsigned long long k = st->k;
  __syncthreads();  // every thread has read st->k before the winner writes it
  int bin = -1;
  unsigned long long below = 0;
  if (i0 < nb && before <= k && k < before + h0) {
    bin = i0;
    below = before;
  } else if (i1 < nb && before + h0 <= k && (k < before + h0 + h1 || i1 == nb - 1)) {
    bin = i1;  // the last bin also takes k >= n, which cannot happen for k < n
    below = before + h0;
  }
  if (bin >= 0) {
    st->k = k - below;
    st->prefix |= static_cast<uint32_t>(bin) << shift;
    st->hi_mask |= static_cast<uint32_t>(nb - 1) << shift;
  }
}

__global__ void radix_median_kernel(const RadixState* st, bool odd, float* out) {
  const double hi = static_cast<double>(__uint_as_float(st[1].prefix));
  *out = odd ? static_cast<float>(hi)
             : static_cast<float>(0.5 * (static_cast<double>(__uint_as_float(st[0].prefix)) + hi));
}

// Warp per row: mean of the row in double.
__global__ void row_means_kernel(const float* __restrict__ a, int64_t rows, int cols, int64_t ld,
                                 float* __restrict__ out) {
  const int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  double sum = 0;
  for (int i = lane; i < cols; i += 32) sum += a[r * ld + i];
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) out[r] = static_cast<float>(sum / static_cast<double>(cols));
}

}  // namespace

size_t abs_median_scratch_bytes() {
  return 2 * sizeof(RadixState) + 2 * kMaxBins * sizeof(unsigned);
}

void abs_median(const float* x, int64_t n, void* scratch, float* out, cudaStream_t s) {
  if (n == 0) return;
  auto* st = static_cast<RadixState*>(scratch);
  auto* hist = reinterpret_cast<unsigned*>(st + 2);
  const unsigned long long mid = static_cast<unsigned long long>(n / 2);
  radix_init_kernel<<<1, 1, 0, s>>>(st, mid > 0 ? mid - 1 : 0, mid);
  CUDA_CHECK_LAUNCH("radix_init_kernel");
  // Both middle ranks (one for odd n) select in the same three passes over x.
  const int shifts[3] = {21, 10, 0}, bits[3] = {11, 11, 10};
  const int first = n % 2 == 1 ? 1 : 0, nsel = 2 - first;
  for (int pass = 0; pass < 3; ++pass) {
    CUDA_CHECK(cudaMemsetAsync(hist, 0, 2 * kMaxBins * sizeof(unsigned), s));
    abs_radix_hist_state_kernel<<<grid_for(n, 256, 1024), 256, 0, s>>>(
        x, n, st + first, nsel, shifts[pass], bits[pass], hist);
    CUDA_CHECK_LAUNCH("abs_radix_hist_state_kernel");
    for (int q = 0; q < nsel; ++q) {
      radix_pick_kernel<<<1, kPickThreads, 0, s>>>(hist + q * kMaxBins, bits[pass], shifts[pass],
                                                   st + first + q);
      CUDA_CHECK_LAUNCH("radix_pick_kernel");
    }
  }
  radix_median_kernel<<<1, 1, 0, s>>>(st, n % 2 == 1, out);
  CUDA_CHECK_LAUNCH("radix_median_kernel");
}

void row_means(const float* a, int64_t rows, int cols, int64_t ld, float* out, cudaStream_t s) {
  if (rows == 0) return;
  row_means_kernel<<<grid_for(rows * 32, 256), 256, 0, s>>>(a, rows, cols, ld, out);
  CUDA_CHECK_LAUNCH("row_means_kernel");
}

void rms_norm(const float* x, int64_t rows, int D, const float* gamma, float eps, bf16_bits* out_bf,
              float* out_f32, float* inv_rms, cudaStream_t s, int64_t ld) {
  if (rows == 0) return;
  rms_norm_kernel<<<static_cast<unsigned>(rows), kNormThreads, 0, s>>>(
      x, D, ld > 0 ? ld : D, gamma, eps, out_bf, out_f32, inv_rms);
  CUDA_CHECK_LAUNCH("rms_norm_kernel");
}

void qk_norm_rope(float* qkv, int64_t rows, int T, int ld, int Hl, int KVl, int d, int dp, int rot,
                  const float* q_gamma, const float* k_gamma, float eps, const float* cos_tab,
                  const float* sin_tab, bf16_bits* Qa, bf16_bits* Ka, bf16_bits* Va,
                  cudaStream_t s) {
  if (rows == 0) return;
  const int slots = Hl + 2 * KVl;
  const dim3 grid(static_cast<unsigned>(rows), (slots + kRopeWarps - 1) / kRopeWarps);
  qk_norm_rope_kernel<<<grid, kRopeWarps * 32, 0, s>>>(
      qkv, rows, T, ld, Hl, KVl, d, dp, rot, q_gamma, k_gamma, eps, cos_tab, sin_tab, Qa, Ka, Va);
  CUDA_CHECK_LAUNCH("qk_norm_rope_kernel");
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
                    cudaStream_t s) {
  if (rows == 0) return;
  add_rows_norms_kernel<<<static_cast<unsigned>(rows), kNormThreads, 0, s>>>(x, m, D, m_norms,
                                                                             x_norms);
  CUDA_CHECK_LAUNCH("add_rows_norms_kernel");
}

void add_inplace(float* x, const float* a, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  add_inplace_kernel<<<grid_for(n, 256, 65536), 256, 0, s>>>(x, a, n);
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
