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

constexpr int kMaxLaneElems = 4;  // d <= 128 over 32 lanes

// ||w_h[i]||^2 = z_h[i]^T (W_O,h^T W_O,h) z_h[i] with M = W_O,h^T W_O,h as two bf16 parts
// (hi + lo carry ~16 bits), fused: Y = Z (M_hi + M_lo) is formed on the tensor cores 16 rows x 8
// columns at a time and contracted with z in registers, so Y never reaches memory. Block (chunk,
// h, b) takes rows [i0, i1) of probe b, head h; M_hi and M_lo of the head sit in shared memory
// (zero padded to DP). partial[(b * Hl + h) * chunks + chunk] = sum of ||w|| over its rows i >= 1.
constexpr int kNormChunks = 32, kNormWarps = 8, kNormMinRows = 128, kNormTargetBlocks = 528;

__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

template <int DP>
constexpr int gram_smem_bytes() {
  return 2 * DP * (DP + 8) * static_cast<int>(sizeof(bf16_bits));
}

template <int DP>
__global__ void __launch_bounds__(kNormWarps * 32)
    head_write_norms_kernel(const bf16_bits* __restrict__ z, const bf16_bits* __restrict__ Mhi,
                            const bf16_bits* __restrict__ Mlo, int T, int Hl, int d, int chunks,
                            float* __restrict__ wp0, float* __restrict__ partial) {
  constexpr int STR = DP + 8, KS = DP / 16, NT = DP / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Ms[part][n][k] = M_part[n][k] = M_part[k][n] (exactly symmetric, see gram_split): the B
  // fragments (column n of M) are contiguous in k. Rows copied 16 bytes at a time where d allows.
  bf16_bits* Ms = reinterpret_cast<bf16_bits*>(smem_raw);
  const int chunk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int64_t dd = static_cast<int64_t>(d) * d;
  constexpr int CH = DP / 8;  // 16-byte pieces per padded row
  if (d % 8 == 0) {
    for (int i = threadIdx.x; i < 2 * DP * CH; i += blockDim.x) {
      const int part = i / (DP * CH), n = (i / CH) % DP, k = (i % CH) * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (n < d && k < d)
        v = *reinterpret_cast<const uint4*>((part ? Mlo : Mhi) + h * dd +
                                            static_cast<int64_t>(n) * d + k);
      *reinterpret_cast<uint4*>(Ms + (part * DP + n) * STR + k) = v;
    }
  } else {
    for (int i = threadIdx.x; i < 2 * DP * DP; i += blockDim.x) {
      const int part = i / (DP * DP), n = (i / DP) % DP, k = i % DP;
      Ms[(part * DP + n) * STR + k] =
          n < d && k < d ? (part ? Mlo : Mhi)[h * dd + static_cast<int64_t>(n) * d + k]
                         : static_cast<bf16_bits>(0);
    }
  }
  __syncthreads();
  const int i0 = static_cast<int>(static_cast<int64_t>(T) * chunk / chunks);
  const int i1 = static_cast<int>(static_cast<int64_t>(T) * (chunk + 1) / chunks);
  const int64_t ld = static_cast<int64_t>(Hl) * d;
  // A warp takes 32 rows per step as two 16-row tiles, so each fragment of M read from shared
  // memory feeds two products.
  float rest = 0.f;
  for (int t0 = i0 + warp * 32; t0 < i1; t0 += kNormWarps * 32) {
    int rr[2][2];
    bool vv[2][2];
    uint32_t a[2][KS][4];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      rr[u][0] = t0 + 16 * u + gq;
      rr[u][1] = rr[u][0] + 8;
      vv[u][0] = rr[u][0] < i1;
      vv[u][1] = rr[u][1] < i1;
      const bf16_bits* z0 =
          z + (static_cast<int64_t>(b) * T + (vv[u][0] ? rr[u][0] : i0)) * ld + h * d;
      const bf16_bits* z1 =
          z + (static_cast<int64_t>(b) * T + (vv[u][1] ? rr[u][1] : i0)) * ld + h * d;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const int c = ks * 16 + tq * 2;  // d is even: c < d implies c + 1 < d
        a[u][ks][0] = vv[u][0] && c < d ? ld32(z0 + c) : 0u;
        a[u][ks][1] = vv[u][1] && c < d ? ld32(z1 + c) : 0u;
        a[u][ks][2] = vv[u][0] && c + 8 < d ? ld32(z0 + c + 8) : 0u;
        a[u][ks][3] = vv[u][1] && c + 8 < d ? ld32(z1 + c + 8) : 0u;
      }
    }
    float ss[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float y[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      const bf16_bits* mh = Ms + (nt * 8 + gq) * STR + tq * 2;
      const bf16_bits* ml = mh + DP * STR;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const uint32_t b0 = ld32(mh + ks * 16), b1 = ld32(mh + ks * 16 + 8);
        mma_bf16(y[0], a[0][ks], b0, b1);
        mma_bf16(y[1], a[1][ks], b0, b1);
      }
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const uint32_t b0 = ld32(ml + ks * 16), b1 = ld32(ml + ks * 16 + 8);
        mma_bf16(y[0], a[0][ks], b0, b1);
        mma_bf16(y[1], a[1][ks], b0, b1);
      }
      // y holds Y at rows gq (y0, y1) and gq + 8 (y2, y3), columns nt * 8 + 2 tq + {0, 1}: the
      // same positions as the A fragment of k-step nt / 2, half nt % 2.
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const uint32_t za = a[u][nt / 2][(nt & 1) * 2], zb = a[u][nt / 2][(nt & 1) * 2 + 1];
        ss[u][0] += y[u][0] * bf16_lo(za) + y[u][1] * bf16_hi(za);
        ss[u][1] += y[u][2] * bf16_lo(zb) + y[u][3] * bf16_hi(zb);
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float v = ss[u][hf];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (tq == 0 && vv[u][hf]) {
          // Rounding can leave a tiny negative; a NaN stays NaN (fmaxf would hide it).
          const float nrm = sqrtf(v < 0.f ? 0.f : v);
          if (rr[u][hf] == 0)
            wp0[static_cast<int64_t>(b) * Hl + h] = nrm;
          else
            rest += nrm;
        }
      }
  }
  rest = block_sum(rest);
  if (threadIdx.x == 0) partial[(static_cast<int64_t>(b) * Hl + h) * chunks + chunk] = rest;
}

