// The position-zero recording of the attention block: head write norms (through the per-head Gram
// matrices), the heads' position-0 and delta vectors, the component bookkeeping shared with the
// MoE block (deltas, mean-ablation, the running sum of position-0 writes), and the circuit
// attribution's small contractions (docs/metrics.md section 4; the math of src/cpu/backend.cpp).
#include <algorithm>
#include <string>

#include "cuda/circuit_kernels.cuh"
#include "cuda/device_common.cuh"

namespace sinkscope::cuda::k {
namespace {

// ||w_h[i]||^2 = z_h[i]^T (W_O,h^T W_O,h) z_h[i] with M = W_O,h^T W_O,h as two bf16 parts
// (hi + lo carry ~16 bits), fused: Y = Z (M_hi + M_lo) is formed on the tensor cores, a warp 32
// rows x 16 columns at a time, and contracted with z in registers, so Y never reaches memory. M is
// exactly symmetric (gram_split), so with z cut into blocks z_K of 16 dims
//   z^T M z = sum_K z_K^T M_KK z_K + 2 sum_{K<N} z_K^T M_KN z_N,
// and only the blocks M_KN with K <= N are copied and multiplied (36 of the 64 at d = 128).
//
// Block (chunk, h, b) takes rows [i0, i1) of probe b, head h. The launcher picks the chunks so that
// the grid is about one wave of the device, so each block copies M_hi and M_lo of its head (to
// shared memory, zero padded to DP, with cp.async while its warps load their first rows) once for
// many rows. The same pass sums z's columns over the rows i >= 1, from the A fragments that
// already hold each row (so z is read once for the norms and zbar):
//   partial[(b * Hl + h) * chunks + chunk] = sum of ||w[i]|| over the block's rows i >= 1,
//   zpart[(b * chunks + chunk) * Hl d + h d + j] = sum of z_h[i, j] over them.
constexpr int kNormChunks = 32, kNormWarps = 8, kNormMinRows = 128;
// The launcher's choice of chunks: a wave is kNormWaveBlocks blocks (two blocks of 8 warps per SM,
// as the kernel's 128 registers and 70 KB of shared memory at d = 128 allow, on the 132 SMs of an
// H100 / H200; a constant, so the chunks, and with them the order of the sums, do not depend on
// the device), and a block's fixed cost (copying M, the reductions at its end) counts as
// kNormBlockRows rows of z.
constexpr int kNormWaveBlocks = 2 * 132, kNormBlockRows = 96;

__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

template <int DP>
constexpr int gram_smem_bytes() {
  return 2 * DP * (DP + 8) * static_cast<int>(sizeof(bf16_bits));
}

// A warp's 32 rows from t0 as two 16-row A tiles (rows past i1 are zeros). Lane (gq, tq) holds
// rows rr[u][0] = t0 + 16 u + gq and rr[u][1] = rr[u][0] + 8 at columns c = 16 ks + 2 tq, c + 1
// (a[u][ks][0], [1]) and c + 8, c + 9 ([2], [3]).
//
// The rows' column sums (row 0 left out where kMayHoldRow0: zbar is the mean over i >= 1) are
// added to cs: the lane's 4 KS values per row are summed over its rows, then over the 8 lanes gq
// of its tq by three halving butterflies (each lane keeps half of what it holds and receives the
// partner's half of the same columns), which leave lane (gq, tq) with the warp's sums of columns
// 16 gq + 2 tq + {0, 1, 8, 9} (zero for gq >= KS); those add to cs[0..3]. A fixed order, 4
// accumulators per lane.
template <int KS, bool kMayHoldRow0>
__device__ __forceinline__ void load_norm_rows(const bf16_bits* __restrict__ zb, int64_t ld, int t0,
                                               int i0, int i1, int d, int lane,
                                               uint32_t (&a)[2][KS][4], float (&cs)[4]) {
  const int gq = lane >> 2, tq = lane & 3;
  int rr[2][2];
  bool vv[2][2];
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    rr[u][0] = t0 + 16 * u + gq;
    rr[u][1] = rr[u][0] + 8;
    vv[u][0] = rr[u][0] < i1;
    vv[u][1] = rr[u][1] < i1;
    const bf16_bits* z0 = zb + static_cast<int64_t>(vv[u][0] ? rr[u][0] : i0) * ld;
    const bf16_bits* z1 = zb + static_cast<int64_t>(vv[u][1] ? rr[u][1] : i0) * ld;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int c = ks * 16 + tq * 2;  // d is even: c < d implies c + 1 < d
      a[u][ks][0] = vv[u][0] && c < d ? ld32(z0 + c) : 0u;
      a[u][ks][1] = vv[u][1] && c < d ? ld32(z1 + c) : 0u;
      a[u][ks][2] = vv[u][0] && c + 8 < d ? ld32(z0 + c + 8) : 0u;
      a[u][ks][3] = vv[u][1] && c + 8 < d ? ld32(z1 + c + 8) : 0u;
    }
  }
  // Sums of columns c, c + 1, c + 8, c + 9 of k-step ks over the lane's four rows (zeros for
  // ks >= KS).
  auto col_sums = [&](int ks, float(&s4)[4]) {
    s4[0] = s4[1] = s4[2] = s4[3] = 0.f;
    if (ks >= KS) return;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      uint32_t r0a = a[u][ks][0], r0b = a[u][ks][2];
      if (kMayHoldRow0 && rr[u][0] == 0) r0a = r0b = 0u;  // rr[u][1] >= 8
      s4[0] += bf16_lo(r0a) + bf16_lo(a[u][ks][1]);
      s4[1] += bf16_hi(r0a) + bf16_hi(a[u][ks][1]);
      s4[2] += bf16_lo(r0b) + bf16_lo(a[u][ks][3]);
      s4[3] += bf16_hi(r0b) + bf16_hi(a[u][ks][3]);
    }
  };
  // Lane bit 4 (gq bit 2) keeps k-steps 4..7 or 0..3, bit 3 the upper or lower two of those, bit
  // 2 the upper or lower one: k-step 4 (gq >> 2) + 2 ((gq >> 1) & 1) + (gq & 1) = gq.
  float v[16];
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    float lo[4], hi[4];
    col_sums(ks, lo);
    col_sums(ks + 4, hi);
    const bool up = lane & 16;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float send = up ? lo[e] : hi[e], keep = up ? hi[e] : lo[e];
      v[4 * ks + e] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const bool up = lane & 8;
    const float send = up ? v[j] : v[8 + j], keep = up ? v[8 + j] : v[j];
    v[j] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const bool up = lane & 4;
    const float send = up ? v[j] : v[4 + j], keep = up ? v[4 + j] : v[j];
    cs[j] += keep + __shfl_xor_sync(0xffffffffu, send, 4);
  }
}

