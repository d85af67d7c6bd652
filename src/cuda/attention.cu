// Fused causal attention (flash-attention 2 style) that also returns the attention to key 0.
//
// One block of BM / 16 warps takes BM queries of one (probe, head) (BM = 128, or 64 with
// SINKSCOPE_ATTN_BLOCK_M=64); each warp owns 16 query rows. Key and value tiles of 64 positions
// stream through shared memory (cp.async, double buffered). Scores come from bf16 mma.sync m16n8k16
// with fp32 accumulation and stay in registers; the softmax is the online one in fp32 (log2
// domain), P is rounded to bf16 for the P V product. The raw score of key 0 is kept from the first
// tile, so after the last tile A[i, 0] = exp2(s_i0 - m_i) / l_i needs no second pass and no T x T
// storage. Head dims up to 128: the operands are padded with zero dims to DP, a multiple of 16 (one
// template instance per DP).
//
// On Hopper (a build for sm_90a, a device of compute capability 9.0) head dims 64 and 128 take a
// second kernel of the same contract built on warpgroup products (wgmma): two warpgroups of 64
// query rows share each 128-key tile; S = Q K^T reads Q and K from shared memory, O += P V takes P
// from registers and V^T from shared memory (V is transposed once per call into scratch, so both
// products read K-major 128-byte-swizzled tiles); inside a warpgroup the softmax of one tile runs
// while the P V product of the previous one is in flight. On an H200 at the Qwen3-30B-A3B shape,
// 8 x 4096: 3.75 ms per layer against 5.7 for the mma.sync kernel (docs/gpu-backend.md).
#include <atomic>
#include <cstdlib>
#include <string>

#include "cuda/attention.cuh"
#include "cuda/cudnn_attention.hpp"
#include "cuda/device_common.cuh"
#include "cuda/wgmma.cuh"

namespace sinkscope::cuda::k {
namespace {

constexpr int kBlockN = 64;  // keys per tile; a block holds BM queries, 16 per warp
constexpr float kLog2e = 1.4426950408889634f;  // scores are kept in the log2 domain

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3, const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// The online softmax's step for one thread's two rows (m16n8 layout, NT column tiles of 8 scores,
// log2 domain): the new running max over the quad into m_run; base is that max, or 0 for a row
// that has seen only -inf so far (so exp2(s - base) stays 0, not NaN); alpha = exp2(old max -
// base) rescales what was summed before.
template <int NT>
__device__ __forceinline__ void online_max(const float (&s)[NT * 4], float (&m_run)[2],
                                           float (&base)[2], float (&alpha)[2]) {
  float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    mx[0] = fmaxf(mx[0], fmaxf(s[4 * j], s[4 * j + 1]));
    mx[1] = fmaxf(mx[1], fmaxf(s[4 * j + 2], s[4 * j + 3]));
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    base[i] = mx[i] == -INFINITY ? 0.f : mx[i];
    alpha[i] = exp2f(m_run[i] - base[i]);
    m_run[i] = mx[i];
  }
}

// The end of a pass for one thread's rows row0 and row0 + 8 of one (probe, head), o in the m16n8
// accumulator layout over NT column tiles of 8: l summed over the quad, the learned sink logit
// sink_l2 (log2 domain; -inf without one) joins the denominator, z = O / l in bf16 (d is even:
// column pairs), A[i, 0] = exp2(s_i0 - m_i) / l_i and, where sink_head is given, the sink's mass
// exp2(sink - m_i) / l_i.
template <int NT>
__device__ __forceinline__ void finish_rows(const float (&o)[NT * 4], float (&l_run)[2],
                                            const float (&m_run)[2], const float (&s_key0)[2],
                                            float sink_l2, int row0, int T, int tq,
                                            bf16_bits* z_head, int64_t ldz, int d, float* a0_head,
                                            float* sink_head) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = row0 + 8 * i;
    if (row >= T) continue;
    // With a sink the running max becomes max(m, sink): O and l were summed relative to m.
    const float m = fmaxf(m_run[i], sink_l2), f = exp2f(m_run[i] - m);
    const float l = l_run[i] * f + exp2f(sink_l2 - m);
    const float inv_l = 1.f / l, o_scale = f * inv_l;
    bf16_bits* zr = z_head + row * ldz;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int col = j * 8 + tq * 2;
      if (col < d)
        *reinterpret_cast<uint32_t*>(zr + col) =
            pack_bf16(o[4 * j + 2 * i] * o_scale, o[4 * j + 2 * i + 1] * o_scale);
    }
    if (tq == 0) {
      a0_head[row] = exp2f(s_key0[i] - m) * inv_l;
      if (sink_head) sink_head[row] = exp2f(sink_l2 - m) * inv_l;
    }
  }
}