template <int DP>
void launch_head_write_norms(const bf16_bits* z, const bf16_bits* Mhi, const bf16_bits* Mlo, int B,
                             int T, int Hl, int d, int chunks, float* wp0, float* partial,
                             cudaStream_t s) {
  constexpr int bytes = gram_smem_bytes<DP>();
  CUDA_CHECK(cudaFuncSetAttribute(head_write_norms_kernel<DP>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  head_write_norms_kernel<DP><<<dim3(chunks, Hl, B), kNormWarps * 32, bytes, s>>>(
      z, Mhi, Mlo, T, Hl, d, chunks, wp0, partial);
  CUDA_CHECK_LAUNCH("head_write_norms_kernel");
}

__global__ void head_write_norms_finish_kernel(const float* __restrict__ partial, int n, int chunks,
                                               int T, float* __restrict__ wrest) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  double acc = 0;
  for (int c = 0; c < chunks; ++c) acc += partial[static_cast<int64_t>(i) * chunks + c];
  wrest[i] = static_cast<float>(acc / (T - 1));
}

__global__ void z_rows_kernel(const bf16_bits* __restrict__ z, const float* __restrict__ zbar,
                              int B, int T, int Hl, int d, float* __restrict__ zr) {
  const int64_t n = static_cast<int64_t>(Hl) * B * d;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(idx % d);
    const int b = static_cast<int>((idx / d) % B);
    const int h = static_cast<int>(idx / (static_cast<int64_t>(d) * B));
    const int64_t col = static_cast<int64_t>(h) * d + j;
    const float z0 = bf2f(z[static_cast<int64_t>(b) * T * Hl * d + col]);
    const float zb = zbar[static_cast<int64_t>(b) * Hl * d + col];
    float* out = zr + ((static_cast<int64_t>(h) * B + b) * 2) * d;
    out[j] = z0 - zb;
    out[d + j] = z0;
  }
}