template <int DP>
__global__ void __launch_bounds__(kNormWarps * 32, 2)
    head_write_norms_kernel(const bf16_bits* __restrict__ z, const bf16_bits* __restrict__ Mhi,
                            const bf16_bits* __restrict__ Mlo, int T, int Hl, int d, int chunks,
                            float* __restrict__ wp0, float* __restrict__ partial,
                            float* __restrict__ zpart) {
  dependent_kernel_start();
  constexpr int STR = DP + 8, KS = DP / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Ms[part][n][k] = M_part[n][k] = M_part[k][n] (exactly symmetric, see gram_split): the B
  // fragments (column n of M) are contiguous in k. Column n in block N = n / 16 is read at
  // k < 16 (N + 1) only; that part is copied, 16 bytes at a time with cp.async where d allows.
  bf16_bits* Ms = reinterpret_cast<bf16_bits*>(smem_raw);
  const int chunk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int64_t dd = static_cast<int64_t>(d) * d;
  constexpr int CH = DP / 8;  // 16-byte pieces per padded row
  if (d % 8 == 0) {
    for (int i = threadIdx.x; i < 2 * DP * CH; i += blockDim.x) {
      const int part = i / (DP * CH), n = (i / CH) % DP, k = (i % CH) * 8;
      if (k >= (n / 16 + 1) * 16) continue;
      const bool ok = n < d && k < d;  // else zeros, nothing read
      const bf16_bits* src =
          (part ? Mlo : Mhi) + (ok ? h * dd + static_cast<int64_t>(n) * d + k : 0);
      cp_async16(Ms + (part * DP + n) * STR + k, src, ok);
    }
  } else {
    for (int i = threadIdx.x; i < 2 * DP * DP; i += blockDim.x) {
      const int part = i / (DP * DP), n = (i / DP) % DP, k = i % DP;
      if (k >= (n / 16 + 1) * 16) continue;
      Ms[(part * DP + n) * STR + k] =
          n < d && k < d ? (part ? Mlo : Mhi)[h * dd + static_cast<int64_t>(n) * d + k]
                         : static_cast<bf16_bits>(0);
    }
  }
  cp_async_commit();
  const int i0 = static_cast<int>(static_cast<int64_t>(T) * chunk / chunks);
  const int i1 = static_cast<int>(static_cast<int64_t>(T) * (chunk + 1) / chunks);
  const int64_t ld = static_cast<int64_t>(Hl) * d;
  const bf16_bits* zb = z + static_cast<int64_t>(b) * T * ld + static_cast<int64_t>(h) * d;
  // A warp takes 32 rows per step as two 16-row tiles, so each fragment of M read from shared
  // memory feeds two products. The first step's rows load while M is copied.
  float rest = 0.f;
  float cs[4] = {0.f, 0.f, 0.f, 0.f};
  uint32_t a[2][KS][4];
  int t0 = i0 + warp * 32;
  load_norm_rows<KS, true>(zb, ld, t0, i0, i1, d, lane, a, cs);
  cp_async_wait<0>();
  __syncthreads();
  for (; t0 < i1; t0 += kNormWarps * 32) {
    float ss[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    // Column block N (columns 16 N + 8 hf + gq, the n-tiles 2 N + hf): the blocks K < N count
    // twice (M_NK = M_KN^T), the diagonal one once. Both n-tiles and both row tiles go together:
    // four independent accumulator chains.
#pragma unroll
    for (int N = 0; N < KS; ++N) {
      float y[2][2][4];  // [hf][u][fragment]
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
#pragma unroll
        for (int u = 0; u < 2; ++u) y[hf][u][0] = y[hf][u][1] = y[hf][u][2] = y[hf][u][3] = 0.f;
      const bf16_bits* m0 = Ms + (N * 16 + gq) * STR + tq * 2;
      auto products = [&](const bf16_bits* m, int ks) {
        const uint32_t b0 = ld32(m + ks * 16), b1 = ld32(m + ks * 16 + 8);
        const uint32_t c0 = ld32(m + 8 * STR + ks * 16), c1 = ld32(m + 8 * STR + ks * 16 + 8);
        mma_bf16(y[0][0], a[0][ks], b0, b1);
        mma_bf16(y[0][1], a[1][ks], b0, b1);
        mma_bf16(y[1][0], a[0][ks], c0, c1);
        mma_bf16(y[1][1], a[1][ks], c0, c1);
      };
#pragma unroll
      for (int ks = 0; ks < N; ++ks) products(m0, ks);  // M_hi
#pragma unroll
      for (int ks = 0; ks < N; ++ks) products(m0 + DP * STR, ks);  // M_lo
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
#pragma unroll
        for (int u = 0; u < 2; ++u)
#pragma unroll
          for (int e = 0; e < 4; ++e) y[hf][u][e] += y[hf][u][e];  // exact
      products(m0, N);
      products(m0 + DP * STR, N);
      // y[hf] holds Y at rows gq (y0, y1) and gq + 8 (y2, y3), columns 16 N + 8 hf + 2 tq + {0, 1}:
      // the same positions as the A fragment of k-step N, half hf.
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const uint32_t za = a[u][N][hf * 2], zc = a[u][N][hf * 2 + 1];
          ss[u][0] += y[hf][u][0] * bf16_lo(za) + y[hf][u][1] * bf16_hi(za);
          ss[u][1] += y[hf][u][2] * bf16_lo(zc) + y[hf][u][3] * bf16_hi(zc);
        }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float v = ss[u][hf];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        const int row = t0 + 16 * u + 8 * hf + gq;
        if (tq == 0 && row < i1) {
          // Rounding can leave a tiny negative; a NaN stays NaN (fmaxf would hide it).
          const float nrm = sqrtf(v < 0.f ? 0.f : v);
          if (row == 0)
            wp0[static_cast<int64_t>(b) * Hl + h] = nrm;
          else
            rest += nrm;
        }
      }
    // The next step's rows (past the first step, never row 0).
    if (t0 + kNormWarps * 32 < i1)
      load_norm_rows<KS, false>(zb, ld, t0 + kNormWarps * 32, i0, i1, d, lane, a, cs);
  }
  // The column sums over the warps, in warp order, through shared memory (M is no longer read).
  __syncthreads();
  float* colsum = reinterpret_cast<float*>(smem_raw);  // [kNormWarps][DP]
  if (gq < KS) {
    float* row = colsum + warp * DP + gq * 16 + tq * 2;
    row[0] = cs[0];
    row[1] = cs[1];
    row[8] = cs[2];
    row[9] = cs[3];
  }
  __syncthreads();
  float* zout =
      zpart + (static_cast<int64_t>(b) * chunks + chunk) * ld + static_cast<int64_t>(h) * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kNormWarps; ++w) sum += colsum[w * DP + j];
    zout[j] = sum;
  }
  const double total = block_sum(static_cast<double>(rest));
  if (threadIdx.x == 0)
    partial[(static_cast<int64_t>(b) * Hl + h) * chunks + chunk] = static_cast<float>(total);
}

