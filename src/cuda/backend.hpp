// The CUDA backend (`--device cuda`, docs/gpu-backend.md): the instrumented Qwen3-MoE forward pass
// of src/cpu/backend.cpp on one GPU per rank, with the position-zero recording done on the device
// and only the small tap arrays copied back to the host. No CUDA types in this header.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
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
  double qkv_ms = 0;            // input norm, qkv product, q/k norm + RoPE (+ qbar when recording)
  double circuit_ms = 0;        // circuit attribution (recording only)
  double flash_ms = 0;          // fused attention
  double head_record_ms = 0;    // head write norms (Gram products), heads' position-0 vectors
  double attn_rest_ms = 0;      // o_proj, tp all-reduce, component bookkeeping
  double attention_tap_ms = 0;  // attention tap: A[i, 0] means, copies to the host
  double route_ms = 0;          // post norm, router, top-k, expert counts to the host, sort
  double experts_ms = 0;        // gather (+ ep exchange) + expert products + SwiGLU (dense MLP)
  double combine_ms = 0;        // weighted combine of the k expert outputs per token
  double moe_record_ms = 0;     // per-expert position-0 writes and rest sums, routing counts
  double moe_finish_ms = 0;     // tp all-reduce, component bookkeeping, norms of m, x += m
  double mlp_tap_ms = 0;        // MoE tap copies to the host
  double residual_tap_ms = 0;   // residual norms, |x| median (probe 0), copies to the host
  // The host side of the taps (observer calls) overlaps later device work and is in no phase.

  // The phases in stream order with short names (the benchmark's columns).
  struct Phase {
    const char* name;
    double RunProfile::*ms;
  };
  static constexpr std::array<Phase, 13> phases() {
    return {{{"qkv", &RunProfile::qkv_ms},
             {"circuit", &RunProfile::circuit_ms},
             {"flash", &RunProfile::flash_ms},
             {"head_rec", &RunProfile::head_record_ms},
             {"attn_rest", &RunProfile::attn_rest_ms},
             {"attn_tap", &RunProfile::attention_tap_ms},
             {"route", &RunProfile::route_ms},
             {"experts", &RunProfile::experts_ms},
             {"combine", &RunProfile::combine_ms},
             {"moe_rec", &RunProfile::moe_record_ms},
             {"moe_fin", &RunProfile::moe_finish_ms},
             {"mlp_tap", &RunProfile::mlp_tap_ms},
             {"res_tap", &RunProfile::residual_tap_ms}}};
  }
  RunProfile& operator+=(const RunProfile& o) {
    layers = o.layers;
    for (const Phase& p : phases()) this->*p.ms += o.*p.ms;
    return *this;
  }
  double attention_ms() const {
    return qkv_ms + circuit_ms + flash_ms + head_record_ms + attn_rest_ms;
  }
  double moe_ms() const {
    return route_ms + experts_ms + combine_ms + moe_record_ms + moe_finish_ms;
  }
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
// less than 1e-2), the tokens routed, and how the expert products run.
std::vector<int64_t> near_tie_counts(const Backend& backend);
int64_t routed_tokens(const Backend& backend);
std::string expert_gemm_strategy(const Backend& backend);

}  // namespace cuda
}  // namespace sinkscope
