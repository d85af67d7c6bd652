// A model for the calibrations (src/plan/calibrate.cpp, src/cuda/calibrate.cpp): written by `synth`
// from a config.json text into a fresh folder under the scratch folder, opened, and removed with
// this object; with a one-rank communicator set to run it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/parallel.hpp"

namespace sinkscope {

// The config.json text of a Qwen3-MoE shape with every layer MoE (the calibrations' models).
struct MoeShape {
  int64_t vocab, hidden, layers, heads, kv_heads, head_dim, experts, top_k, expert_width;
};
std::string moe_config_json(const MoeShape& s);

class ScratchModel {
 public:
  ScratchModel(const std::string& scratch_dir, const std::string& config_json, uint64_t seed);
  ~ScratchModel();
  ScratchModel(const ScratchModel&) = delete;
  ScratchModel& operator=(const ScratchModel&) = delete;

  const Checkpoint& checkpoint() const { return *ck_; }
  ForwardComms comms() const { return {single_.get(), tp_.get(), ep_.get()}; }

 private:
  std::string dir_;
  std::optional<Checkpoint> ck_;
  std::unique_ptr<Comm> single_, tp_, ep_;
};

}  // namespace sinkscope