// Row chunks per (probe, head): the fewest waves of kNormWaveBlocks blocks times the rows of a
// block plus its fixed cost, over 1..kNormChunks chunks of at least kNormMinRows rows (one chunk
// for short probes). Qwen3-30B-A3B's 32 heads at T = 4096: 8 chunks at B = 1, one at B = 8.
int head_write_norms_chunks(int B, int Hl, int T) {
  const int64_t slots = kNormWaveBlocks;
  const int64_t heads = static_cast<int64_t>(B) * Hl;
  const int most = std::max(1, std::min(kNormChunks, T / kNormMinRows));
  int best = 1;
  int64_t best_cost = -1;
  for (int c = 1; c <= most; ++c) {
    const int64_t waves = (heads * c + slots - 1) / slots;
    const int64_t cost = waves * ((T + c - 1) / c + kNormBlockRows);
    if (best_cost < 0 || cost < best_cost) {
      best = c;
      best_cost = cost;
    }
  }
  return best;
}

template <int DP>
void launch_head_write_norms(const bf16_bits* z, const bf16_bits* Mhi, const bf16_bits* Mlo, int B,
                             int T, int Hl, int d, float* wp0, float* partial, float* zpart,
                             int* chunks_out, cudaStream_t s) {
  constexpr int bytes = gram_smem_bytes<DP>();
  CUDA_CHECK(cudaFuncSetAttribute(head_write_norms_kernel<DP>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const int chunks = head_write_norms_chunks(B, Hl, T);
  launch_dependent("head_write_norms_kernel", head_write_norms_kernel<DP>, dim3(chunks, Hl, B),
                   dim3(kNormWarps * 32), bytes, s, z, Mhi, Mlo, T, Hl, d, chunks, wp0, partial,
                   zpart);
  *chunks_out = chunks;
}

// Thread per (probe, column) of zbar: the chunks' column sums in chunk order, over T - 1 (zeros
// when T < 2, as column_mean_rest); the first B Hl threads also sum the chunks' norm sums (double)
// into wrest.
__global__ void head_write_norms_finish_kernel(const float* __restrict__ partial,
                                               const float* __restrict__ zpart, int B, int Hl,
                                               int64_t zw, int chunks, int T,
                                               float* __restrict__ wrest,
                                               float* __restrict__ zbar) {
  dependent_kernel_start();
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < static_cast<int64_t>(B) * Hl) {
    double acc = 0;
    for (int c = 0; c < chunks; ++c) acc += partial[i * chunks + c];
    wrest[i] = static_cast<float>(acc / (T - 1));
  }
  if (i >= B * zw) return;
  const int64_t b = i / zw, col = i % zw;
  float acc = 0.f;
  for (int c = 0; c < chunks; ++c) acc += zpart[(b * chunks + c) * zw + col];
  zbar[i] = T < 2 ? 0.f : acc / static_cast<float>(T - 1);
}

// The heads' position-0 vectors: hp[b, head_begin + h, 0] = W_O,h (z_h[b, 0] - zbar[b, h]) and
// hp[b, head_begin + h, 1] = W_O,h z_h[b, 0], zeros for the heads of other tp ranks. Block
// (channel tile, y): y < Hl is local head y, whose kVecChans rows of W_O (d each) are copied to
// shared memory once (cp.async; rows padded to keep the 16-byte reads free of bank conflicts) and
// serve every probe; y >= Hl writes the zeros of one other head. A thread owns one output channel
// and RG rows (probe, kind) per pass: the rows' vectors z_h[b, 0] - zbar[b, h] and z_h[b, 0] sit in
// shared memory (fp32, formed by the block) and are read as broadcasts; fp32 sums in dimension
// order.
constexpr int kVecChans = 128, kVecMaxRows = 16;

template <int RG>
__global__ void __launch_bounds__(kVecChans)
    head_vectors_kernel(const bf16_bits* __restrict__ z, const float* __restrict__ zbar,
                        const bf16_bits* __restrict__ Wo, int B, int T, int Hl, int d, int D, int H,
                        int head_begin, bool vec, float* __restrict__ hp) {
  dependent_kernel_start();
  const int t = threadIdx.x, c = blockIdx.x * kVecChans + t;
  if (static_cast<int>(blockIdx.y) >= Hl) {  // a head of another tp rank
    const int k = static_cast<int>(blockIdx.y) - Hl, g = k < head_begin ? k : k + Hl;
    if (c >= D) return;
    for (int b = 0; b < B; ++b)
      for (int s = 0; s < 2; ++s) hp[((static_cast<int64_t>(b) * H + g) * 2 + s) * D + c] = 0.f;
    return;
  }
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int h = blockIdx.y, c0 = blockIdx.x * kVecChans;
  const int dr = (d + 7) / 8 * 8, ws = (d + 15) / 16 * 16 + 8;  // ws / 2 words = 4 mod 8
  bf16_bits* Ws = reinterpret_cast<bf16_bits*>(smem_raw);  // [kVecChans][ws], dims d..dr-1 zero
  float* zs = reinterpret_cast<float*>(smem_raw + kVecChans * ws * sizeof(bf16_bits));  // [RG][dr]
  const int64_t ld = static_cast<int64_t>(Hl) * d;
  const bf16_bits* wsrc = Wo + static_cast<int64_t>(h) * d;
  // W_O,h's rows c0.. (d % 8 == 0 and 16-byte aligned: 16-byte pieces, a row's on adjacent
  // threads).
  if (vec) {
    const int pieces = d / 8;
    for (int i = t; i < kVecChans * pieces; i += kVecChans) {
      const int r = i / pieces, p = i % pieces;
      const bool ok = c0 + r < D;
      cp_async16(Ws + r * ws + p * 8, wsrc + (ok ? (c0 + r) * ld + p * 8 : 0), ok);
    }
    cp_async_commit();
  } else {
    for (int i = t; i < kVecChans * dr; i += kVecChans) {
      const int r = i / dr, j = i % dr;
      Ws[r * ws + j] = c0 + r < D && j < d ? wsrc[(c0 + r) * ld + j] : static_cast<bf16_bits>(0);
    }
  }
  for (int b0 = 0; b0 < B; b0 += RG / 2) {
    __syncthreads();  // the previous pass is done with zs
    for (int i = t; i < RG * dr; i += kVecChans) {
      const int r = i / dr, j = i % dr, b = b0 + r / 2;
      float v = 0.f;
      if (b < B && j < d) {
        const int64_t col = static_cast<int64_t>(h) * d + j;
        const float z0 = bf2f(z[static_cast<int64_t>(b) * T * ld + col]);
        v = r % 2 == 0 ? z0 - zbar[static_cast<int64_t>(b) * ld + col] : z0;
      }
      zs[r * dr + j] = v;
    }
    cp_async_wait<0>();
    __syncthreads();
    if (c >= D) continue;
    float acc[RG];
#pragma unroll
    for (int r = 0; r < RG; ++r) acc[r] = 0.f;
    const bf16_bits* wrow = Ws + t * ws;
    for (int j = 0; j < dr; j += 8) {
      const uint4 u = *reinterpret_cast<const uint4*>(wrow + j);
      const float w[8] = {bf16_lo(u.x), bf16_hi(u.x), bf16_lo(u.y), bf16_hi(u.y),
                          bf16_lo(u.z), bf16_hi(u.z), bf16_lo(u.w), bf16_hi(u.w)};
#pragma unroll
      for (int r = 0; r < RG; ++r) {
        const float4 za = *reinterpret_cast<const float4*>(zs + r * dr + j);
        const float4 zc = *reinterpret_cast<const float4*>(zs + r * dr + j + 4);
        float v = acc[r];
        v = fmaf(w[0], za.x, v);
        v = fmaf(w[1], za.y, v);
        v = fmaf(w[2], za.z, v);
        v = fmaf(w[3], za.w, v);
        v = fmaf(w[4], zc.x, v);
        v = fmaf(w[5], zc.y, v);
        v = fmaf(w[6], zc.z, v);
        v = fmaf(w[7], zc.w, v);
        acc[r] = v;
      }
    }
#pragma unroll
    for (int r = 0; r < RG; ++r) {
      const int b = b0 + r / 2;
      if (b < B) hp[((static_cast<int64_t>(b) * H + head_begin + h) * 2 + r % 2) * D + c] = acc[r];
    }
  }
}

// Block of kFinCols columns x kFinLanes slot lanes: lane y takes slots y, y + kFinLanes, ...
// (their deltas stored as they come); the lanes' sums then join in lane order (deterministic).
// A warp reads 32 adjacent columns of one slot (128 bytes); 64 blocks at D = 2048, one probe.
constexpr int kFinCols = 32, kFinLanes = 32;

__global__ void __launch_bounds__(kFinCols* kFinLanes, 1)
    finish_components_kernel(ComponentRows rows, int S, int D, int T,
                             const uint8_t* __restrict__ ablated, float* __restrict__ delta_store,
                             int64_t delta_bstride, float* __restrict__ target,
                             int64_t target_bstride, float* __restrict__ p0_sum) {
  dependent_kernel_start();
  __shared__ float part_t[kFinLanes][kFinCols], part_p[kFinLanes][kFinCols];
  const int cx = threadIdx.x % kFinCols, ly = threadIdx.x / kFinCols;
  const int c = blockIdx.x * kFinCols + cx;
  const int b = blockIdx.y;
  const float inv_rest = 1.f / static_cast<float>(T - 1);
  float dt = 0.f, dp = 0.f;
  if (c < D) {
    for (int s = ly; s < S; s += kFinLanes) {
      const float p = rows.p0[b * rows.p0_bstride + s * rows.p0_sstride + c];
      const float second = rows.second[b * rows.second_bstride + s * rows.second_sstride + c];
      const float dl = rows.second_is_rest_sum ? p - second * inv_rest : second;
      delta_store[b * delta_bstride + static_cast<int64_t>(s) * D + c] = dl;
      const bool ab = ablated != nullptr && ablated[s] != 0;
      if (ab) dt -= dl;
      dp += ab ? p - dl : p;
    }
  }
  part_t[ly][cx] = dt;
  part_p[ly][cx] = dp;
  __syncthreads();
  if (ly != 0 || c >= D) return;
  float t = 0.f, ps = 0.f;
#pragma unroll
  for (int y = 0; y < kFinLanes; ++y) {
    t += part_t[y][cx];
    ps += part_p[y][cx];
  }
  target[b * target_bstride + c] += t;
  p0_sum[static_cast<int64_t>(b) * D + c] += ps;
}

__global__ void scale_columns_kernel(const bf16_bits* __restrict__ W, int64_t n, int cols,
                                     const float* __restrict__ col_scale, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = bf2f(W[i]) * col_scale[i % cols];
}

// Block per (probe, row kind); LayerNorm inputs are centred first (docs/metrics.md: the
// attribution through a LayerNorm sees P c, P the centring).
__global__ void identity_rows_kernel(const float* __restrict__ p0_sum, const float* __restrict__ x,
                                     int T, int D, const float* __restrict__ gamma, bool centre,
                                     float* __restrict__ rows) {
  const int64_t b = blockIdx.x / 2, which = blockIdx.x % 2;
  const float* src = which == 0 ? p0_sum + b * D : x + b * T * D;
  float mean = 0.f;
  if (centre) {
    double sum = 0.0;
    for (int c = threadIdx.x; c < D; c += blockDim.x) sum += src[c];
    mean = static_cast<float>(block_sum(sum) / static_cast<double>(D));
  }
  for (int c = threadIdx.x; c < D; c += blockDim.x)
    rows[(b * 2 + which) * D + c] = (src[c] - mean) * (gamma ? gamma[c] : 1.f);
}

// Subtracts each row's mean (double sums): W P for the centring P of a LayerNorm.
__global__ void centre_rows_kernel(float* __restrict__ W, int cols) {
  float* row = W + static_cast<int64_t>(blockIdx.x) * cols;
  double sum = 0.0;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += row[c];
  const float mean = static_cast<float>(block_sum(sum) / static_cast<double>(cols));
  for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] -= mean;
}