template <int DP>
constexpr int smem_bytes() {
  return 2 /*K, V*/ * 2 /*buffers*/ * kBlockN * (DP + 8) * static_cast<int>(sizeof(bf16_bits));
}

template <int DP, int BM>
__global__ void __launch_bounds__(BM / 16 * 32)
    flash_attention_kernel(const bf16_bits* __restrict__ Q, const bf16_bits* __restrict__ K,
                           const bf16_bits* __restrict__ V, bf16_bits* __restrict__ z,
                           float* __restrict__ a0, int T, int Hl, int KVl, int d, int head_begin,
                           int group, int kv_begin, float scale_log2, AttnSinks ex) {
  constexpr int STR = DP + 8;  // padded smem row (bf16): conflict-free fragment loads and ldmatrix
  constexpr int KS = DP / 16, NT = kBlockN / 8, DT = DP / 8, CH = DP / 8, kWarps = BM / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_bits* Ks = reinterpret_cast<bf16_bits*>(smem_raw);
  bf16_bits* Vs = Ks + 2 * kBlockN * STR;

  const int mb =
      static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);  // longest blocks first
  const int h = blockIdx.y, b = blockIdx.z;
  const int g = (head_begin + h) / group - kv_begin;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int64_t tok0 = static_cast<int64_t>(b) * T;
  const int64_t ldq = static_cast<int64_t>(Hl) * DP, ldk = static_cast<int64_t>(KVl) * DP;
  const int row0 = mb * BM + warp * 16 + gq, row1 = row0 + 8;
  const int warp_last_row = mb * BM + warp * 16 + 15;

  uint32_t qf[KS][4];
  {
    const bf16_bits* q0 = Q + (tok0 + (row0 < T ? row0 : 0)) * ldq + static_cast<int64_t>(h) * DP;
    const bf16_bits* q1 = Q + (tok0 + (row1 < T ? row1 : 0)) * ldq + static_cast<int64_t>(h) * DP;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int c = ks * 16 + tq * 2;
      qf[ks][0] = row0 < T ? ld32(q0 + c) : 0u;
      qf[ks][1] = row1 < T ? ld32(q1 + c) : 0u;
      qf[ks][2] = row0 < T ? ld32(q0 + c + 8) : 0u;
      qf[ks][3] = row1 < T ? ld32(q1 + c + 8) : 0u;
    }
  }

  auto load_tile = [&](int kt, int buf) {
    const int key0 = kt * kBlockN;
    for (int i = threadIdx.x; i < kBlockN * CH; i += kWarps * 32) {
      const int r = i / CH, c = (i % CH) * 8;
      const int key = key0 + r;
      const bool valid = key < T;
      const int64_t off = (tok0 + (valid ? key : 0)) * ldk + static_cast<int64_t>(g) * DP + c;
      cp_async16(Ks + (buf * kBlockN + r) * STR + c, K + off, valid);
      cp_async16(Vs + (buf * kBlockN + r) * STR + c, V + off, valid);
    }
    cp_async_commit();
  };

  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  // s_key0 stays -inf where key 0 is outside a row's window (A[i, 0] = 0 there).
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f},
        s_key0[2] = {-INFINITY, -INFINITY};

  // Key tiles from the block's first row's window (0 without one) up to the block's last row; a
  // warp skips the compute of tiles wholly outside its rows' windows (all masked: they would change
  // nothing) but not the block's barriers.
  const int block_last_row = min((mb + 1) * BM, T) - 1;
  const int n_tiles = block_last_row / kBlockN + 1;
  const int warp_first_row = mb * BM + warp * 16;
  const int kt0 = ex.window > 0 ? max(0, mb * BM - ex.window + 1) / kBlockN : 0;
  load_tile(kt0, kt0 & 1);
  for (int kt = kt0; kt < n_tiles; ++kt) {
    if (kt + 1 < n_tiles) {
      load_tile(kt + 1, (kt + 1) & 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    // Else every key of the tile is above the warp's rows, or before all of their windows.
    if (kt * kBlockN <= warp_last_row &&
        (ex.window == 0 || (kt + 1) * kBlockN - 1 > warp_first_row - ex.window)) {
      const bf16_bits* Kb = Ks + (kt & 1) * kBlockN * STR;
      const bf16_bits* Vb = Vs + (kt & 1) * kBlockN * STR;

      float sc[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
        const bf16_bits* krow = Kb + (nt * 8 + gq) * STR + tq * 2;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
          mma_bf16(sc[nt], qf[ks], ld32(krow + ks * 16), ld32(krow + ks * 16 + 8));
      }
      const bool diagonal = (kt + 1) * kBlockN - 1 > mb * BM + warp * 16;  // a key may pass a row
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = e < 2 ? row0 : row1;
          const int key = kt * kBlockN + nt * 8 + tq * 2 + (e & 1);
          float v = sc[nt][e] * scale_log2;
          if ((diagonal && key > row) || key >= T || (ex.window > 0 && key <= row - ex.window))
            v = -INFINITY;
          sc[nt][e] = v;
        }
      if (kt == 0 && tq == 0) {  // key 0 is column 0 of the first n-tile
        s_key0[0] = sc[0][0];
        s_key0[1] = sc[0][2];
      }

      float base[2], alpha[2];
      online_max<NT>(reinterpret_cast<const float(&)[NT * 4]>(sc), m_run, base, alpha);

      uint32_t pf[NT / 2][4];
      float rs[2] = {0.f, 0.f};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float p0 = exp2f(sc[nt][0] - base[0]), p1 = exp2f(sc[nt][1] - base[0]);
        const float p2 = exp2f(sc[nt][2] - base[1]), p3 = exp2f(sc[nt][3] - base[1]);
        rs[0] += p0 + p1;
        rs[1] += p2 + p3;
        pf[nt / 2][(nt & 1) * 2 + 0] = pack_bf16(p0, p1);
        pf[nt / 2][(nt & 1) * 2 + 1] = pack_bf16(p2, p3);
      }
      l_run[0] = l_run[0] * alpha[0] + rs[0];
      l_run[1] = l_run[1] * alpha[1] + rs[1];
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[dt][0] *= alpha[0];
        o[dt][1] *= alpha[0];
        o[dt][2] *= alpha[1];
        o[dt][3] *= alpha[1];
      }

#pragma unroll
      for (int kk = 0; kk < NT / 2; ++kk) {
        const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
        for (int dt = 0; dt < DT; dt += 2) {
          uint32_t b0, b1, b2, b3;
          ldmatrix_x4_trans(b0, b1, b2, b3, Vb + key * STR + (dt + (lane >> 4)) * 8);
          mma_bf16(o[dt], pf[kk], b0, b1);
          mma_bf16(o[dt + 1], pf[kk], b2, b3);
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this buffer
  }

  const int64_t bh = static_cast<int64_t>(b) * Hl + h;
  finish_rows<DT>(reinterpret_cast<const float(&)[DT * 4]>(o), l_run, m_run, s_key0,
                  ex.sinks ? ex.sinks[h] * kLog2e : -INFINITY, row0, T, tq,
                  z + tok0 * Hl * d + static_cast<int64_t>(h) * d, static_cast<int64_t>(Hl) * d, d,
                  a0 + bh * T, ex.sink_mass ? ex.sink_mass + bh * T : nullptr);
}

template <int DP, int BM>
void launch_bm(const bf16_bits* Q, const bf16_bits* K, const bf16_bits* V, bf16_bits* z, float* a0,
               int B, int T, int Hl, int KVl, int d, int head_begin, int group, int kv_begin,
               float scale, const AttnSinks& ex, cudaStream_t s) {
  constexpr int bytes = smem_bytes<DP>();
  // Per launch: the attribute belongs to the current device, and a host call costs microseconds.
  CUDA_CHECK(cudaFuncSetAttribute(flash_attention_kernel<DP, BM>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const dim3 grid((T + BM - 1) / BM, Hl, B);
  flash_attention_kernel<DP, BM><<<grid, BM / 16 * 32, bytes, s>>>(
      Q, K, V, z, a0, T, Hl, KVl, d, head_begin, group, kv_begin, scale * kLog2e, ex);
  CUDA_CHECK_LAUNCH("flash_attention_kernel");
}

// Queries per block: 128 (8 warps share each K/V tile) unless SINKSCOPE_ATTN_BLOCK_M=64 (4 warps),
// read once per process.
int block_m() {
  static const int bm = [] {
    const char* v = std::getenv("SINKSCOPE_ATTN_BLOCK_M");
    return v && std::atoi(v) == 64 ? 64 : 128;
  }();
  return bm;
}

template <int DP>
void launch(const bf16_bits* Q, const bf16_bits* K, const bf16_bits* V, bf16_bits* z, float* a0,
            int B, int T, int Hl, int KVl, int d, int head_begin, int group, int kv_begin,
            float scale, const AttnSinks& ex, cudaStream_t s) {
  if (block_m() == 64)
    launch_bm<DP, 64>(Q, K, V, z, a0, B, T, Hl, KVl, d, head_begin, group, kv_begin, scale, ex, s);
  else
    launch_bm<DP, 128>(Q, K, V, z, a0, B, T, Hl, KVl, d, head_begin, group, kv_begin, scale, ex, s);
}

// ---- Hopper: warpgroup products -------------------------------------------------------------

constexpr int kWgRows = 128;  // queries per block: two warpgroups of 64
constexpr int kVtPad = 128;   // V^T rows are padded to a multiple of this many keys (zeros)

template <int DP>
constexpr int wg_smem_bytes() {
  // 1 KiB of slack to align the tiles to the 1 KiB swizzle period; Q, then two K and two V^T slots
  // of kWgRows keys.
  return 1024 + kWgRows * DP * 2 + 2 * kWgRows * DP * 2 + 2 * DP * kWgRows * 2;
}

// Vt[b, g, c, t] = V[b * T + t, g, c] for t < T, 0 for T <= t < Tp.
__global__ void transpose_v_kernel(const bf16_bits* __restrict__ V, bf16_bits* __restrict__ Vt,
                                   int T, int Tp, int KVl, int DP) {
  __shared__ bf16_bits tile[64][128 + 2];
  const int t0 = blockIdx.x * 64, g = blockIdx.y, b = blockIdx.z;
  const int ch = DP / 8;
  for (int i = threadIdx.x; i < 64 * ch; i += blockDim.x) {
    const int r = i / ch, c = (i % ch) * 8, t = t0 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (t < T)
      v = *reinterpret_cast<const uint4*>(V + ((static_cast<int64_t>(b) * T + t) * KVl + g) * DP +
                                          c);
    const bf16_bits* e = reinterpret_cast<const bf16_bits*>(&v);
#pragma unroll
    for (int j = 0; j < 8; ++j) tile[r][c + j] = e[j];
  }
  __syncthreads();
  bf16_bits* out = Vt + ((static_cast<int64_t>(b) * KVl + g) * DP) * Tp + t0;
  for (int i = threadIdx.x; i < DP * 8; i += blockDim.x) {
    const int c = i / 8, k8 = (i % 8) * 8;
    alignas(16) bf16_bits e[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) e[j] = tile[k8 + j][c];
    *reinterpret_cast<uint4*>(out + static_cast<int64_t>(c) * Tp + k8) =
        *reinterpret_cast<const uint4*>(e);
  }
}

__global__ void wgmma_probe_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

// The contract of flash_attention_kernel with V read as Vt [B, KVl, DP, Tp]. 256 threads: warpgroup
// wg owns query rows mb * 128 + 64 wg .. + 63 of one (probe, head); key tiles of 128 positions (the
// block's rows, so both warpgroups walk the same tiles). The two products of consecutive tiles
// overlap inside each warpgroup: iteration j issues
// S_j = Q K_j^T and O += P_{j-1} V_{j-1} together, runs the softmax of S_j (exp2 into S_j's own
// registers) while the second product runs, then waits for it, rescales O and packs P_j. K and
// V^T tiles have two slots each; the copies of K_{j+1} and V_j fly during iteration j.
template <int DP>
__global__ void __launch_bounds__(256, 1)
    flash_attention_wgmma_kernel(const bf16_bits* __restrict__ Q, const bf16_bits* __restrict__ K,
                                 const bf16_bits* __restrict__ Vt, bf16_bits* __restrict__ z,
                                 float* __restrict__ a0, int T, int Tp, int Hl, int KVl, int d,
                                 int head_begin, int group, int kv_begin, float scale_log2,
                                 AttnSinks ex) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  constexpr int BN = kWgRows;
  constexpr int QB = kWgRows * DP * 2, KB = BN * DP * 2, VB = DP * BN * 2;
  constexpr int NS = BN / 2, NO = DP / 2, QCH = DP / 8, VCH = BN / 8;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* const sbase = smem_raw + (base - raw);

  const int mb = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);  // longest first
  const int h = blockIdx.y, b = blockIdx.z;
  const int g = (head_begin + h) / group - kv_begin;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int64_t tok0 = static_cast<int64_t>(b) * T;
  const int64_t ldq = static_cast<int64_t>(Hl) * DP, ldk = static_cast<int64_t>(KVl) * DP;
  const int q0 = mb * kWgRows;
  const int wg_first = q0 + wg * 64;
  const bool active = wg_first < T;  // warpgroup-uniform
  const int row0 = wg_first + warp * 16 + gq, row1 = row0 + 8;

  for (int i = tid; i < kWgRows * QCH; i += 256) {
    const int r = i / QCH, c = i % QCH, row = q0 + r;
    const bool valid = row < T;
    cp_async16(sbase + (c / 8) * (kWgRows * 128) + swizzle128(r, c % 8),
               Q + (tok0 + (valid ? row : 0)) * ldq + static_cast<int64_t>(h) * DP + c * 8, valid);
  }
  const bf16_bits* vt_head = Vt + (static_cast<int64_t>(b) * KVl + g) * DP * Tp;
  auto load_k = [&](int kt) {
    unsigned char* ks = sbase + QB + (kt & 1) * KB;
    for (int i = tid; i < BN * QCH; i += 256) {
      const int r = i / QCH, c = i % QCH, key = kt * BN + r;
      const bool valid = key < T;
      cp_async16(ks + (c / 8) * (BN * 128) + swizzle128(r, c % 8),
                 K + (tok0 + (valid ? key : 0)) * ldk + static_cast<int64_t>(g) * DP + c * 8,
                 valid);
    }
  };
  auto load_v = [&](int kt) {
    unsigned char* vs = sbase + QB + 2 * KB + (kt & 1) * VB;
    for (int i = tid; i < DP * VCH; i += 256) {
      const int r = i / VCH, c = i % VCH;  // V^T row r (a head dim), keys kt * BN + 8 c ..
      cp_async16(vs + (c / 8) * (DP * 128) + swizzle128(r, c % 8),
                 vt_head + static_cast<int64_t>(r) * Tp + kt * BN + c * 8, true);
    }
  };
  auto pv = [&](float(&o)[NO], const uint32_t(&pf)[BN / 16][4], int kt) {
    const uint32_t vb = base + QB + 2 * KB + (kt & 1) * VB;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
      Wgmma<DP>::rs(o, pf[kk], smem_desc(vb + (kk / 4) * (DP * 128) + (kk % 4) * 32));
    commit();
  };

  float o[NO];
#pragma unroll
  for (int i = 0; i < NO; ++i) o[i] = 0.f;
  uint32_t pf[BN / 16][4];
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) pf[kk][0] = pf[kk][1] = pf[kk][2] = pf[kk][3] = 0u;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f},
        s_key0[2] = {-INFINITY, -INFINITY};

  // Key tiles from the block's first row's window (0 without one) up to its last row.
  const int n_tiles = (min(q0 + kWgRows, T) - 1) / BN + 1;
  const int kt0 = ex.window > 0 ? max(0, q0 - ex.window + 1) / BN : 0;
  load_k(kt0);
  cp_async_commit();  // Q and K_kt0
  for (int kt = kt0; kt < n_tiles; ++kt) {
    if (kt + 1 < n_tiles) load_k(kt + 1);
    load_v(kt);
    cp_async_commit();
    cp_async_wait<1>();  // Q, K_kt and V_{kt-1} have landed
    fence_proxy_async();
    __syncthreads();
    if (active) {
      const uint32_t qs = base + wg * 64 * 128;
      const uint32_t kb = base + QB + (kt & 1) * KB;
      float s[NS];
#pragma unroll
      for (int i = 0; i < NS; ++i) s[i] = 0.f;
      fence();
#pragma unroll
      for (int ks = 0; ks < DP / 16; ++ks)
        Wgmma<BN>::ss(s, smem_desc(qs + (ks / 4) * (kWgRows * 128) + (ks % 4) * 32),
                      smem_desc(kb + (ks / 4) * (BN * 128) + (ks % 4) * 32), ks > 0);
      commit();
      if (kt > kt0) {
        pv(o, pf, kt - 1);
        wait<1>();  // S_kt; P_{kt-1} V_{kt-1} may still run
      } else {
        wait<0>();
      }
      pin(s);

      // The diagonal tile, keys reaching T, or a window.
      if (kt == n_tiles - 1 || (kt + 1) * BN > T || ex.window > 0) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = e < 2 ? row0 : row1;
            const int key = kt * BN + j * 8 + tq * 2 + (e & 1);
            s[4 * j + e] = key > row || key >= T || (ex.window > 0 && key <= row - ex.window)
                               ? -INFINITY
                               : s[4 * j + e] * scale_log2;
          }
      } else {
#pragma unroll
        for (int i = 0; i < NS; ++i) s[i] *= scale_log2;
      }
      if (kt == 0 && tq == 0) {  // key 0 is column 0 of the first tile
        s_key0[0] = s[0];
        s_key0[1] = s[2];
      }
      float bse[2], alpha[2];
      online_max<BN / 8>(s, m_run, bse, alpha);
      float rs[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        s[4 * j] = exp2f(s[4 * j] - bse[0]);
        s[4 * j + 1] = exp2f(s[4 * j + 1] - bse[0]);
        s[4 * j + 2] = exp2f(s[4 * j + 2] - bse[1]);
        s[4 * j + 3] = exp2f(s[4 * j + 3] - bse[1]);
        rs[0] += s[4 * j] + s[4 * j + 1];
        rs[1] += s[4 * j + 2] + s[4 * j + 3];
      }
      l_run[0] = l_run[0] * alpha[0] + rs[0];
      l_run[1] = l_run[1] * alpha[1] + rs[1];
      wait<0>();  // P_{kt-1} V_{kt-1} is in o, and P_{kt-1} may be overwritten
      pin(o);
