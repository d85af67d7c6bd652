// The instrumented forward pass of the Qwen3-MoE family on one rank's shard.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sinkscope/config.hpp"
#include "sinkscope/hooks.hpp"
#include "sinkscope/ndarray.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {

class Checkpoint;
class Comm;

// Mean-ablation at position zero (docs/metrics.md section 4, causal version): the component's write at
// position 0 is replaced by its mean write over positions 1..T-1, per probe.
struct Ablation {
  enum Kind : int32_t { kHead = 0, kExpert = 1, kEmbedding = 2, kMlp = 3 };
  int32_t layer = 0;
  Kind kind = kHead;
  int32_t index = 0;
};

// Whether `ablations` mean-ablates component `index` of `kind` in `layer`.
inline bool has_ablation(const std::vector<Ablation>& ablations, int64_t layer, Ablation::Kind kind,
                         int64_t index) {
  for (const auto& a : ablations)
    if (a.layer == layer && a.kind == kind && a.index == index) return true;
  return false;
}

// The one-line error of a backend that meets a non-finite activation: the layer, the component,
// the probe and the model it ran (`where`), then `suffix` (e.g. " (cuda)").
inline std::string non_finite_message(int64_t layer, const char* component, int64_t probe,
                                      const std::string& where, const char* suffix = "") {
  return "non-finite activation in layer " + std::to_string(layer) + " (" + component +
         ") of probe " + std::to_string(probe) + " in " + where + suffix;
}

struct ForwardOptions {
  int threads = 1;
  bool want_logits = false;         // final norm + lm_head (tests compare logits with golden)
  std::vector<Ablation> ablations;  // applied to every probe of the run
};

// Communicators the forward pass uses: the tp group (ranks of a dp group), the ep group, and the
// world (for the micro-batch count agreement). Single-process runs pass single comms.
struct ForwardComms {
  const Comm* world;
  const Comm* tp_group;
  const Comm* ep_group;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // Runs `tokens` ([B, T], B may be 0 on ranks with no probes left: they still take part in the
  // collectives) through the model, calling `observer` at every hook point. `probe0` is the
  // global index of the first probe. Returns logits [B, T, V] when options.want_logits.
  virtual FloatArray run(const IntArray& tokens, int64_t probe0, ForwardObserver& observer) = 0;
  // Replaces the mean-ablations applied by the following runs (docs/metrics.md section 4).
  virtual void set_ablations(std::vector<Ablation> ablations) = 0;
  // Seconds this rank spent inside collectives (tp all-reduces, the expert exchange) since it was
  // made: the communication share of a run (benchmarks, --verbose).
  virtual double communication_seconds() const = 0;
  // Bytes of checkpoint data this rank converted when loading its shard.
  virtual uint64_t weight_bytes_loaded() const = 0;
};

// CPU backend: fp32 compute, OpenBLAS sgemm for every matrix product. Loads only the slices of
// `plan` from `ckpt` (which must outlive the backend: embeddings are read row by row).
std::unique_ptr<Backend> make_cpu_backend(const Checkpoint& ckpt, const ShardPlan& plan,
                                          ForwardComms comms, ForwardOptions options);

}  // namespace sinkscope
