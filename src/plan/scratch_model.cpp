#include "plan/scratch_model.hpp"

#include <unistd.h>

#include <atomic>
#include <filesystem>

#include "sinkscope/config.hpp"
#include "sinkscope/synth.hpp"

namespace sinkscope {

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