#pragma unroll
      for (int j = 0; j < DP / 8; ++j) {
        o[4 * j] *= alpha[0];
        o[4 * j + 1] *= alpha[0];
        o[4 * j + 2] *= alpha[1];
        o[4 * j + 3] *= alpha[1];
      }
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        pf[j / 2][(j & 1) * 2 + 0] = pack_bf16(s[4 * j], s[4 * j + 1]);
        pf[j / 2][(j & 1) * 2 + 1] = pack_bf16(s[4 * j + 2], s[4 * j + 3]);
      }
    }
    __syncthreads();  // the next iteration's copies overwrite K_kt's and V_{kt-1}'s slots
  }
  cp_async_wait<0>();  // V of the last tile
  fence_proxy_async();
  __syncthreads();
  if (active) {
    fence();
    pv(o, pf, n_tiles - 1);
    wait<0>();
    pin(o);
  }
  const int64_t bh = static_cast<int64_t>(b) * Hl + h;
  finish_rows<DP / 8>(o, l_run, m_run, s_key0, ex.sinks ? ex.sinks[h] * kLog2e : -INFINITY, row0, T,
                      tq, z + tok0 * Hl * d + static_cast<int64_t>(h) * d,
                      static_cast<int64_t>(Hl) * d, d, a0 + bh * T,
                      ex.sink_mass ? ex.sink_mass + bh * T : nullptr);
