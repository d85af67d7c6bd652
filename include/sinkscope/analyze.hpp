// One checkpoint, end to end: load this rank's shard, run the probes, record, reduce, profile,
// ablate. The `analyze` and `sweep` commands and the tests all go through here.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "sinkscope/analysis.hpp"
#include "sinkscope/ndarray.hpp"

namespace sinkscope {

class Comm;
struct NodeMap;

struct AnalyzeOptions {
  std::string model;  // checkpoint folder
  // Benchmarks only (--model-config FILE --synthetic-weights SEED, --device cuda): random weights
  // of that shape built on the device instead of a checkpoint. synthetic_seed < 0: off.
  std::string model_config;
  int64_t synthetic_seed = -1;
  std::string tokens_source = "tokens";  // the token file or --probes spec, named in errors
  int tp = 1, ep = 1;
  int etp = 0;  // expert tensor parallelism; 0 = default (tp where it fits, cpu)
  // Placement over nodes (include/sinkscope/placement.hpp): "any", "inside" or "across", and
  // whether a tp group may span nodes. `nodes`: the job's node map when the caller already has
  // it (a sweep discovers it once); null: analyze_checkpoint discovers it.
  std::string ep_placement = "any";
  bool allow_tp_across_nodes = false;
  const NodeMap* nodes = nullptr;
  std::string device = "cpu";
  double eps = 0.3;
  bool per_query = false;
  std::string ablate;  // "", "layers=A-B", "top=K" or "search[:K]"
  // Contract 1.2: profile/causal_* (one forward per layer and part, docs/metrics.md).
  bool causal_profile = false;
  double search_share = 0.9;  // --ablate search: the share of the drop the reported set reaches
  int64_t batch = 4;          // probes per micro-batch
  int threads = 1;
  bool verbose = false;
  bool log_layout = false;  // rank 0 prints the shard plan's one-line description at start
  int64_t step = -1;        // training step, -1 when unknown
  // Provenance written into the file as given (docs/schema.md "Provenance").
  std::string command_line;  // the command as run
  std::string options;       // every option of the subcommand with its value
  int64_t prepend_bos = -1;  // --prepend-bos (already applied to the tokens), -1 when off
  // Called on rank 0 after each micro-batch: (probes done, probes total).
  std::function<void(int64_t, int64_t)> progress;
  // Called on rank 0 before each ablated component (--ablate): (index from 1, count, component
  // as "layer L head H" / "layer L expert E" / "embedding" / "layer L dense MLP").
  std::function<void(int64_t, int64_t, const std::string&)> ablation_progress;
  // Called on every rank while its weights load: (bytes read, bytes this rank reads).
  std::function<void(uint64_t, uint64_t)> load_progress;
  // Called on every rank once its weights are loaded, before the first forward pass (sweeps start
  // reading the next checkpoint here).
  std::function<void()> on_loaded;
  // Where given, filled with this rank's wall times: opening and loading the checkpoint (read),
  // and everything after (compute: forward passes, ablations, reduction).
  struct Timings {
    double read_seconds = 0, compute_seconds = 0;
    uint64_t bytes_read = 0;
    double weight_load_seconds = 0;  // the backend's weight load alone (part of read_seconds)
  }* timings = nullptr;
};

// Every rank calls this with the same tokens. Returns the complete analysis on rank 0 (other
// ranks get their meta only). Throws InputError for bad input (after every rank agreed on it) and
// RuntimeFailure for failures while running.
Analysis analyze_checkpoint(const AnalyzeOptions& opt, const IntArray& tokens, const Comm& world);

// Parses --ablate. Throws InputError naming the option.
struct AblateSpec {
  enum Kind { kNone, kLayers, kTop, kSearch } kind = kNone;
  int64_t first = 0, last = 0, top = 0;  // search: top = most indices opened, 0 = no limit
};
AblateSpec parse_ablate(const std::string& spec, int64_t num_layers);

std::string utc_now_iso8601();

// Runs `fn` on every rank; when it throws on any rank, every rank throws the error of the lowest
// failed rank (InputError marked `agreed`), so bad input exits 1 everywhere and no rank waits.
void run_agreed(const Comm& world, const std::function<void()>& fn);

}  // namespace sinkscope
