// The block variants of the families beyond Qwen3-MoE (family_kernels.cuh): LayerNorm, biases, the
// full-width q/k norm, post-norm scaling, MLP activations, the shared expert's gate. The arithmetic
// follows src/cpu/kernels.cpp and src/cpu/backend.cpp (fp32, double where the CPU sums in double).
#include "cuda/device_common.cuh"
#include "cuda/family_kernels.cuh"

namespace sinkscope::cuda::k {
namespace {

constexpr int kThreads = 256;

// One row per block. V = 4: 16-byte loads and stores (D % 4 == 0; rows are then 16-byte aligned).
// out_split, where not null, gets the fp32 value's two lower bf16 parts [mid | lo] per row (width
// 2D): v = out_bf + mid + lo exactly (bf16 keeps fp32's exponent range).
template <NormMode mode, int V>
__global__ void __launch_bounds__(kThreads)
    norm_rows_kernel(const float* __restrict__ x, int D, const float* __restrict__ gamma,
                     const float* __restrict__ beta, float eps, bf16_bits* __restrict__ out_bf,
                     float* __restrict__ out_f32, bf16_bits* __restrict__ out_split,
                     float* __restrict__ inv_scale, int64_t row_step) {
  const int64_t r = blockIdx.x * row_step;
  const float* xr = x + r * D;
  auto load = [&](int c, float(&v)[V]) {
    if constexpr (V == 4) {
      const float4 q = *reinterpret_cast<const float4*>(xr + c);
      v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    } else {
      v[0] = xr[c];
    }
  };
  float mean = 0.f, inv = 1.f;
  if constexpr (mode == NormMode::kRms) {
    float ss = 0.f;
    for (int c = threadIdx.x * V; c < D; c += blockDim.x * V) {
      float v[V];
      load(c, v);
#pragma unroll
      for (int i = 0; i < V; ++i) ss += v[i] * v[i];
    }
    ss = block_sum(ss);
    inv = 1.f / sqrtf(ss / static_cast<float>(D) + eps);
  } else if constexpr (mode == NormMode::kLayer) {
    double sum = 0.0;  // two passes in double, as cpu::layer_norm
    for (int c = threadIdx.x; c < D; c += blockDim.x) sum += xr[c];
    const double m = block_sum(sum) / static_cast<double>(D);
    double var = 0.0;
    for (int c = threadIdx.x; c < D; c += blockDim.x) var += (xr[c] - m) * (xr[c] - m);
    var = block_sum(var);
    mean = static_cast<float>(m);
    inv = static_cast<float>(1.0 / sqrt(var / static_cast<double>(D) + eps));
  }
  if (inv_scale && threadIdx.x == 0) inv_scale[r] = inv;
  for (int c = threadIdx.x * V; c < D; c += blockDim.x * V) {
    float v[V];
    load(c, v);
    bf16_bits hi[V], mid[V], lo[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if constexpr (mode == NormMode::kRms) v[i] = v[i] * inv * gamma[c + i];
      if constexpr (mode == NormMode::kLayer)
        v[i] = (v[i] - mean) * inv * gamma[c + i] + (beta ? beta[c + i] : 0.f);
      hi[i] = f2bf(v[i]);
      const float rest = v[i] - bf2f(hi[i]);
      mid[i] = f2bf(rest);
      lo[i] = f2bf(rest - bf2f(mid[i]));
    }
    if constexpr (V == 4) {
      auto pack4 = [](const bf16_bits(&h)[4]) {
        return make_uint2(static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16),
                          static_cast<uint32_t>(h[2]) | (static_cast<uint32_t>(h[3]) << 16));
      };
      *reinterpret_cast<uint2*>(out_bf + r * D + c) = pack4(hi);
      if (out_f32)
        *reinterpret_cast<float4*>(out_f32 + r * D + c) = make_float4(v[0], v[1], v[2], v[3]);
      if (out_split) {
        *reinterpret_cast<uint2*>(out_split + r * 2 * D + c) = pack4(mid);
        *reinterpret_cast<uint2*>(out_split + r * 2 * D + D + c) = pack4(lo);
      }
    } else {
      out_bf[r * D + c] = hi[0];
      if (out_f32) out_f32[r * D + c] = v[0];
      if (out_split) {
        out_split[r * 2 * D + c] = mid[0];
        out_split[r * 2 * D + D + c] = lo[0];
      }
    }
  }
}

__global__ void add_row_bias_kernel(float* __restrict__ x, int64_t rows, int n, int64_t ld,
                                    const float* __restrict__ bias) {
  const int64_t total = rows * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[(i / n) * ld + i % n] += bias[i % n];
}

__global__ void full_width_sumsq_kernel(const float* __restrict__ qkv, int64_t rows, int64_t ld,
                                        int qw, int KVl, int d,
                                        const uint8_t* __restrict__ count_kv,
                                        float* __restrict__ sums) {
  const int64_t r = blockIdx.x;
  const float* row = qkv + r * ld;
  double sq = 0.0, sk = 0.0;
  for (int j = threadIdx.x; j < qw; j += blockDim.x) sq += static_cast<double>(row[j]) * row[j];
  for (int j = threadIdx.x; j < KVl * d; j += blockDim.x)
    if (count_kv[j / d]) sk += static_cast<double>(row[qw + j]) * row[qw + j];
  sq = block_sum(sq);
  sk = block_sum(sk);
  if (threadIdx.x == 0) {
    sums[r] = static_cast<float>(sq);
    sums[rows + r] = static_cast<float>(sk);
  }
}

__global__ void full_width_apply_kernel(float* __restrict__ qkv, int64_t rows, int64_t ld, int qw,
                                        int kw, const float* __restrict__ sums, float qn, float kn,
                                        float eps, const float* __restrict__ gain_q,
                                        const float* __restrict__ gain_k,
                                        float* __restrict__ inv_rk) {
  const int64_t r = blockIdx.x;
  float* row = qkv + r * ld;
  const float iq = 1.f / sqrtf(sums[r] / qn + eps);
  const float ik = 1.f / sqrtf(sums[rows + r] / kn + eps);
  if (threadIdx.x == 0) inv_rk[r] = ik;
  for (int j = threadIdx.x; j < qw; j += blockDim.x) row[j] = row[j] * iq * gain_q[j];
  for (int j = threadIdx.x; j < kw; j += blockDim.x) row[qw + j] = row[qw + j] * ik * gain_k[j];
}

__global__ void post_norm_rows_kernel(float* __restrict__ a, int D, const float* __restrict__ gain,
                                      float eps, float* __restrict__ scale) {
  const int64_t r = blockIdx.x;
  float* ar = a + r * D;
  double ss = 0.0;  // double, as src/cpu/backend.cpp
  for (int c = threadIdx.x; c < D; c += blockDim.x) ss += static_cast<double>(ar[c]) * ar[c];
  ss = block_sum(ss);
  const float sc = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(D) + eps));
  if (scale && threadIdx.x == 0) scale[r] = sc;
  for (int c = threadIdx.x; c < D; c += blockDim.x) ar[c] = ar[c] * sc * gain[c];
}

