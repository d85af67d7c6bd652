// HDF5 files of docs/schema.md: the analysis file and sweep.h5. Free of HDF5 types.
// Writers commit atomically: write to a hidden temporary ".<name>.<8 random>.tmp" next to <path>
// (<name> cut so that it fits NAME_MAX), flush + fsync, rename over <path>; on any failure the
// temporary is removed and nothing is left at <path>.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "sinkscope/analysis.hpp"

namespace sinkscope {

// Writes every dataset of docs/schema.md that `a` holds (optional ones only when non-empty), with
// the root attributes and a `dims` attribute on each dataset. Throws InputError when the folder
// of `path` is missing or not writable, RuntimeFailure on an HDF5 failure (message carries HDF5's
// own error stack, first line).
void write_analysis(const std::string& path, const Analysis& a);

// Reads an analysis file back (all datasets present). Throws InputError naming the file and the
// missing/bad dataset or attribute when the file is damaged or not an analysis file.
Analysis read_analysis(const std::string& path);

// Token file in HDF5: dataset /tokens, integer [N, T]. Throws InputError naming the file.
IntArray read_tokens_h5(const std::string& path);

// sweep.h5 (docs/schema.md "Sweep folder").
struct Sweep {
  std::vector<int64_t> steps;      // [C]
  std::vector<std::string> names;  // [C]
  FloatArray sink_rate;            // [C, L]
  FloatArray sink_score;           // [C, L, H]
  FloatArray h_ratio;              // [C, L+1]
  FloatArray layer_share;          // [C, L+1]
  FloatArray first2_share;         // [C]
  FloatArray norm_gain_share;      // [C, L]
  FloatArray convergence_tv;       // [C-1]
  int64_t convergence_step = -1;
  double tau = 0.05;
  std::vector<std::string> failed;  // checkpoints that had no valid analysis file (attribute)
  // Provenance (format version 2): per checkpoint [C], from its analysis file ...
  std::vector<std::string> checkpoint_paths;           // the model folder as given
  std::vector<std::string> checkpoint_headers_sha256;  // Checkpoint::headers_sha256()
  // ... and of the whole sweep (root attributes).
  std::string tokens_sha256;
  double eps = 0;
  int64_t format_version = 0;  // the writer stamps kFormatVersion when 0
  std::string git_commit, command_line, options;

  // Contract 1.2 (docs/metrics.md "Scientific validity"). Empty arrays are not written.
  FloatArray max_sink_score;       // [C]
  FloatArray causal_layer_share;   // [C, L+1]; empty unless every checkpoint has the profile
  FloatArray causal_first2_share;  // [C]
  // Bootstrap over probes: for each per-checkpoint quantity `name` (shape [C, ...]), the standard
  // error (same shape) and the 95% percentile interval (shape [C, ..., 2]).
  struct Interval {
    std::string name;
    FloatArray se, ci95;
  };
  std::vector<Interval> bootstrap;
  int64_t bootstrap_replicates = 0;
  int64_t bootstrap_seed = 0;
  FloatArray noise_floor;           // [C]: 95th percentile of the distance between two replicates
  std::string convergence_profile;  // "causal" or "attribution"
  FloatArray convergence_distance;  // [C-1] TV of that profile
  FloatArray convergence_distance_per_doubling;  // [C-1]
  FloatArray convergence_threshold;              // [C-1] on the TV scale
  IntArray convergence_still;                    // [C-1] 1 = distance <= threshold
  std::string convergence_outcome;               // "converged at step S", "not converged", ...
  int64_t converged_step = -1;                   // S of "converged at step S", else -1
};

void write_sweep(const std::string& path, const Sweep& s);
Sweep read_sweep(const std::string& path);

// Atomic commit helper used by the writers, exposed for other outputs (reports).
// Checks `path` (check_output_path), calls `fill(tmp_path)`, then fsyncs and renames tmp_path
// over `path`. Throws InputError when the output cannot be written there.
void commit_atomically(const std::string& path,
                       const std::function<void(const std::string& tmp_path)>& fill);

// Throws InputError "<prefix><path>: ..." unless a file can be committed at `path`: its folder
// exists and is writable, its name fits the filesystem (NAME_MAX, PATH_MAX), and nothing but a
// regular file is there (a folder, FIFO or device node is refused, never replaced). Returns the
// folder. For checking outputs before any work.
std::string check_output_path(const std::string& path, const std::string& prefix = "cannot write ");

}  // namespace sinkscope