#endif
}

// A[i, 0] from cuDNN's log-sum-exp, in place: a0 [B, Hl, T] holds lse_i on entry and
// exp(scale q_i . k_0 - lse_i) on return, q and k in fp32 from their bf16 values as the attention's
// own product has them; key 0 of the block's (probe, KV head) in shared memory. Eight lanes per
// query (each 16-byte pieces 8 apart, so a warp's loads cover four whole rows of Q), their partial
// dots summed by three shuffles. A block takes kA0Passes groups of kA0Rows queries and issues all
// their loads before the first product (up to 12 in flight a thread at dp 192), so key 0's copy
// and the block's start are paid once per 128 queries, and each thread keeps its reads of Q in
// flight together (one group a block with a load at a time read Q well below the memory's rate).
constexpr int kA0Lanes = 8, kA0Threads = 256, kA0Rows = kA0Threads / kA0Lanes, kA0Passes = 4;
constexpr int kA0Pieces = 3;  // 16-byte pieces of a lane per query: dp <= 192

__global__ void __launch_bounds__(kA0Threads)
    a0_from_lse_kernel(const bf16_bits* __restrict__ Q, const bf16_bits* __restrict__ K,
                       float* __restrict__ a0, int T, int Hl, int KVl, int dp, int head_begin,
                       int group, int kv_begin, float scale) {
  extern __shared__ float k0[];
  const int h = blockIdx.y, b = blockIdx.z;
  const int g = (head_begin + h) / group - kv_begin;
  const int64_t tok0 = static_cast<int64_t>(b) * T;
  const int part = threadIdx.x % kA0Lanes;
  uint4 v[kA0Passes][kA0Pieces];
#pragma unroll
  for (int p = 0; p < kA0Passes; ++p) {
    const int i = (blockIdx.x * kA0Passes + p) * kA0Rows + threadIdx.x / kA0Lanes;
    const bf16_bits* q = Q + ((tok0 + (i < T ? i : 0)) * Hl + h) * dp;
#pragma unroll
    for (int c = 0; c < kA0Pieces; ++c) {
      const int e = part * 8 + c * kA0Lanes * 8;
      v[p][c] = e < dp ? *reinterpret_cast<const uint4*>(q + e) : make_uint4(0u, 0u, 0u, 0u);
    }
  }
  for (int e = threadIdx.x; e < dp; e += blockDim.x) k0[e] = bf2f(K[(tok0 * KVl + g) * dp + e]);
  __syncthreads();
#pragma unroll
  for (int p = 0; p < kA0Passes; ++p) {
    const int i = (blockIdx.x * kA0Passes + p) * kA0Rows + threadIdx.x / kA0Lanes;
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < kA0Pieces; ++c) {
      const int e = part * 8 + c * kA0Lanes * 8;
      if (e >= dp) continue;
      const bf16_bits* qe = reinterpret_cast<const bf16_bits*>(&v[p][c]);
#pragma unroll
      for (int j = 0; j < 8; ++j) dot = fmaf(bf2f(qe[j]), k0[e + j], dot);
    }
#pragma unroll
    for (int o = kA0Lanes / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (i >= T || part != 0) continue;
    float& a = a0[(static_cast<int64_t>(b) * Hl + h) * T + i];
    a = expf(dot * scale - a);
  }
}