// Warp per (output channel c, local head h).
__global__ void head_pack_kernel(const float* __restrict__ zr, const bf16_bits* __restrict__ Wo,
                                 int B, int Hl, int d, int D, int H, int head_begin,
                                 float* __restrict__ hp) {
  const int lane = threadIdx.x & 31;
  const int c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int h = blockIdx.y;
  if (c >= D) return;
  const int64_t qw = static_cast<int64_t>(Hl) * d;
  float w[kMaxLaneElems];
#pragma unroll
  for (int t = 0; t < kMaxLaneElems; ++t) {
    const int j = lane + 32 * t;
    w[t] = j < d ? bf2f(Wo[c * qw + static_cast<int64_t>(h) * d + j]) : 0.f;
  }
  for (int r = 0; r < 2 * B; ++r) {
    const float* zrow = zr + (static_cast<int64_t>(h) * 2 * B + r) * d;
    float acc = 0.f;
#pragma unroll
    for (int t = 0; t < kMaxLaneElems; ++t) {
      const int j = lane + 32 * t;
      if (j < d) acc += zrow[j] * w[t];
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      const int b = r / 2, s = r % 2;
      hp[((static_cast<int64_t>(b) * H + head_begin + h) * 2 + s) * D + c] = acc;
    }
  }
}

// Block of kFinCols columns x kFinLanes slot lanes: lane y takes slots y, y + kFinLanes, ...
// (their deltas stored as they come); the lanes' sums then join in lane order (deterministic).
constexpr int kFinCols = 32, kFinLanes = 8;