constexpr int kRowChunk = 8;

// Warp per output column n; the R rows in chunks of kRowChunk accumulators.
__global__ void rows_times_wt_kernel(const float* __restrict__ A, int R, int K,
                                     const bf16_bits* __restrict__ W, int N, int64_t ldw,
                                     float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= N) return;
  const bf16_bits* wr = W + n * ldw;
  for (int r0 = 0; r0 < R; r0 += kRowChunk) {
    float acc[kRowChunk];
#pragma unroll
    for (int i = 0; i < kRowChunk; ++i) acc[i] = 0.f;
    for (int kk = lane; kk < K; kk += 32) {
      const float w = bf2f(wr[kk]);
#pragma unroll
      for (int i = 0; i < kRowChunk; ++i)
        if (r0 + i < R) acc[i] += A[static_cast<int64_t>(r0 + i) * K + kk] * w;
    }
#pragma unroll
    for (int i = 0; i < kRowChunk; ++i) {
      const float v = warp_sum(acc[i]);
      if (lane == 0 && r0 + i < R) out[static_cast<int64_t>(r0 + i) * N + n] = v;
    }
  }
}

// Where rows_times_wt8_kernel's rows come from: A [R, K], or (A null) the identity check's rows
// straight from their sources, row 2 b = p0_sum[b], row 2 b + 1 = x[b T] (not centred), their gain
// gamma (null: 1) applied to W's columns instead (the same products).
struct IdentitySource {
  const float* p0_sum = nullptr;
  const float* x = nullptr;
  int T = 0;
  const float* gamma = nullptr;
};

