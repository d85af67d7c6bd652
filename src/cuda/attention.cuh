// Host launchers of attention.cu (see kernels.cuh for the conventions shared by every launcher:
// plain pointers, bf16 as bf16_bits, stream order, empty sizes do nothing, launch errors throw).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/device_buffer.hpp"

namespace sinkscope::cuda::k {

// Whether this build carries sm_90a code (wgmma) for the current device (compute capability 9.0):
// probed once per device.
bool sm90a_kernels_available();

// Causal attention of B probes x Hl local heads over T positions, flash style (online softmax in
// fp32, bf16 tensor-core products, T x T never stored). Q [B*T, Hl, dp], K/V [B*T, KVl, dp] bf16;
// local head h reads held KV head (head_begin + h) / group - kv_begin. Writes z [B*T, Hl * d] bf16
// (dims < d: d is the value width, which may be below the query/key width) and a0 [B, Hl, T] =
// exp(q_i . k_0 * scale - lse_i). dp is a multiple of 16, <= 128, or 192.
// Two kernels keep this contract: mma.sync (any dp; every GPU this build targets) and, for dp 64
// and 128 on an sm_90a build running on compute capability 9.0, warpgroup products (wgmma), which
// need vt_scratch of flash_attention_scratch() elements. kAuto takes wgmma where it can run and
// vt_scratch is given, unless SINKSCOPE_ATTN_WGMMA=0; asking for kWgmma where it cannot run throws.
// A third route, kCudnn, runs cuDNN's fused attention (cudnn_attention.hpp) where the build has
// cuDNN and the call is plain causal attention (no window, no learned sinks) of a shape cuDNN has
// an engine for; kAuto tries it first unless SINKSCOPE_ATTN_CUDNN=0, and asking for kCudnn where it
// does not apply throws.
enum class AttnKernel { kAuto, kMmaSync, kWgmma, kCudnn };
// gpt-oss (docs/metrics.md 1.4): a sliding window (query i sees keys j with i - window < j <= i;
// 0: every j <= i; A[i, 0] = 0 where key 0 is outside) and a learned sink logit per local head
// (sinks [Hl], in the units of the scaled scores; null: none) that joins every query's softmax
// denominator and is then dropped; sink_mass [B, Hl, T] (optional, with sinks) receives its weight.
struct AttnSinks {
  int window = 0;
  const float* sinks = nullptr;
  float* sink_mass = nullptr;
};
bool flash_attention_wgmma_available(int dp);
// The routes flash_attention() has taken in this process so far, e.g. "cuDNN 9.14.0 (fused), wgmma"
// ("none yet" before the first call).
std::string attention_kernels_used();
int64_t flash_attention_scratch(int B, int T, int KVl, int dp);
void flash_attention(const bf16_bits* Q, const bf16_bits* K, const bf16_bits* V, bf16_bits* z,
                     float* a0, int B, int T, int Hl, int KVl, int d, int dp, int head_begin,
                     int group, int kv_begin, float scale, bf16_bits* vt_scratch, cudaStream_t s,
                     AttnKernel kernel = AttnKernel::kAuto, const AttnSinks& extras = {});

}  // namespace sinkscope::cuda::k
