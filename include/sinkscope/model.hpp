// The instrumented forward pass on one rank's shard, and the registry of backends that run it.
#pragma once

#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "sinkscope/components.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/hooks.hpp"
#include "sinkscope/ndarray.hpp"
#include "sinkscope/parallel.hpp"
#include "sinkscope/plan.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {

class Checkpoint;
class Comm;

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
  // Called while the weights load: (checkpoint bytes read so far, bytes this rank will read).
  std::function<void(uint64_t, uint64_t)> load_progress;
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
  // Seconds that load took: reading, converting and (CUDA) uploading the shard, without the
  // backend's setup (device context, libraries, scratch): the loader's own rate (--verbose).
  virtual double weight_load_seconds() const = 0;
  // Device memory in use, for --verbose ("; GPU memory: ..."); empty for host backends.
  virtual std::string memory_summary() const { return {}; }
  // The kernels the runs so far took where a backend chooses among several, for --verbose
  // ("; kernels: ..."); empty where there is no choice.
  virtual std::string kernel_summary() const { return {}; }
};

// What a backend is made from. `ckpt` is null for synthetic weights (benchmarks: random weights
// of `cfg`'s shape made on the device, seed `synthetic_seed`).
struct BackendInputs {
  const Checkpoint* ckpt = nullptr;  // must outlive the backend (embeddings are read row by row)
  const ModelConfig* cfg = nullptr;
  const ShardPlan* plan = nullptr;
  ForwardComms comms{};
  ForwardOptions options;
  int64_t synthetic_seed = -1;
};

// The backend registry: `--device NAME` picks an entry. Each backend built into this binary
// registers itself (src/pipeline/backends.cpp lists them from the build configuration).
struct BackendEntry {
  std::string name;     // "cpu", "cuda"
  std::string summary;  // one line for --help
  // Throws InputError with a one-line reason when this backend cannot run the model or options
  // (checked up front, before any weight is read).
  std::function<void(const ModelConfig&, const ShardPlan&, bool synthetic)> check;
  std::function<std::unique_ptr<Backend>(const BackendInputs&)> make;
  // Optional: starts, on a thread of its own, the setup that needs no model (CUDA: creating the
  // context of the device that the rank with index `local_rank` among its node's ranks will use),
  // so that it overlaps opening the checkpoint and planning. make() is called after the returned
  // future is ready; errors are left to make() to report.
  std::function<std::future<void>(int local_rank)> prepare;
  // `sinkscope plan --calibrate`: the cost model's coefficients measured with this backend's
  // kernels (threads per rank, a folder for scratch files, the ranks taking part).
  std::function<PlanCoefficients(int threads, const std::string& scratch_dir, const Comm& world)>
      calibrate;
};
void register_backend(BackendEntry entry);
// The entry named `name`; throws InputError naming `--device` and the built-in backends.
const BackendEntry& find_backend(const std::string& name);
std::vector<std::string> backend_names();

// CPU backend: fp32 compute, OpenBLAS sgemm for every matrix product, every supported family.
// Loads only the slices of the plan from the checkpoint.
std::unique_ptr<Backend> make_cpu_backend(const BackendInputs& in);
std::unique_ptr<Backend> make_cpu_backend(const Checkpoint& ckpt, const ShardPlan& plan,
                                          ForwardComms comms, ForwardOptions options);
BackendEntry cpu_backend_entry();

}  // namespace sinkscope