__global__ void __launch_bounds__(kFinCols* kFinLanes)
    finish_components_kernel(ComponentRows rows, int S, int D, int T,
                             const uint8_t* __restrict__ ablated, float* __restrict__ delta_store,
                             int64_t delta_bstride, float* __restrict__ target,
                             int64_t target_bstride, float* __restrict__ p0_sum) {
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

// The same with 16-byte loads (K, ldw multiples of 8; W and A 16-byte aligned): warp per (column
// n, chunk of kRowChunk rows), each lane 8 consecutive K per step.
__global__ void rows_times_wt8_kernel(const float* __restrict__ A, int R, int K,
                                      const bf16_bits* __restrict__ W, int N, int64_t ldw,
                                      float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int r0 = blockIdx.y * kRowChunk;
  if (n >= N) return;
  const bf16_bits* wr = W + n * ldw;
  float acc[kRowChunk];
#pragma unroll
  for (int i = 0; i < kRowChunk; ++i) acc[i] = 0.f;
  for (int kk = lane * 8; kk < K; kk += 32 * 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(wr + kk);
    const uint32_t wv[4] = {u.x, u.y, u.z, u.w};
    float w[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      w[2 * j] = __uint_as_float(wv[j] << 16);
      w[2 * j + 1] = __uint_as_float(wv[j] & 0xffff0000u);
    }
#pragma unroll
    for (int i = 0; i < kRowChunk; ++i) {
      if (r0 + i >= R) break;
      const float* a = A + static_cast<int64_t>(r0 + i) * K + kk;
      const float4 a0 = *reinterpret_cast<const float4*>(a);
      const float4 a1 = *reinterpret_cast<const float4*>(a + 4);
      acc[i] += a0.x * w[0] + a0.y * w[1] + a0.z * w[2] + a0.w * w[3] + a1.x * w[4] + a1.y * w[5] +
                a1.z * w[6] + a1.w * w[7];
    }
  }
#pragma unroll
  for (int i = 0; i < kRowChunk; ++i) {
    const float v = warp_sum(acc[i]);
    if (lane == 0 && r0 + i < R) out[static_cast<int64_t>(r0 + i) * N + n] = v;
  }
}

__global__ void circuit_finish_kernel(const float* __restrict__ kid,
                                      const float* __restrict__ inv_rx, int T,
                                      const float* __restrict__ qbar, KeyNorm kn, int Hl, int KVl,
                                      int d, int head_begin, int group, int kv_begin, float eps,
                                      float scale, float* __restrict__ k0_model,
                                      float* __restrict__ k0_sum, float* __restrict__ qk) {
  extern __shared__ float inv_rk[];  // [KVl]
  const int b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t kw = static_cast<int64_t>(KVl) * d;
  const float ix = inv_rx[static_cast<int64_t>(b) * T];
  const float* sum_row = kid + (static_cast<int64_t>(b) * 2) * kw;
  const float* x0_row = sum_row + kw;
  auto gain = [&](int g, int j) {
    return kn.gain ? kn.gain[static_cast<int64_t>(g) * kn.gain_stride + j] : 1.f;
  };
  auto kconst = [&](int g, int j) {
    return kn.kconst ? kn.kconst[static_cast<int64_t>(g) * d + j] : 0.f;
  };
  for (int g = warp; g < KVl; g += warps) {
    float irk = 1.f;  // no key norm: r_k = 1 and unit gains (docs/metrics.md, "Model families")
    if (kn.inv_rk_rows) {
      irk = kn.inv_rk_rows[static_cast<int64_t>(b) * T];  // full width: over every KV head
    } else if (kn.gain) {
      float ss = 0.f;
      for (int j = lane; j < d; j += 32) {
        const float v = x0_row[static_cast<int64_t>(g) * d + j] * ix + kconst(g, j);
        ss += v * v;
      }
      ss = warp_sum(ss);
      irk = 1.f / sqrtf(ss / static_cast<float>(d) + eps);
    }
    if (lane == 0) inv_rk[g] = irk;
    for (int j = lane; j < d; j += 32) {
      const int64_t o = (static_cast<int64_t>(b) * KVl + g) * d + j;
      const float f = irk * gain(g, j);
      k0_model[o] = (x0_row[static_cast<int64_t>(g) * d + j] * ix + kconst(g, j)) * f;
      k0_sum[o] = (sum_row[static_cast<int64_t>(g) * d + j] * ix + kconst(g, j)) * f;
    }
  }
  __syncthreads();
  for (int h = warp; h < Hl; h += warps) {
    const int g = (head_begin + h) / group - kv_begin;
    const float f = ix * inv_rk[g] * scale;
    for (int j = lane; j < d; j += 32) {
      const int64_t o = (static_cast<int64_t>(b) * Hl + h) * d + j;
      qk[o] = qbar[o] * gain(g, j) * f * (j < kn.rot ? kn.rope_factor : 1.f);
    }
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
// (sum_j q_j W[j, c] gamma[c] = gamma[c] sum_j q_j W[j, c]).
constexpr int kDirHeads = 8, kDirSlices = 8, kDirCols = 64;

__global__ void __launch_bounds__(kDirSlices * 32)
    key_directions_kernel(const bf16_bits* __restrict__ Wk, const float* __restrict__ gamma,
                          const float* __restrict__ qk, int Hl, int d, int D, int head_begin,
                          int group, int kv_begin, float* __restrict__ dir) {
  __shared__ float red[kDirSlices][kDirHeads][kDirCols];
  const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
  const int c0 = blockIdx.x * kDirCols + 2 * lane;  // this lane's two columns (D even)
  const int g = blockIdx.y, b = blockIdx.z;
  const int h_lo = max(0, (g + kv_begin) * group - head_begin);
  const int h_hi = min(Hl, (g + kv_begin + 1) * group - head_begin);
  const bf16_bits* w = Wk + static_cast<int64_t>(g) * d * D + c0;
  for (int h0 = h_lo; h0 < h_hi; h0 += kDirHeads) {
    const int nh = min(kDirHeads, h_hi - h0);
    const float* q = qk + (static_cast<int64_t>(b) * Hl + h0) * d;  // the same for every lane
    float acc[kDirHeads][2] = {};
    if (c0 < D) {
      for (int j = slice; j < d; j += kDirSlices) {
        const uint32_t pair = ld32(w + static_cast<int64_t>(j) * D);
        const float w0 = __uint_as_float(pair << 16), w1 = __uint_as_float(pair & 0xffff0000u);
#pragma unroll
        for (int u = 0; u < kDirHeads; ++u) {
          const float qj = u < nh ? __ldg(q + u * d + j) : 0.f;
          acc[u][0] += qj * w0;
          acc[u][1] += qj * w1;
        }
      }
    }
    __syncthreads();  // red of the previous pass is read
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
  key_directions_kernel<<<dim3((D + kDirCols - 1) / kDirCols, KVl, B), kDirSlices * 32, 0, s>>>(
      Wk, gamma, qk, Hl, d, D, head_begin, group, kv_begin, dir);
  CUDA_CHECK_LAUNCH("key_directions_kernel");
  if (centre) centre_rows(dir, static_cast<int64_t>(B) * Hl, D, s);
}

int64_t head_write_norms_scratch(int B, int Hl) {
  return static_cast<int64_t>(B) * Hl * kNormChunks;
}

void head_write_norms(const bf16_bits* z, const bf16_bits* gram_hi, const bf16_bits* gram_lo, int B,
                      int T, int Hl, int d, int dp, float* partial, float* wp0, float* wrest,
                      cudaStream_t s) {
  if (B == 0 || Hl == 0) return;
  // Enough blocks to fill the device (~4 per SM of an H100/H200), each with enough rows to repay
  // its copy of M.
  const int want = (kNormTargetBlocks + B * Hl - 1) / (B * Hl);
  const int chunks = std::max(1, std::min({kNormChunks, want, T / kNormMinRows}));
#define SINKSCOPE_GRAM_CASE(N)                                                             \
  case N:                                                                                  \
    launch_head_write_norms<N>(z, gram_hi, gram_lo, B, T, Hl, d, chunks, wp0, partial, s); \
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
  head_write_norms_finish_kernel<<<(B * Hl + 127) / 128, 128, 0, s>>>(partial, B * Hl, chunks, T,
                                                                      wrest);
  CUDA_CHECK_LAUNCH("head_write_norms_finish_kernel");
}

void z_rows(const bf16_bits* z, const float* zbar, int B, int T, int Hl, int d, float* zr,
            cudaStream_t s) {
  const int64_t n = static_cast<int64_t>(Hl) * B * d;
  if (n == 0) return;
  z_rows_kernel<<<grid_for(n, 256, 4096), 256, 0, s>>>(z, zbar, B, T, Hl, d, zr);
  CUDA_CHECK_LAUNCH("z_rows_kernel");
}

void head_pack(const float* zr, const bf16_bits* Wo, int B, int Hl, int d, int D, int H,
               int head_begin, float* hp, cudaStream_t s) {
  if (B == 0 || Hl == 0) return;
  head_pack_kernel<<<dim3((D + 7) / 8, Hl), 256, 0, s>>>(zr, Wo, B, Hl, d, D, H, head_begin, hp);
  CUDA_CHECK_LAUNCH("head_pack_kernel");
}

void finish_components(const ComponentRows& rows, int B, int S, int D, int T,
                       const uint8_t* ablated, float* delta_store, int64_t delta_bstride,
                       float* target, int64_t target_bstride, float* p0_sum, cudaStream_t s) {
  if (B == 0 || S == 0) return;
  finish_components_kernel<<<dim3((D + kFinCols - 1) / kFinCols, B), kFinCols * kFinLanes, 0, s>>>(
      rows, S, D, T, ablated, delta_store, delta_bstride, target, target_bstride, p0_sum);
  CUDA_CHECK_LAUNCH("finish_components_kernel");
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
    rows_times_wt8_kernel<<<dim3((N + 7) / 8, (R + kRowChunk - 1) / kRowChunk), 256, 0, s>>>(
        A, R, K, W, N, ldw, out);
    CUDA_CHECK_LAUNCH("rows_times_wt8_kernel");
    return;
  }
  rows_times_wt_kernel<<<(N + 7) / 8, 256, 0, s>>>(A, R, K, W, N, ldw, out);
  CUDA_CHECK_LAUNCH("rows_times_wt_kernel");
}

void circuit_finish(const float* kid, const float* inv_rx, int B, int T, const float* qbar,
                    const KeyNorm& k_norm, int Hl, int KVl, int d, int head_begin, int group,
                    int kv_begin, float eps, float scale, float* k0_model, float* k0_sum, float* qk,
                    cudaStream_t s) {
  if (B == 0) return;
  circuit_finish_kernel<<<B, 128, KVl * sizeof(float), s>>>(kid, inv_rx, T, qbar, k_norm, Hl, KVl,
                                                            d, head_begin, group, kv_begin, eps,
                                                            scale, k0_model, k0_sum, qk);
  CUDA_CHECK_LAUNCH("circuit_finish_kernel");
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