__global__ void scale_rows_bf16_kernel(const bf16_bits* __restrict__ z, int64_t rows, int cols,
                                       const float* __restrict__ scale,
                                       bf16_bits* __restrict__ out) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = f2bf(bf2f(z[i]) * scale[i / cols]);
}

__device__ __forceinline__ float activate(Activation act, float v) {
  switch (act) {
    case Activation::kSilu:
      return v / (1.f + expf(-v));
    case Activation::kGeluErf:
      return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
  }
  return v;
}

__global__ void bias_activation_kernel(const float* __restrict__ h, int64_t n, int I, bool gated,
                                       Activation act, const float* __restrict__ bias,
                                       bf16_bits* __restrict__ out) {
  const int64_t total = n * I;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / I;
    const int j = static_cast<int>(i % I);
    if (gated) {
      const float g = h[r * 2 * I + j] + (bias ? bias[j] : 0.f);
      const float u = h[r * 2 * I + I + j] + (bias ? bias[I + j] : 0.f);
      out[i] = f2bf(activate(act, g) * u);
    } else {
      out[i] = f2bf(activate(act, h[i] + (bias ? bias[j] : 0.f)));
    }
  }
}

// The local expert of packed row r, or -1 where r is in no group: the last group starting at or
// before r holds it if any does (an empty group shares its start with the next one).
__device__ __forceinline__ int expert_of_row(const ExpertGroups& g, int64_t r) {
  int lo = 0, hi = g.count;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (g.start[mid] <= r)
      lo = mid;
    else
      hi = mid;
  }
  return g.count > 0 && r >= g.start[lo] && r < g.start[lo] + g.rows[lo] ? g.expert[lo] : -1;
}

