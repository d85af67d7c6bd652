// Checkpoint sweeps (METRICS.md section 6, INTERFACE.md "Sweep folder").
#pragma once

#include <cstdint>
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
// when given. Throws InputError for an empty list, duplicate names or a --steps length mismatch.
std::vector<SweepCheckpoint> list_checkpoints(const std::vector<std::string>& models,
                                              const std::string& glob,
                                              const std::vector<int64_t>& steps);

// True when `path` is a complete analysis file for these tokens and this model shape: it reads back
// whole in a child process (HDF5 may crash on a damaged file; this process never does), carries a
// content checksum (content_sha256) that matches, and its bounded quantities lie in their ranges.
// Otherwise false, with the reason in *why ("missing", "damaged (...)", ...).
bool analysis_file_matches(const std::string& path, const std::string& tokens_sha256,
                           const ModelConfig& cfg, std::string* why);

// Builds sweep.h5 contents from the analysis files that exist; missing or invalid ones (each
// read first in a child process) are listed in `failed`. Throws InputError when files disagree on
// probes (length or tokens).
Sweep assemble_sweep(const std::vector<SweepCheckpoint>& cps, const std::string& outdir,
                     double tau);

}  // namespace sinkscope