// The cuDNN route (cudnn_attention.hpp) where it applies: plain causal attention (no window, no
// learned sinks), local heads mapping onto a contiguous run of held KV heads, and a shape cuDNN
// has an engine for. Returns false where it does not apply (the caller takes a hand-written
// kernel), or runs it and returns true.
bool try_cudnn(const bf16_bits* Q, const bf16_bits* K, const bf16_bits* V, bf16_bits* z, float* a0,
               int B, int T, int Hl, int KVl, int d, int dp, int head_begin, int group,
               int kv_begin, float scale, const AttnSinks& ex, cudaStream_t s, bool required) {
  auto refuse = [&](const std::string& why) {
    if (required)
      throw_api_failure("cuDNN", "the cuDNN attention does not apply: " + why, "flash_attention",
                        __FILE__, __LINE__);
    return false;
  };
  if (!cudnn_attention_built()) return refuse("this build has no cuDNN");
  if (ex.window > 0 || ex.sinks) return refuse("sliding windows and learned sinks stay on ours");
  const int kv0 = head_begin / group - kv_begin;
  if (head_begin % group != 0 || Hl % group != 0 || kv0 < 0 || kv0 + Hl / group > KVl)
    return refuse("the local heads do not map onto a run of held KV heads");
  CudnnAttnShape sh;
  sh.B = B;
  sh.T = T;
  sh.Hq = Hl;
  sh.Hk = Hl / group;
  sh.dqk = dp;
  sh.dv = d;
  sh.q_ld = static_cast<int64_t>(Hl) * dp;
  sh.kv_ld = static_cast<int64_t>(KVl) * dp;
  sh.z_ld = static_cast<int64_t>(Hl) * d;
  if (!cudnn_attention_supported(sh, s)) return refuse(cudnn_attention_last_refusal());
  const int64_t kv_off = static_cast<int64_t>(kv0) * dp;
  cudnn_attention(sh, Q, K + kv_off, V + kv_off, z, a0, scale, s);
  constexpr int rows = kA0Rows * kA0Passes;
  a0_from_lse_kernel<<<dim3((T + rows - 1) / rows, Hl, B), kA0Threads,
                       static_cast<size_t>(dp) * sizeof(float), s>>>(
      Q, K, a0, T, Hl, KVl, dp, head_begin, group, kv_begin, scale);
  CUDA_CHECK_LAUNCH("a0_from_lse_kernel");
  return true;
}