// The same with 16-byte loads (K, ldw multiples of 8; W and A 16-byte aligned): block per
// (column n, chunk of kRowChunk rows); its kWtWarps warps split K (each lane 8 consecutive K per
// step, one step a thread at K = 2048, so every load is in flight at once) and their sums meet in
// shared memory in warp order.
constexpr int kWtWarps = 8;

__global__ void __launch_bounds__(kWtWarps * 32)
    rows_times_wt8_kernel(const float* __restrict__ A, int R, int K,
                          const bf16_bits* __restrict__ W, int N, int64_t ldw,
                          float* __restrict__ out, IdentitySource id) {
  dependent_kernel_start();
  __shared__ float red[kWtWarps][kRowChunk];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = blockIdx.x, r0 = blockIdx.y * kRowChunk;
  const bf16_bits* wr = W + n * ldw;
  float acc[kRowChunk];
#pragma unroll
  for (int i = 0; i < kRowChunk; ++i) acc[i] = 0.f;
  for (int kk = threadIdx.x * 8; kk < K; kk += kWtWarps * 32 * 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(wr + kk);
    const uint32_t wv[4] = {u.x, u.y, u.z, u.w};
    float w[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      w[2 * j] = __uint_as_float(wv[j] << 16);
      w[2 * j + 1] = __uint_as_float(wv[j] & 0xffff0000u);
    }
    if (!A && id.gamma) {
      const float4 g0 = *reinterpret_cast<const float4*>(id.gamma + kk);
      const float4 g1 = *reinterpret_cast<const float4*>(id.gamma + kk + 4);
      w[0] *= g0.x, w[1] *= g0.y, w[2] *= g0.z, w[3] *= g0.w;
      w[4] *= g1.x, w[5] *= g1.y, w[6] *= g1.z, w[7] *= g1.w;
    }
#pragma unroll
    for (int i = 0; i < kRowChunk; ++i) {
      if (r0 + i >= R) break;
      const int r = r0 + i;
      const float* a = A              ? A + static_cast<int64_t>(r) * K + kk
                       : (r & 1) == 0 ? id.p0_sum + static_cast<int64_t>(r / 2) * K + kk
                                      : id.x + static_cast<int64_t>(r / 2) * id.T * K + kk;
      const float4 a0 = *reinterpret_cast<const float4*>(a);
      const float4 a1 = *reinterpret_cast<const float4*>(a + 4);
      acc[i] += a0.x * w[0] + a0.y * w[1] + a0.z * w[2] + a0.w * w[3] + a1.x * w[4] + a1.y * w[5] +
                a1.z * w[6] + a1.w * w[7];
    }
  }
#pragma unroll
  for (int i = 0; i < kRowChunk; ++i) {
    const float v = warp_sum(acc[i]);
    if (lane == 0) red[warp][i] = v;
  }
  __syncthreads();
  const int i = threadIdx.x;
  if (i < kRowChunk && r0 + i < R) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWtWarps; ++w) sum += red[w][i];
    out[static_cast<int64_t>(r0 + i) * N + n] = sum;
  }
}