// Block per packed row.
__global__ void expert_bias_activation_kernel(const float* __restrict__ h, int I, ExpertGroups g,
                                              Activation act, float limit, float alpha,
                                              const float* __restrict__ bias,
                                              bf16_bits* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int e = expert_of_row(g, r);
  if (e < 0) return;
  const float* b = bias ? bias + static_cast<int64_t>(e) * 2 * I : nullptr;
  const float* hr = h + r * 2 * I;
  for (int j = threadIdx.x; j < I; j += blockDim.x) {
    const float gate = hr[j] + (b ? b[j] : 0.f), up = hr[I + j] + (b ? b[I + j] : 0.f);
    float v;
    if (act == Activation::kSwigluClamped) {
      const float gc = fminf(gate, limit), uc = fminf(fmaxf(up, -limit), limit);
      v = (uc + 1.f) * (gc / (1.f + expf(-alpha * gc)));
    } else {
      v = activate(act, gate) * up;
    }
    out[r * I + j] = f2bf(v);
  }
}

__global__ void expert_add_bias_kernel(const float* __restrict__ y, int D, ExpertGroups g,
                                       const float* __restrict__ bias,
                                       bf16_bits* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int e = expert_of_row(g, r);
  if (e < 0) return;
  const float* b = bias ? bias + static_cast<int64_t>(e) * D : nullptr;
  for (int c = threadIdx.x; c < D; c += blockDim.x)
    out[r * D + c] = f2bf(y[r * D + c] + (b ? b[c] : 0.f));
}

__global__ void sigmoid_gate_rows_kernel(float* __restrict__ y, const float* __restrict__ x, int D,
                                         const float* __restrict__ w) {
  const int64_t r = blockIdx.x;
  float dot = 0.f;
  for (int c = threadIdx.x; c < D; c += blockDim.x) dot += x[r * D + c] * w[c];
  dot = block_sum(dot);
  const float g = 1.f / (1.f + expf(-dot));
  for (int c = threadIdx.x; c < D; c += blockDim.x) y[r * D + c] *= g;
}

__global__ void add_p0_remainder_kernel(const float* __restrict__ a, int T, int D,
                                        const float* __restrict__ hp, int H,
                                        float* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (c >= D) return;
  double rest = a[b * T * D + c];
  for (int h = 0; h < H; ++h) rest -= hp[((b * H + h) * 2 + 1) * D + c];
  out[b * D + c] += static_cast<float>(rest);
}

}  // namespace

void norm_rows(NormMode mode, const float* x, int64_t rows, int D, const float* gamma,
               const float* beta, float eps, bf16_bits* out_bf, float* out_f32,
               bf16_bits* out_split, float* inv_scale, cudaStream_t s, int64_t row_step) {
  if (rows == 0) return;
  const unsigned grid = static_cast<unsigned>(rows);
  auto launch = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, s>>>(x, D, gamma, beta, eps, out_bf, out_f32, out_split, inv_scale,
                                     row_step);
  };
  const bool v4 = D % 4 == 0;
  switch (mode) {
    case NormMode::kRms:
      v4 ? launch(norm_rows_kernel<NormMode::kRms, 4>)
         : launch(norm_rows_kernel<NormMode::kRms, 1>);
      break;
    case NormMode::kLayer:
      v4 ? launch(norm_rows_kernel<NormMode::kLayer, 4>)
         : launch(norm_rows_kernel<NormMode::kLayer, 1>);
      break;
    case NormMode::kNone:
      v4 ? launch(norm_rows_kernel<NormMode::kNone, 4>)
         : launch(norm_rows_kernel<NormMode::kNone, 1>);
      break;
  }
  CUDA_CHECK_LAUNCH("norm_rows_kernel");
}