// Which routes have run (bits: 1 mma.sync, 2 wgmma, 4 cuDNN), for --verbose.
std::atomic<unsigned> g_routes_used{0};

int tp_of(int T) { return (T + kVtPad - 1) / kVtPad * kVtPad; }

template <int DP>
void launch_wgmma(const bf16_bits* Q, const bf16_bits* K, const bf16_bits* V, bf16_bits* vt,
                  bf16_bits* z, float* a0, int B, int T, int Hl, int KVl, int d, int head_begin,
                  int group, int kv_begin, float scale, const AttnSinks& ex, cudaStream_t s) {
  const int Tp = tp_of(T);
  transpose_v_kernel<<<dim3(Tp / 64, KVl, B), 256, 0, s>>>(V, vt, T, Tp, KVl, DP);
  CUDA_CHECK_LAUNCH("transpose_v_kernel");
  constexpr int bytes = wg_smem_bytes<DP>();
  CUDA_CHECK(cudaFuncSetAttribute(flash_attention_wgmma_kernel<DP>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const dim3 grid((T + kWgRows - 1) / kWgRows, Hl, B);
  flash_attention_wgmma_kernel<DP><<<grid, 256, bytes, s>>>(
      Q, K, vt, z, a0, T, Tp, Hl, KVl, d, head_begin, group, kv_begin, scale * kLog2e, ex);
  CUDA_CHECK_LAUNCH("flash_attention_wgmma_kernel");
}

}  // namespace

// Whether this build carries the sm_90a kernels for the current device: asked once per device.
bool sm90a_kernels_available() {
  static std::atomic<int> known[64];  // 0 unknown, 1 no, 2 yes
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) return false;
  const int k = known[dev].load();
  if (k != 0) return k == 2;
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  int yes = 0;
  if (prop.major == 9 && prop.minor == 0) {
    DeviceBuffer<int> flag;
    flag.reserve(1);
    wgmma_probe_kernel<<<1, 1>>>(flag.get());
    CUDA_CHECK_LAUNCH("wgmma_probe_kernel");
    CUDA_CHECK(cudaMemcpy(&yes, flag.get(), sizeof(int), cudaMemcpyDeviceToHost));
  }
  known[dev].store(yes ? 2 : 1);
  return yes != 0;
}

