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

// Loads this rank's shard of `ckpt` (which must outlive the backend: embeddings are read row by row)
// as bf16 onto the GPU of this rank (local rank modulo the visible devices). Throws RuntimeFailure
// when no GPU is visible and InputError for shapes the kernels do not take (head_dim > 128 or odd).
std::unique_ptr<Backend> make_cuda_backend(const Checkpoint& ckpt, const ShardPlan& plan, ForwardComms comms,
                                           ForwardOptions options);

// FOR BENCHMARKS ONLY: a backend with random bf16 weights of cfg's shape made directly on the device
// (no checkpoint, nothing read from disk; the same seed and shape give the same weights under any
// layout). Tokens embed from a random table. Its numbers measure speed and memory, nothing else.
std::unique_ptr<Backend> make_cuda_backend_synthetic(const ModelConfig& cfg, const ShardPlan& plan,
                                                     ForwardComms comms, ForwardOptions options, uint64_t seed);

namespace cuda {

// Visible CUDA devices (0 when there is no driver or no device). Never throws.
int visible_device_count();

// Controls and readings for tests and benchmarks, on a backend made by the functions above
// (RuntimeFailure for any other backend).
struct RunProfile {
  int64_t layers = 0;
  double attention_ms = 0;      // device time: input norm .. o_proj and the head bookkeeping (+ circuit)
  double attention_tap_ms = 0;  // copying the attention tap back and the observer
  double moe_ms = 0;            // post norm .. x += m (routing round trip to the host included)
  double mlp_tap_ms = 0;        // MoE tap copy + observer
  double residual_tap_ms = 0;   // residual norms, medians, observer
};
struct MemoryReport {
  uint64_t weight_bytes = 0;    // device bytes of the model shard
  uint64_t held_bytes = 0;      // device bytes held by the backend now (weights + scratch)
  uint64_t device_used = 0;     // cudaMemGetInfo: total - free (every process and library on the GPU)
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
