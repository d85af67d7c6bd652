// DeepSeek-V3 on the device: the attention operands of multi-head latent attention, the key
// attribution through the latent, and the sigmoid group-limited routing. Each kernel mirrors the
// CPU reference (src/cpu/mla.cpp) step for step, in fp32.
#include <climits>

#include "cuda/device_common.cuh"
#include "cuda/mla_kernels.cuh"

namespace sinkscope::cuda::k {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxRope = 256;   // rope dims of the shared key (DeepSeek-V3: 64)
constexpr int kMaxGroups = 64;  // n_group (DeepSeek-V3: 8)
constexpr int kMaxTopK = 32;

// The stored index of de-interleaved rope dim j (transformers' apply_rotary_pos_emb_interleave
// takes (x0, x2, ..., x1, x3, ...)).
__device__ __forceinline__ int rope_source(int j, int rope, bool interleave) {
  if (!interleave) return j;
  const int half = rope / 2;
  return j < half ? 2 * j : 2 * (j - half) + 1;
}

// Block per (row, local head).
__global__ void mla_pack_kernel(float* __restrict__ q, int64_t ldq, const float* __restrict__ kv,
                                const float* __restrict__ a, int64_t lda, int rope_col, int T,
                                MlaShape m, int dp, const float* __restrict__ cos_tab,
                                const float* __restrict__ sin_tab, bf16_bits* __restrict__ Qa,
                                bf16_bits* __restrict__ Ka, bf16_bits* __restrict__ Va) {
  __shared__ float qr[kMaxRope], kr[kMaxRope], qo[kMaxRope];
  const int64_t r = blockIdx.x;
  const int h = blockIdx.y, dqk = m.dqk(), dkv = m.dkv(), half = m.rope / 2;
  const int pos = static_cast<int>(r % T);
  float* qh = q + r * ldq + static_cast<int64_t>(h) * dqk;
  const float* kvh = kv + (r * m.Hl + h) * dkv;
  for (int j = threadIdx.x; j < m.rope; j += blockDim.x) {
    const int src = rope_source(j, m.rope, m.interleave);
    qr[j] = qh[m.nope + src];
    kr[j] = a[r * lda + rope_col + src];
  }
  __syncthreads();
  bf16_bits* qa = Qa + (r * m.Hl + h) * dp;
  bf16_bits* ka = Ka + (r * m.Hl + h) * dp;
  bf16_bits* va = Va + (r * m.Hl + h) * dp;
  for (int j = threadIdx.x; j < dp; j += blockDim.x) {
    float qv = 0.f, kval = 0.f;
    if (j < m.nope) {
      qv = qh[j];
      kval = kvh[j];
    } else if (j < dqk) {
      const int jj = j - m.nope;
      const int f = jj < half ? jj : jj - half;
      const float c = cos_tab[pos * half + f], sn = sin_tab[pos * half + f];
      if (jj < half) {
        qv = qr[jj] * c - qr[jj + half] * sn;
        kval = kr[jj] * c - kr[jj + half] * sn;
      } else {
        qv = qr[jj] * c + qr[jj - half] * sn;
        kval = kr[jj] * c + kr[jj - half] * sn;
      }
      qo[jj] = qv;
    }
    qa[j] = f2bf(qv);
    ka[j] = f2bf(kval);
    va[j] = f2bf(j < m.dv ? kvh[m.nope + j] : 0.f);
  }
  __syncthreads();
  // The rotated query, de-interleaved, back into q (qbar averages it).
  for (int j = threadIdx.x; j < m.rope; j += blockDim.x) qh[m.nope + j] = qo[j];
}

// Block per probe; dynamic shared memory 2 (Rkv + rope) floats.
__global__ void mla_circuit_finish_kernel(
    const float* __restrict__ kid, const float* __restrict__ inv_rx,
    const float* __restrict__ inv_rl, int T, const float* __restrict__ qbar,
    const bf16_bits* __restrict__ kv_b, const float* __restrict__ gain, MlaShape m, float af,
    float scale, float* __restrict__ k0_model, float* __restrict__ k0_sum, float* __restrict__ qk) {
  extern __shared__ float sh[];
  const int b = blockIdx.x;
  const int R = m.Rkv, ra = R + m.rope, dqk = m.dqk(), dkv = m.dkv();
  float* lat_sum = sh;     // [R] then rope [m.rope]: the components' sum
  float* lat_x = sh + ra;  // the same for x[b T]
  const float ix = inv_rx[static_cast<int64_t>(b) * T], il = inv_rl[static_cast<int64_t>(b) * T];
  const float* row_sum = kid + static_cast<int64_t>(b) * 2 * ra;
  const float* row_x = row_sum + ra;
  for (int t = threadIdx.x; t < R; t += blockDim.x) {
    lat_sum[t] = row_sum[t] * gain[t] * il * ix;
    lat_x[t] = row_x[t] * gain[t] * il * ix;
  }
  for (int j = threadIdx.x; j < m.rope; j += blockDim.x) {
    const int src = rope_source(j, m.rope, m.interleave);
    lat_sum[R + j] = row_sum[R + src] * af * ix;
    lat_x[R + j] = row_x[R + src] * af * ix;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  // The keys at position 0: kv_b's nope rows of each head times the latent, then the rope key.
  for (int row = warp; row < m.Hl * m.nope; row += warps) {
    const int h = row / m.nope, j = row % m.nope;
    const bf16_bits* w = kv_b + (static_cast<int64_t>(h) * dkv + j) * R;
    float s_sum = 0.f, s_x = 0.f;
    for (int t = lane; t < R; t += 32) {
      const float wt = bf2f(w[t]);
      s_sum += wt * lat_sum[t];
      s_x += wt * lat_x[t];
    }
    s_sum = warp_sum(s_sum);
    s_x = warp_sum(s_x);
    if (lane == 0) {
      const int64_t o = (static_cast<int64_t>(b) * m.Hl + h) * dqk + j;
      k0_sum[o] = s_sum;
      k0_model[o] = s_x;
    }
  }
  for (int i = threadIdx.x; i < m.Hl * m.rope; i += blockDim.x) {
    const int h = i / m.rope, j = i % m.rope;
    const int64_t o = (static_cast<int64_t>(b) * m.Hl + h) * dqk + m.nope + j;
    k0_sum[o] = lat_sum[R + j];
    k0_model[o] = lat_x[R + j];
  }
  // What the attribution contracts G with: the latent part per head, then the rope part at the
  // stored positions of the de-interleave.
  for (int h = 0; h < m.Hl; ++h) {
    const float* qb = qbar + (static_cast<int64_t>(b) * m.Hl + h) * dqk;
    float* out = qk + (static_cast<int64_t>(b) * m.Hl + h) * ra;
    for (int t = threadIdx.x; t < R; t += blockDim.x) {
      float acc = 0.f;
      for (int j = 0; j < m.nope; ++j)
        acc += qb[j] * bf2f(kv_b[(static_cast<int64_t>(h) * dkv + j) * R + t]);
      out[t] = acc * gain[t] * il * ix * scale;
    }
    for (int j = threadIdx.x; j < m.rope; j += blockDim.x)
      out[R + rope_source(j, m.rope, m.interleave)] = qb[m.nope + j] * af * ix * scale;
  }
}

// Thread per row.
__global__ void router_sigmoid_groups_kernel(const float* __restrict__ logits, int64_t n, int E,
                                             int K, int G, int TG, const float* __restrict__ bias,
                                             bool norm_topk, float scaling,
                                             int32_t* __restrict__ ids, float* __restrict__ weights,
                                             float* __restrict__ gap) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= n) return;
  const float* lr = logits + r * E;
  const int per = E / G;
  auto score = [&](int e) { return 1.f / (1.f + expf(-lr[e])); };
  auto corrected = [&](int e) { return score(e) + bias[e]; };
  float group[kMaxGroups];
  for (int g = 0; g < G; ++g) {
    float b1 = -INFINITY, b2 = -INFINITY;
    for (int e = g * per; e < (g + 1) * per; ++e) {
      const float v = corrected(e);
      if (v > b1) {
        b2 = b1;
        b1 = v;
      } else if (v > b2) {
        b2 = v;
      }
    }
    group[g] = b1 + b2;
  }
  // The topk_group best groups (ties to the lower index); a near-tie between the last kept group
  // and the next one is a near-tie of the routing too.
  uint64_t keep = 0;
  float group_gap = INFINITY, last_group = 0.f;
  for (int k = 0; k < TG + (TG < G ? 1 : 0); ++k) {
    int best = -1;
    for (int g = 0; g < G; ++g)
      if (!(keep >> g & 1ull) && (best < 0 || group[g] > group[best])) best = g;
    if (k == TG) {
      group_gap = last_group - group[best];
      break;
    }
    keep |= 1ull << best;
    last_group = group[best];
  }
  auto candidate = [&](int e) { return keep >> (e / per) & 1ull ? corrected(e) : 0.f; };
  int chosen[kMaxTopK];
  float last = 0.f, sum = 0.f;
  const int rounds = K < E ? K + 1 : K;
  for (int k = 0; k < rounds; ++k) {
    int best = -1;
    float bv = -INFINITY;
    for (int e = 0; e < E; ++e) {
      bool taken = false;
      for (int j = 0; j < k && j < K; ++j) taken = taken || chosen[j] == e;
      if (taken) continue;
      const float v = candidate(e);
      if (best < 0 || v > bv) {
        best = e;
        bv = v;
      }
    }
    if (k == K) {
      gap[r] = fminf(last - bv, group_gap);
      break;
    }
    chosen[k] = best;
    last = bv;
    sum += score(best);
  }
  for (int k = 0; k < K; ++k) {
    const float w = norm_topk ? score(chosen[k]) / (sum + 1e-20f) : score(chosen[k]);
    ids[r * K + k] = chosen[k];
    weights[r * K + k] = w * scaling;
  }
  if (K >= E) gap[r] = group_gap;
}

}  // namespace

