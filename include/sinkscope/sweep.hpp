// Checkpoint sweeps (docs/metrics.md section 6, docs/schema.md "Sweep folder").
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sinkscope/analyze.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/io.hpp"

namespace sinkscope {

struct SweepCheckpoint {
  std::string dir;   // checkpoint folder
  std::string name;  // file stem under OUTDIR/checkpoints/
  int64_t step = -1;
};

// Step from a folder name: step<N>, iter_<N>, checkpoint-<N> (also with separators); -1 if none.
// Throws InputError naming the folder when the number does not fit int64.
int64_t step_from_name(const std::string& folder);

// The checkpoints of --models / --models-glob (sorted by step, then name), with --steps applied
// when given. Throws InputError for an empty list, duplicate names, a --steps length mismatch, or
// a folder without a step in its name when --steps is not given.
std::vector<SweepCheckpoint> list_checkpoints(const std::vector<std::string>& models,
                                              const std::string& glob,
                                              const std::vector<int64_t>& steps);

// True when `path` is a complete analysis file for these tokens and this model shape: it reads back
// whole in a child process (HDF5 may crash on a damaged file; this process never does), carries a
// content checksum (content_sha256) that matches, and its bounded quantities lie in their ranges.
// Otherwise false, with the reason in *why ("missing", "damaged (...)", ...).
bool analysis_file_matches(const std::string& path, const std::string& tokens_sha256,
                           const ModelConfig& cfg, std::string* why);

// Contract 1.2 convergence (docs/metrics.md "Scientific validity"): one of the outcomes
// "converged at step S", "not converged", "no sink", "too few checkpoints".
struct ConvergenceInput {
  std::vector<std::vector<float>> profiles;  // [C][L+1], in step order
  std::vector<int64_t> steps;                // [C]
  std::vector<bool> has_sink;                // [C]: max sink score > eps
  std::vector<double> noise_floor;           // [C]: 0 where unknown
  double tau = 0.05;
};
struct ConvergenceResult {
  std::vector<float> distance, distance_per_doubling, threshold;  // [C-1]
  std::vector<int32_t> still;                                     // [C-1]
  std::string outcome;
  int64_t step = -1;  // S when converged, else -1
};
ConvergenceResult assess_convergence(const ConvergenceInput& in);

struct SweepOptions {
  double tau = 0.05;
  int64_t bootstrap = 200;  // replicates; 0 = no bootstrap (noise floor 0)
  int64_t bootstrap_seed = 0;
  std::string convergence_profile = "causal";  // or "attribution"
};

// Builds sweep.h5 contents from the analysis files that exist; missing or invalid ones (each
// read first in a child process) are listed in `failed`. Throws InputError when files disagree on
// probes (length or tokens).
Sweep assemble_sweep(const std::vector<SweepCheckpoint>& cps, const std::string& outdir,
                     const SweepOptions& opt);
inline Sweep assemble_sweep(const std::vector<SweepCheckpoint>& cps, const std::string& outdir,
                            double tau) {
  SweepOptions opt;
  opt.tau = tau;
  return assemble_sweep(cps, outdir, opt);
}

// Reads a checkpoint folder's safetensors files into the page cache on a background thread
// (posix_fadvise WILLNEED, then pread into a small buffer), so that the next checkpoint of a sweep
// is read from disk while the current one is analysed. At most `budget_bytes` per folder are read
// (0: nothing). Where several ranks share a host (OMPI/Slurm local rank variables), each reads its
// share of the chunks, and the budget is the host's.
class Prefetcher {
 public:
  explicit Prefetcher(uint64_t budget_bytes);
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;
  ~Prefetcher();  // stops the reading
  // Stops any reading under way, then starts reading `dir`'s files.
  void start(const std::string& dir);
  // Waits for the reading under way (if any) to end.
  void wait();
  struct Stats {
    uint64_t bytes = 0;             // read by this rank for the last folder
    double seconds = 0;             // its reading time
    double started = 0, ended = 0;  // steady-clock seconds
  };
  Stats last();  // of the last start(), after wait()

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// min(16 GiB, a quarter of MemAvailable): the default --prefetch-gb.
uint64_t default_prefetch_bytes();
// The safetensors files of a checkpoint folder (the index's shards, or model.safetensors).
std::vector<std::string> safetensors_files(const std::string& dir);

}  // namespace sinkscope
