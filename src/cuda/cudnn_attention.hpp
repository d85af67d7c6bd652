// cuDNN's fused flash attention as a third kernel behind k::flash_attention (attention.cuh): when
// the build found cuDNN 9 (CMake option SINKSCOPE_CUDNN, docs/gpu-backend.md "Attention"), the
// causal attention of the plain families runs on cuDNN's SDPA forward engine, which returns the
// output and the log-sum-exp of every query's scaled scores; attention.cu then turns the
// log-sum-exp into A[i, 0] = exp(scale q_i . k_0 - lse_i), one dot product per query and head.
// Without cuDNN in the build every function here says "not available" and the hand-written
// kernels run. Host code only (the cuDNN backend API is C); no cuDNN type leaves this header.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "cuda/device_buffer.hpp"

namespace sinkscope::cuda::k {

// One causal attention call in sinkscope's layouts: Q [B*T rows of q_ld], K and V [B*T rows of
// kv_ld] whose first Hk heads (each dqk wide, V's first dv of them) are this call's, z [B*T rows
// of z_ld] receiving Hq heads of dv. Query head h reads KV head h / (Hq / Hk).
struct CudnnAttnShape {
  int B = 0, T = 0, Hq = 0, Hk = 0, dqk = 0, dv = 0;
  int64_t q_ld = 0, kv_ld = 0, z_ld = 0;
};

// Whether this build carries the cuDNN path (found at configure time).
bool cudnn_attention_built();
// The cuDNN library's version (e.g. 91300), 0 without it.
int cudnn_version();
// Whether cuDNN has an engine for this shape on the current device: the plan is built (and kept,
// per stream: each stream has its own handle and workspaces) on the first call for a shape; a
// shape without one is remembered and answered false at once.
bool cudnn_attention_supported(const CudnnAttnShape& shape, cudaStream_t s);
// Runs cuDNN's SDPA forward: z, and lse [B, Hq, T] (natural log of each query's softmax
// denominator of scale * q . k, the running max included). Throws where cuDNN fails at run time;
// call only for a shape cudnn_attention_supported() accepted.
void cudnn_attention(const CudnnAttnShape& shape, const bf16_bits* Q, const bf16_bits* K,
                     const bf16_bits* V, bf16_bits* z, float* lse, float scale, cudaStream_t s);
// Why the last shape was refused (the last cuDNN status and message), for tests and logs.
std::string cudnn_attention_last_refusal();

}  // namespace sinkscope::cuda::k