bool flash_attention_wgmma_available(int dp) {
  return (dp == 64 || dp == 128) && sm90a_kernels_available();
}

std::string attention_kernels_used() {
  const unsigned used = g_routes_used.load();
  std::string out;
  auto add = [&](const std::string& name) { out += (out.empty() ? "" : ", ") + name; };
  if (used & 4u) {
    const int v = cudnn_version();
    add("cuDNN " + std::to_string(v / 10000) + "." + std::to_string(v % 10000 / 100) + "." +
        std::to_string(v % 100) + " (fused)");
  }
  if (used & 2u) add("wgmma");
  if (used & 1u) add("mma.sync");
  return out.empty() ? "none yet" : out;
}

int64_t flash_attention_scratch(int B, int T, int KVl, int dp) {
  if (dp != 64 && dp != 128) return 0;
  return static_cast<int64_t>(B) * KVl * dp * tp_of(T);
}

void flash_attention(const bf16_bits* Q, const bf16_bits* K, const bf16_bits* V, bf16_bits* z,
                     float* a0, int B, int T, int Hl, int KVl, int d, int dp, int head_begin,
                     int group, int kv_begin, float scale, bf16_bits* vt_scratch, cudaStream_t s,
                     AttnKernel kernel, const AttnSinks& ex) {
  if (B == 0 || T == 0 || Hl == 0) return;
  if (kernel == AttnKernel::kCudnn) {
    try_cudnn(Q, K, V, z, a0, B, T, Hl, KVl, d, dp, head_begin, group, kv_begin, scale, ex, s,
              true);
    g_routes_used |= 4u;
    return;
  }
  if (kernel == AttnKernel::kAuto) {
    static const bool cudnn_off = [] {
      const char* v = std::getenv("SINKSCOPE_ATTN_CUDNN");
      return v && std::string(v) == "0";
    }();
    if (!cudnn_off && try_cudnn(Q, K, V, z, a0, B, T, Hl, KVl, d, dp, head_begin, group, kv_begin,
                                scale, ex, s, false)) {
      g_routes_used |= 4u;
      return;
    }
    static const bool off = [] {
      const char* v = std::getenv("SINKSCOPE_ATTN_WGMMA");
      return v && std::string(v) == "0";
    }();
    kernel = !off && vt_scratch && flash_attention_wgmma_available(dp) ? AttnKernel::kWgmma
                                                                       : AttnKernel::kMmaSync;
  }
  if (kernel == AttnKernel::kWgmma) {
    if (!vt_scratch || !flash_attention_wgmma_available(dp))
      throw_api_failure("CUDA",
                        "the wgmma attention needs an sm_90a build, a compute capability 9.0 "
                        "device, head dim 64 or 128 and V^T scratch (padded head dim " +
                            std::to_string(dp) + ")",
                        "flash_attention", __FILE__, __LINE__);
    g_routes_used |= 2u;
    if (dp == 64)
      return launch_wgmma<64>(Q, K, V, vt_scratch, z, a0, B, T, Hl, KVl, d, head_begin, group,
                              kv_begin, scale, ex, s);
    return launch_wgmma<128>(Q, K, V, vt_scratch, z, a0, B, T, Hl, KVl, d, head_begin, group,
                             kv_begin, scale, ex, s);
  }
  g_routes_used |= 1u;
#define SINKSCOPE_ATTN_CASE(N) \
  case N:                      \
    return launch<N>(Q, K, V, z, a0, B, T, Hl, KVl, d, head_begin, group, kv_begin, scale, ex, s)
  switch (dp) {
    SINKSCOPE_ATTN_CASE(16);
    SINKSCOPE_ATTN_CASE(32);
    SINKSCOPE_ATTN_CASE(48);
    SINKSCOPE_ATTN_CASE(64);
    SINKSCOPE_ATTN_CASE(80);
    SINKSCOPE_ATTN_CASE(96);
    SINKSCOPE_ATTN_CASE(112);
    SINKSCOPE_ATTN_CASE(128);
    SINKSCOPE_ATTN_CASE(192);  // multi-head latent attention (DeepSeek-V3: 128 + 64)
    default:
      throw_api_failure("CUDA", "unsupported padded head dim " + std::to_string(dp),
                        "flash_attention", __FILE__, __LINE__);
  }
#undef SINKSCOPE_ATTN_CASE
}

}  // namespace sinkscope::cuda::k