// Block (probe b, held KV head g): the key norm's 1 / r_k of g, k_0 of the model and of the sum of
// the components for g, then qk for the local heads of g.
__global__ void circuit_finish_kernel(const float* __restrict__ kid,
                                      const float* __restrict__ inv_rx, int T,
                                      const float* __restrict__ qbar, KeyNorm kn, int Hl, int KVl,
                                      int d, int head_begin, int group, int kv_begin, float eps,
                                      float scale, float* __restrict__ k0_model,
                                      float* __restrict__ k0_sum, float* __restrict__ qk) {
  dependent_kernel_start();
  __shared__ float irk_shared;
  const int b = blockIdx.x, g = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t kw = static_cast<int64_t>(KVl) * d;
  const float ix = inv_rx[static_cast<int64_t>(b) * T];
  const float* sum_row = kid + (static_cast<int64_t>(b) * 2) * kw + static_cast<int64_t>(g) * d;
  const float* x0_row = sum_row + kw;
  auto gain = [&](int j) {
    return kn.gain ? kn.gain[static_cast<int64_t>(g) * kn.gain_stride + j] : 1.f;
  };
  auto kconst = [&](int j) { return kn.kconst ? kn.kconst[static_cast<int64_t>(g) * d + j] : 0.f; };
  if (warp == 0) {
    float irk = 1.f;  // no key norm: r_k = 1 and unit gains (docs/metrics.md, "Model families")
    if (kn.inv_rk_rows) {
      irk = kn.inv_rk_rows[static_cast<int64_t>(b) * T];  // full width: over every KV head
    } else if (kn.gain) {
      float ss = 0.f;
#pragma unroll 4
      for (int j = lane; j < d; j += 32) {
        const float v = x0_row[j] * ix + kconst(j);
        ss += v * v;
      }
      ss = warp_sum(ss);
      irk = 1.f / sqrtf(ss / static_cast<float>(d) + eps);
    }
    if (lane == 0) irk_shared = irk;
  }
  __syncthreads();
  const float irk = irk_shared;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const int64_t o = (static_cast<int64_t>(b) * KVl + g) * d + j;
    const float f = irk * gain(j);
    k0_model[o] = (x0_row[j] * ix + kconst(j)) * f;
    k0_sum[o] = (sum_row[j] * ix + kconst(j)) * f;
  }
  // The local heads h with (head_begin + h) / group - kv_begin == g.
  const int h_lo = max(0, (g + kv_begin) * group - head_begin);
  const int h_hi = min(Hl, (g + kv_begin + 1) * group - head_begin);
  const float f = ix * irk * scale;
#pragma unroll 8
  for (int i = threadIdx.x; i < (h_hi - h_lo) * d; i += blockDim.x) {
    const int h = h_lo + i / d, j = i % d;
    const int64_t o = (static_cast<int64_t>(b) * Hl + h) * d + j;
    qk[o] = qbar[o] * gain(j) * f * (j < kn.rot ? kn.rope_factor : 1.f);
  }
}

// Warp per source slot c.
__global__ void attr_contract_kernel(const float* __restrict__ G, int64_t g_bstride,
                                     const float* __restrict__ qk, int C, int Hl, int KVl, int d,
                                     int head_begin, int group, int kv_begin,
                                     float* __restrict__ attr, bool staged) {
  extern __shared__ float qk_sh[];  // [Hl * d] when staged (it fits), else qk is read in place
  const int b = blockIdx.y;
  const float* qk_s = qk + static_cast<int64_t>(b) * Hl * d;
  if (staged) {
    for (int i = threadIdx.x; i < Hl * d; i += blockDim.x) qk_sh[i] = qk_s[i];
    __syncthreads();
    qk_s = qk_sh;
  }
  const int lane = threadIdx.x & 31;
  const int c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (c >= C) return;
  const int64_t kw = static_cast<int64_t>(KVl) * d;
  const float* grow = G + b * g_bstride + c * kw;
  for (int h = 0; h < Hl; ++h) {
    const int g = (head_begin + h) / group - kv_begin;
    float acc = 0.f;
    for (int j = lane; j < d; j += 32)
      acc += grow[static_cast<int64_t>(g) * d + j] * qk_s[h * d + j];
    acc = warp_sum(acc);
    if (lane == 0) attr[(static_cast<int64_t>(b) * Hl + h) * C + c] = acc;
  }
}

// Block (column chunk, held KV head g, probe b): the local heads of KV head g (at most
// kDirHeads a pass) times W_K's rows g d .. g d + d - 1, read once as bf16 pairs: kDirSlices warps
// take every kDirSlices-th row for the chunk's 64 columns (two a lane), their partial sums meet in
// shared memory in warp order; the column gain is applied to the sums
// (sum_j q_j W[j, c] gamma[c] = gamma[c] sum_j q_j W[j, c]). A lane's loads of W (d / kDirSlices
// of them, kDirBatch at a time) are all issued before the first product, and the heads' q rows
// are staged in shared memory: the kernel costs about one trip to memory, not one per row.
constexpr int kDirHeads = 8, kDirSlices = 8, kDirCols = 64, kDirBatch = 16, kDirMaxD = 256;