void add_row_bias(float* x, int64_t rows, int n, int64_t ld, const float* bias, cudaStream_t s) {
  if (rows == 0 || n == 0 || !bias) return;
  add_row_bias_kernel<<<grid_for(rows * n, kThreads, 8192), kThreads, 0, s>>>(x, rows, n, ld, bias);
  CUDA_CHECK_LAUNCH("add_row_bias_kernel");
}

void full_width_sumsq(const float* qkv, int64_t rows, int64_t ld, int qw, int KVl, int d,
                      const uint8_t* count_kv, float* sums, cudaStream_t s) {
  if (rows == 0) return;
  full_width_sumsq_kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(qkv, rows, ld, qw, KVl,
                                                                           d, count_kv, sums);
  CUDA_CHECK_LAUNCH("full_width_sumsq_kernel");
}

void full_width_apply(float* qkv, int64_t rows, int64_t ld, int qw, int kw, const float* sums,
                      float qn, float kn, float eps, const float* gain_q, const float* gain_k,
                      float* inv_rk, cudaStream_t s) {
  if (rows == 0) return;
  full_width_apply_kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(
      qkv, rows, ld, qw, kw, sums, qn, kn, eps, gain_q, gain_k, inv_rk);
  CUDA_CHECK_LAUNCH("full_width_apply_kernel");
}

void post_norm_rows(float* a, int64_t rows, int D, const float* gain, float eps, float* scale,
                    cudaStream_t s) {
  if (rows == 0) return;
  post_norm_rows_kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(a, D, gain, eps, scale);
  CUDA_CHECK_LAUNCH("post_norm_rows_kernel");
}

void scale_rows_bf16(const bf16_bits* z, int64_t rows, int cols, const float* scale, bf16_bits* out,
                     cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  scale_rows_bf16_kernel<<<grid_for(rows * cols, kThreads, 8192), kThreads, 0, s>>>(z, rows, cols,
                                                                                    scale, out);
  CUDA_CHECK_LAUNCH("scale_rows_bf16_kernel");
}

void bias_activation(const float* h, int64_t n, int I, bool gated, Activation act,
                     const float* bias, bf16_bits* out, cudaStream_t s) {
  if (n == 0 || I == 0) return;
  bias_activation_kernel<<<grid_for(n * I, kThreads, 8192), kThreads, 0, s>>>(h, n, I, gated, act,
                                                                              bias, out);
  CUDA_CHECK_LAUNCH("bias_activation_kernel");
}

void expert_bias_activation(const float* h, int64_t total, int I, const ExpertGroups& groups,
                            Activation act, float limit, float alpha, const float* bias,
                            bf16_bits* out, cudaStream_t s) {
  if (total == 0) return;
  expert_bias_activation_kernel<<<static_cast<unsigned>(total), kThreads, 0, s>>>(
      h, I, groups, act, limit, alpha, bias, out);
  CUDA_CHECK_LAUNCH("expert_bias_activation_kernel");
}

void expert_add_bias(const float* y, int64_t total, int D, const ExpertGroups& groups,
                     const float* bias, bf16_bits* out, cudaStream_t s) {
  if (total == 0) return;
  expert_add_bias_kernel<<<static_cast<unsigned>(total), kThreads, 0, s>>>(y, D, groups, bias, out);
  CUDA_CHECK_LAUNCH("expert_add_bias_kernel");
}

void sigmoid_gate_rows(float* y, const float* x, int64_t n, int D, const float* w, cudaStream_t s) {
  if (n == 0) return;
  sigmoid_gate_rows_kernel<<<static_cast<unsigned>(n), kThreads, 0, s>>>(y, x, D, w);
  CUDA_CHECK_LAUNCH("sigmoid_gate_rows_kernel");
}

void add_p0_remainder(const float* a, int B, int T, int D, const float* hp, int H, float* out,
                      cudaStream_t s) {
  if (B == 0) return;
  add_p0_remainder_kernel<<<dim3((D + kThreads - 1) / kThreads, B), kThreads, 0, s>>>(a, T, D, hp,
                                                                                      H, out);
  CUDA_CHECK_LAUNCH("add_p0_remainder_kernel");
}

}  // namespace sinkscope::cuda::k
