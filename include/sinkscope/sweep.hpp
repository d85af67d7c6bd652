// Checkpoint sweeps (docs/metrics.md section 6, docs/schema.md "Sweep folder").
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
int64_t step_from_name(const std::string& folder);

// The checkpoints of --models / --models-glob (sorted by step, then name), with --steps applied
// when given. Throws InputError for an empty list, duplicate names, a --steps length mismatch, or
// a folder without a step in its name when --steps is not given.
std::vector<SweepCheckpoint> list_checkpoints(const std::vector<std::string>& models,
                                              const std::string& glob,
                                              const std::vector<int64_t>& steps);

// True when `path` is a complete analysis file for these tokens and this model shape.
bool analysis_file_matches(const std::string& path, const std::string& tokens_sha256,
                           const ModelConfig& cfg, std::string* why);

// Builds sweep.h5 contents from the analysis files that exist; missing or invalid ones are listed
// in `failed`. Throws InputError when files disagree on probes (length or tokens).
Sweep assemble_sweep(const std::vector<SweepCheckpoint>& cps, const std::string& outdir,
                     double tau);

}  // namespace sinkscope