__global__ void __launch_bounds__(kDirSlices * 32)
    key_directions_kernel(const bf16_bits* __restrict__ Wk, const float* __restrict__ gamma,
                          const float* __restrict__ qk, int Hl, int d, int D, int head_begin,
                          int group, int kv_begin, float* __restrict__ dir) {
  dependent_kernel_start();
  __shared__ float red[kDirSlices][kDirHeads][kDirCols];
  __shared__ float qs[kDirHeads][kDirMaxD];
  const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
  const int c0 = blockIdx.x * kDirCols + 2 * lane;  // this lane's two columns (D even)
  const int g = blockIdx.y, b = blockIdx.z;
  const int h_lo = max(0, (g + kv_begin) * group - head_begin);
  const int h_hi = min(Hl, (g + kv_begin + 1) * group - head_begin);
  const bf16_bits* w = Wk + static_cast<int64_t>(g) * d * D + c0;
  for (int h0 = h_lo; h0 < h_hi; h0 += kDirHeads) {
    const int nh = min(kDirHeads, h_hi - h0);
    __syncthreads();  // red and qs of the previous pass are read
    const float* q = qk + (static_cast<int64_t>(b) * Hl + h0) * d;
    for (int i = threadIdx.x; i < kDirHeads * d; i += blockDim.x)
      qs[i / d][i % d] = i / d < nh ? q[i] : 0.f;
    __syncthreads();
    float acc[kDirHeads][2] = {};
    if (c0 < D) {
      for (int j0 = slice; j0 < d; j0 += kDirSlices * kDirBatch) {
        uint32_t pairs[kDirBatch];
#pragma unroll
        for (int u = 0; u < kDirBatch; ++u) {
          const int j = j0 + u * kDirSlices;
          pairs[u] = j < d ? ld32(w + static_cast<int64_t>(j) * D) : 0u;
        }
#pragma unroll
        for (int u = 0; u < kDirBatch; ++u) {
          const int j = j0 + u * kDirSlices;
          if (j >= d) break;
          const float w0 = __uint_as_float(pairs[u] << 16),
                      w1 = __uint_as_float(pairs[u] & 0xffff0000u);
#pragma unroll
          for (int hh = 0; hh < kDirHeads; ++hh) {
            const float qj = qs[hh][j];
            acc[hh][0] += qj * w0;
            acc[hh][1] += qj * w1;
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kDirHeads; ++u) {
      red[slice][u][2 * lane] = acc[u][0];
      red[slice][u][2 * lane + 1] = acc[u][1];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nh * kDirCols; i += blockDim.x) {
      const int u = i / kDirCols, cc = i % kDirCols, col = blockIdx.x * kDirCols + cc;
      if (col >= D) continue;
      float sum = 0.f;
#pragma unroll
      for (int sl = 0; sl < kDirSlices; ++sl) sum += red[sl][u][cc];
      dir[(static_cast<int64_t>(b) * Hl + h0 + u) * D + col] = sum * (gamma ? gamma[col] : 1.f);
    }
  }
}

}  // namespace

void key_directions(const bf16_bits* Wk, const float* gamma, bool centre, const float* qk, int B,
                    int Hl, int KVl, int d, int D, int head_begin, int group, int kv_begin,
                    float* dir, cudaStream_t s) {
  if (B == 0 || Hl == 0 || D == 0) return;
  if (D % 2 != 0)
    throw_api_failure("CUDA", "odd hidden size " + std::to_string(D), "key_directions", __FILE__,
                      __LINE__);
  if (d > kDirMaxD)
    throw_api_failure("CUDA", "unsupported head dim " + std::to_string(d), "key_directions",
                      __FILE__, __LINE__);
  launch_dependent("key_directions_kernel", key_directions_kernel,
                   dim3((D + kDirCols - 1) / kDirCols, KVl, B), dim3(kDirSlices * 32), 0, s, Wk,
                   gamma, qk, Hl, d, D, head_begin, group, kv_begin, dir);
  if (centre) centre_rows(dir, static_cast<int64_t>(B) * Hl, D, s);
}

int64_t head_write_norms_scratch(int B, int Hl, int d) {
  return static_cast<int64_t>(B) * kNormChunks * Hl * (1 + static_cast<int64_t>(d));
}

void head_write_norms(const bf16_bits* z, const bf16_bits* gram_hi, const bf16_bits* gram_lo, int B,
                      int T, int Hl, int d, int dp, float* scratch, float* wp0, float* wrest,
                      float* zbar, cudaStream_t s) {
  if (B == 0 || Hl == 0) return;
  // The norms' partial sums, then the column sums of z ([B, chunks, Hl d]).
  float* partial = scratch;
  float* zpart = scratch + static_cast<int64_t>(B) * Hl * kNormChunks;
  int chunks = 1;
#define SINKSCOPE_GRAM_CASE(N)                                                                     \
  case N:                                                                                          \
    launch_head_write_norms<N>(z, gram_hi, gram_lo, B, T, Hl, d, wp0, partial, zpart, &chunks, s); \
    break
  switch (dp) {
    SINKSCOPE_GRAM_CASE(16);
    SINKSCOPE_GRAM_CASE(32);
    SINKSCOPE_GRAM_CASE(48);
    SINKSCOPE_GRAM_CASE(64);
    SINKSCOPE_GRAM_CASE(80);
    SINKSCOPE_GRAM_CASE(96);
    SINKSCOPE_GRAM_CASE(112);
    SINKSCOPE_GRAM_CASE(128);
    default:
      throw_api_failure("CUDA", "unsupported padded head dim " + std::to_string(dp),
                        "head_write_norms", __FILE__, __LINE__);
  }
#undef SINKSCOPE_GRAM_CASE
  const int64_t zw = static_cast<int64_t>(Hl) * d;
  const unsigned blocks = static_cast<unsigned>((B * zw + 255) / 256);
  launch_dependent("head_write_norms_finish_kernel", head_write_norms_finish_kernel, dim3(blocks),
                   dim3(256), 0, s, partial, zpart, B, Hl, zw, chunks, T, wrest, zbar);
}

void head_vectors(const bf16_bits* z, const float* zbar, const bf16_bits* Wo, int B, int T, int Hl,
                  int d, int D, int H, int head_begin, float* hp, cudaStream_t s) {
  if (B == 0 || D == 0 || H == 0) return;
  if (d > 128 || d % 2 != 0)
    throw_api_failure("CUDA", "unsupported head dim " + std::to_string(d), "head_vectors", __FILE__,
                      __LINE__);
  const bool vec = d % 8 == 0 && reinterpret_cast<uintptr_t>(Wo) % 16 == 0;
  const int rows = 2 * std::min(B, kVecMaxRows / 2);
  const int dr = (d + 7) / 8 * 8, ws = (d + 15) / 16 * 16 + 8;
  const dim3 grid((D + kVecChans - 1) / kVecChans, H);
  auto go = [&](auto kernel, int rg) {
    const size_t smem = static_cast<size_t>(kVecChans) * ws * sizeof(bf16_bits) +
                        static_cast<size_t>(rg) * dr * sizeof(float);  // <= 43008 bytes
    launch_dependent("head_vectors_kernel", kernel, dim3(grid), dim3(kVecChans), smem, s, z, zbar,
                     Wo, B, T, Hl, d, D, H, head_begin, vec, hp);
  };
  if (rows <= 2)
    go(head_vectors_kernel<2>, 2);
  else if (rows <= 4)
    go(head_vectors_kernel<4>, 4);
  else if (rows <= 8)
    go(head_vectors_kernel<8>, 8);
  else
    go(head_vectors_kernel<kVecMaxRows>, kVecMaxRows);
  CUDA_CHECK_LAUNCH("head_vectors_kernel");
}

void finish_components(const ComponentRows& rows, int B, int S, int D, int T,
                       const uint8_t* ablated, float* delta_store, int64_t delta_bstride,
                       float* target, int64_t target_bstride, float* p0_sum, cudaStream_t s) {
  if (B == 0 || S == 0) return;
  launch_dependent("finish_components_kernel", finish_components_kernel,
                   dim3((D + kFinCols - 1) / kFinCols, B), dim3(kFinCols * kFinLanes), 0, s, rows,
                   S, D, T, ablated, delta_store, delta_bstride, target, target_bstride, p0_sum);
}

void scale_columns(const bf16_bits* W, int64_t rows, int cols, const float* col_scale, float* out,
                   cudaStream_t s) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  scale_columns_kernel<<<grid_for(n, 256, 8192), 256, 0, s>>>(W, n, cols, col_scale, out);
  CUDA_CHECK_LAUNCH("scale_columns_kernel");
}

void identity_rows(const float* p0_sum, const float* x, int B, int T, int D, const float* gamma,
                   bool centre, float* rows, cudaStream_t s) {
  if (B == 0) return;
  identity_rows_kernel<<<2 * B, 256, 0, s>>>(p0_sum, x, T, D, gamma, centre, rows);
  CUDA_CHECK_LAUNCH("identity_rows_kernel");
}

void centre_rows(float* W, int64_t rows, int cols, cudaStream_t s) {
  if (rows == 0) return;
  centre_rows_kernel<<<static_cast<unsigned>(rows), 256, 0, s>>>(W, cols);
  CUDA_CHECK_LAUNCH("centre_rows_kernel");
}

void rows_times_wt(const float* A, int R, int K, const bf16_bits* W, int N, int64_t ldw, float* out,
                   cudaStream_t s) {
  if (R == 0 || N == 0) return;
  if (K % 8 == 0 && ldw % 8 == 0 && reinterpret_cast<uintptr_t>(W) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(A) % 16 == 0) {
    launch_dependent("rows_times_wt8_kernel", rows_times_wt8_kernel,
                     dim3(N, (R + kRowChunk - 1) / kRowChunk), dim3(kWtWarps * 32), 0, s, A, R, K,
                     W, N, ldw, out, IdentitySource{});
    return;
  }
  rows_times_wt_kernel<<<(N + 7) / 8, 256, 0, s>>>(A, R, K, W, N, ldw, out);
  CUDA_CHECK_LAUNCH("rows_times_wt_kernel");
}

bool identity_keys(const float* p0_sum, const float* x, int B, int T, int D, const float* gamma,
                   const bf16_bits* W, int N, int64_t ldw, float* out, cudaStream_t s) {
  const bool aligned = D % 8 == 0 && ldw % 8 == 0 && reinterpret_cast<uintptr_t>(W) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p0_sum) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                       (!gamma || reinterpret_cast<uintptr_t>(gamma) % 16 == 0);
  if (!aligned) return false;
  if (B == 0 || N == 0) return true;
  const int R = 2 * B;
  launch_dependent("rows_times_wt8_kernel", rows_times_wt8_kernel,
                   dim3(N, (R + kRowChunk - 1) / kRowChunk), dim3(kWtWarps * 32), 0, s, nullptr, R,
                   D, W, N, ldw, out, IdentitySource{p0_sum, x, T, gamma});
  return true;
}

