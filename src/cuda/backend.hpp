// The CUDA backend (`--device cuda`, docs/gpu-backend.md): the instrumented Qwen3-MoE forward pass
// of forward.cpp on one GPU per rank, with the position-zero recording done on the device and only
// the small tap arrays copied back to the host. No CUDA types in this header.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "sinkscope/config.hpp"
#include "sinkscope/model.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {

class Checkpoint;

// Loads this rank's shard of `ckpt` (which must outlive the backend: embeddings are read row by
// row) as bf16 onto the GPU of this rank (local rank modulo the visible devices). Throws
// RuntimeFailure when no GPU is visible and InputError for shapes the kernels do not take (head_dim
// > 128 or odd).
std::unique_ptr<Backend> make_cuda_backend(const Checkpoint& ckpt, const ShardPlan& plan,
                                           ForwardComms comms, ForwardOptions options);

// FOR BENCHMARKS ONLY: a backend with random bf16 weights of cfg's shape made directly on the
// device (no checkpoint, nothing read from disk; the same seed and shape give the same weights
// under any layout). Tokens embed from a random table. Its numbers measure speed and memory,
// nothing else.
std::unique_ptr<Backend> make_cuda_backend_synthetic(const ModelConfig& cfg, const ShardPlan& plan,
                                                     ForwardComms comms, ForwardOptions options,
                                                     uint64_t seed);

namespace cuda {

// Visible CUDA devices (0 when there is no driver or no device). Never throws.
int visible_device_count();

// Controls and readings for tests and benchmarks, on a backend made by the functions above
// (RuntimeFailure for any other backend).
struct RunProfile {
  int64_t layers = 0;
  // Device time (CUDA events) summed over the layers of the last run, phase by phase.
  double qkv_ms = 0;      // input norm, qkv product, q/k norm + RoPE (+ qbar when recording)
  double circuit_ms = 0;  // circuit attribution (recording only)
  double flash_ms = 0;    // fused attention
  double attn_rest_ms =
      0;  // head write norms / vectors, o_proj, tp all-reduce, component bookkeeping
  double attention_tap_ms = 0;  // attention tap copy + observer
  double route_ms = 0;          // post norm, router, top-k, routing round trip to the host
  double experts_ms = 0;        // gather + expert products + SwiGLU (dense MLP on dense layers)
  double combine_ms = 0;        // combine, per-expert position-0 sums, tp all-reduce, x += m
  double mlp_tap_ms = 0;        // MoE tap copy + observer
  double residual_tap_ms = 0;   // residual norms, medians, observer
  double attention_ms() const { return qkv_ms + circuit_ms + flash_ms + attn_rest_ms; }
  double moe_ms() const { return route_ms + experts_ms + combine_ms; }
  double taps_ms() const { return attention_tap_ms + mlp_tap_ms + residual_tap_ms; }
};
struct MemoryReport {
  uint64_t weight_bytes = 0;  // device bytes of the model shard
  uint64_t held_bytes = 0;    // device bytes held by the backend now (weights + scratch)
  uint64_t device_used = 0;   // cudaMemGetInfo: total - free (every process and library on the GPU)
  uint64_t device_total = 0;
};
// false: the plain forward (no recording kernels, no copies, no observer calls; ablations refused).
void set_recording(Backend& backend, bool record);
// Per-phase device timing of the following runs (CUDA events; adds no synchronisation).
void set_phase_timing(Backend& backend, bool on);
RunProfile last_run_profile(const Backend& backend);
MemoryReport memory_report(const Backend& backend);
// Per layer: router near-ties seen so far (tokens whose k-th and (k+1)-th probabilities differ by
// less than 1e-3), the tokens routed, and whether the grouped expert GEMM was used.
std::vector<int64_t> near_tie_counts(const Backend& backend);
int64_t routed_tokens(const Backend& backend);
bool grouped_gemm_used(const Backend& backend);

}  // namespace cuda
}  // namespace sinkscope
