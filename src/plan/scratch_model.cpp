#include "plan/scratch_model.hpp"

#include <unistd.h>

#include <atomic>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "sinkscope/config.hpp"
#include "sinkscope/synth.hpp"

namespace sinkscope {

std::string moe_config_json(const MoeShape& s) {
  return nlohmann::json{{"model_type", "qwen3_moe"},
                        {"architectures", {"Qwen3MoeForCausalLM"}},
                        {"vocab_size", s.vocab},
                        {"hidden_size", s.hidden},
                        {"num_hidden_layers", s.layers},
                        {"num_attention_heads", s.heads},
                        {"num_key_value_heads", s.kv_heads},
                        {"head_dim", s.head_dim},
                        {"intermediate_size", 3 * s.hidden},
                        {"moe_intermediate_size", s.expert_width},
                        {"num_experts", s.experts},
                        {"num_experts_per_tok", s.top_k},
                        {"rope_theta", 1e6},
                        {"rms_norm_eps", 1e-6},
                        {"torch_dtype", "bfloat16"}}
      .dump();
}

ScratchModel::ScratchModel(const std::string& scratch_dir, const std::string& config_json,
                           uint64_t seed) {
  static std::atomic<int> serial{0};
  dir_ = scratch_dir + "/sinkscope-calibrate-" + std::to_string(::getpid()) + "-" +
         std::to_string(serial++);
  try {
    synthesize(parse_model_config_text(config_json, "the calibration model"), dir_, false, seed);
    ck_.emplace(Checkpoint::open(dir_));
  } catch (...) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
    throw;
  }
  single_ = make_single_comm();
  tp_ = single_->split(0, 0);
  ep_ = single_->split(0, 0);
}

ScratchModel::~ScratchModel() {
  ck_.reset();
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

}  // namespace sinkscope