void circuit_finish(const float* kid, const float* inv_rx, int B, int T, const float* qbar,
                    const KeyNorm& k_norm, int Hl, int KVl, int d, int head_begin, int group,
                    int kv_begin, float eps, float scale, float* k0_model, float* k0_sum, float* qk,
                    cudaStream_t s) {
  if (B == 0) return;
  if (KVl == 0) return;
  launch_dependent("circuit_finish_kernel", circuit_finish_kernel, dim3(B, KVl), dim3(128), 0, s,
                   kid, inv_rx, T, qbar, k_norm, Hl, KVl, d, head_begin, group, kv_begin, eps,
                   scale, k0_model, k0_sum, qk);
}

void attr_contract(const float* G, int64_t g_bstride, const float* qk, int B, int C, int Hl,
                   int KVl, int d, int head_begin, int group, int kv_begin, float* attr,
                   cudaStream_t s) {
  if (B == 0 || C == 0 || Hl == 0) return;
  // qk is staged in shared memory where it fits (every head's row: up to 160 KiB), else read in
  // place (latent attention: Hl x (Rkv + rope)).
  const size_t bytes = static_cast<size_t>(Hl) * d * sizeof(float);
  const bool staged = bytes <= 160 * 1024;
  const size_t smem = staged ? bytes : 0;
  if (smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(
        attr_contract_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  attr_contract_kernel<<<dim3((C + 7) / 8, B), 256, smem, s>>>(
      G, g_bstride, qk, C, Hl, KVl, d, head_begin, group, kv_begin, attr, staged);
  CUDA_CHECK_LAUNCH("attr_contract_kernel");
}

}  // namespace sinkscope::cuda::k