void mla_pack(float* q, int64_t ldq, const float* kv, const float* a, int64_t lda, int rope_col,
              int64_t rows, int T, const MlaShape& m, int dp, const float* cos_tab,
              const float* sin_tab, bf16_bits* Qa, bf16_bits* Ka, bf16_bits* Va, cudaStream_t s) {
  if (rows == 0 || m.Hl == 0) return;
  if (m.rope > kMaxRope || m.dqk() > dp || m.dv > dp)
    throw_api_failure("CUDA", "latent attention shape beyond the pack kernel's limits", "mla_pack",
                      __FILE__, __LINE__);
  mla_pack_kernel<<<dim3(static_cast<unsigned>(rows), m.Hl), kThreads, 0, s>>>(
      q, ldq, kv, a, lda, rope_col, T, m, dp, cos_tab, sin_tab, Qa, Ka, Va);
  CUDA_CHECK_LAUNCH("mla_pack_kernel");
}

void mla_circuit_finish(const float* kid, const float* inv_rx, const float* inv_rl, int B, int T,
                        const float* qbar, const bf16_bits* kv_b, const float* kv_gain,
                        const MlaShape& m, float af, float scale, float* k0_model, float* k0_sum,
                        float* qk, cudaStream_t s) {
  if (B == 0 || m.Hl == 0) return;
  const size_t smem = 2 * static_cast<size_t>(m.Rkv + m.rope) * sizeof(float);
  if (smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(mla_circuit_finish_kernel,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
  mla_circuit_finish_kernel<<<B, 256, smem, s>>>(kid, inv_rx, inv_rl, T, qbar, kv_b, kv_gain, m, af,
                                                 scale, k0_model, k0_sum, qk);
  CUDA_CHECK_LAUNCH("mla_circuit_finish_kernel");
}

void router_sigmoid_groups(const float* logits, int64_t n, int E, int K, int n_group,
                           int topk_group, const float* bias, bool norm_topk, float scaling,
                           int32_t* ids, float* weights, float* gap, cudaStream_t s) {
  if (n == 0) return;
  if (n_group < 1 || n_group > kMaxGroups || E % n_group != 0 || topk_group < 1 ||
      topk_group > n_group || K < 1 || K > kMaxTopK || K > E)
    throw_api_failure("CUDA", "sigmoid group routing shape beyond the kernel's limits",
                      "router_sigmoid_groups", __FILE__, __LINE__);
  router_sigmoid_groups_kernel<<<grid_for(n, 128), 128, 0, s>>>(
      logits, n, E, K, n_group, topk_group, bias, norm_topk, scaling, ids, weights, gap);
  CUDA_CHECK_LAUNCH("router_sigmoid_groups_kernel");
}

}  // namespace sinkscope::cuda::k
