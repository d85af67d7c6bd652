// HDF5 files of INTERFACE.md: the analysis file and sweep.h5. Free of HDF5 types.
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

// Writes every dataset of INTERFACE.md that `a` holds (optional ones only when non-empty), with
// the root attributes and a `dims` attribute on each dataset. Throws InputError when the folder
// of `path` is missing or not writable, RuntimeFailure on an HDF5 failure (message carries HDF5's
// own error stack, first line).
void write_analysis(const std::string& path, const Analysis& a);

// Reads an analysis file back (all datasets present). Throws InputError naming the file and the
// missing/bad dataset or attribute when the file is damaged or not an analysis file.
Analysis read_analysis(const std::string& path);

// Token file in HDF5: dataset /tokens, integer [N, T]. Throws InputError naming the file.
IntArray read_tokens_h5(const std::string& path);

// sweep.h5 (INTERFACE.md "Sweep folder").
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
