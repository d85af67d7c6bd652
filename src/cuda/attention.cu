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
#include <cstdlib>

#include "cuda/device_common.cuh"
#include "cuda/kernels.cuh"

namespace sinkscope::cuda::k {
namespace {

constexpr int kBlockN = 64;  // keys per tile; a block holds BM queries, 16 per warp

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return static_cast<uint32_t>(f2bf(lo)) | (static_cast<uint32_t>(f2bf(hi)) << 16);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3, const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
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
                           int group, int kv_begin, float scale_log2) {
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
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, s_key0[2] = {0.f, 0.f};

  // Key tiles up to the block's last row; a warp skips the compute of tiles wholly above its rows
  // (all masked: they would change nothing) but not the block's barriers.
  const int block_last_row = min((mb + 1) * BM, T) - 1;
  const int n_tiles = block_last_row / kBlockN + 1;
  load_tile(0, 0);
  for (int kt = 0; kt < n_tiles; ++kt) {
    if (kt + 1 < n_tiles) {
      load_tile(kt + 1, (kt + 1) & 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (kt * kBlockN <= warp_last_row) {  // else every key of the tile is above the warp's rows
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
          if ((diagonal && key > row) || key >= T) v = -INFINITY;
          sc[nt][e] = v;
        }
      if (kt == 0 && tq == 0) {  // key 0 is column 0 of the first n-tile
        s_key0[0] = sc[0][0];
        s_key0[1] = sc[0][2];
      }

      float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mx[0] = fmaxf(mx[0], fmaxf(sc[nt][0], sc[nt][1]));
        mx[1] = fmaxf(mx[1], fmaxf(sc[nt][2], sc[nt][3]));
      }
      float base[2], alpha[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        base[i] = mx[i] == -INFINITY ? 0.f : mx[i];
        alpha[i] = exp2f(m_run[i] - base[i]);
        m_run[i] = mx[i];
      }

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

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
  const float inv_l[2] = {1.f / l_run[0], 1.f / l_run[1]};
  const int64_t ldz = static_cast<int64_t>(Hl) * d;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = i == 0 ? row0 : row1;
    if (row >= T) continue;
    bf16_bits* zr = z + (tok0 + row) * ldz + static_cast<int64_t>(h) * d;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int col = dt * 8 + tq * 2;
      if (col < d) zr[col] = f2bf(o[dt][2 * i] * inv_l[i]);
      if (col + 1 < d) zr[col + 1] = f2bf(o[dt][2 * i + 1] * inv_l[i]);
    }
    if (tq == 0)
      a0[(static_cast<int64_t>(b) * Hl + h) * T + row] = exp2f(s_key0[i] - m_run[i]) * inv_l[i];
  }
}

template <int DP, int BM>
void launch_bm(const bf16_bits* Q, const bf16_bits* K, const bf16_bits* V, bf16_bits* z, float* a0,
               int B, int T, int Hl, int KVl, int d, int head_begin, int group, int kv_begin,
               float scale, cudaStream_t s) {
  constexpr int bytes = smem_bytes<DP>();
  // Per launch: the attribute belongs to the current device, and a host call costs microseconds.
  CUDA_CHECK(cudaFuncSetAttribute(flash_attention_kernel<DP, BM>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const dim3 grid((T + BM - 1) / BM, Hl, B);
  const float scale_log2 = scale * 1.4426950408889634f;
  flash_attention_kernel<DP, BM><<<grid, BM / 16 * 32, bytes, s>>>(
      Q, K, V, z, a0, T, Hl, KVl, d, head_begin, group, kv_begin, scale_log2);
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
            float scale, cudaStream_t s) {
  if (block_m() == 64)
    launch_bm<DP, 64>(Q, K, V, z, a0, B, T, Hl, KVl, d, head_begin, group, kv_begin, scale, s);
  else
    launch_bm<DP, 128>(Q, K, V, z, a0, B, T, Hl, KVl, d, head_begin, group, kv_begin, scale, s);
}

}  // namespace

void flash_attention(const bf16_bits* Q, const bf16_bits* K, const bf16_bits* V, bf16_bits* z,
                     float* a0, int B, int T, int Hl, int KVl, int d, int dp, int head_begin,
                     int group, int kv_begin, float scale, cudaStream_t s) {
  if (B == 0 || T == 0 || Hl == 0) return;
#define SINKSCOPE_ATTN_CASE(N) \
  case N:                      \
    return launch<N>(Q, K, V, z, a0, B, T, Hl, KVl, d, head_begin, group, kv_begin, scale, s)
  switch (dp) {
    SINKSCOPE_ATTN_CASE(16);
    SINKSCOPE_ATTN_CASE(32);
    SINKSCOPE_ATTN_CASE(48);
    SINKSCOPE_ATTN_CASE(64);
    SINKSCOPE_ATTN_CASE(80);
    SINKSCOPE_ATTN_CASE(96);
    SINKSCOPE_ATTN_CASE(112);
    SINKSCOPE_ATTN_CASE(128);
    default:
      throw_api_failure("CUDA", "unsupported padded head dim " + std::to_string(dp),
                        "flash_attention", __FILE__, __LINE__);
  }
#undef SINKSCOPE_ATTN_CASE
}

}  // namespace sinkscope::cuda::k
