// Progress on long work: a live bar on a terminal, periodic plain lines otherwise (Slurm logs).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace sinkscope {

class Progress {
 public:
  // `label` prefixes each line; plain lines are printed at most every `period` seconds.
  Progress(std::string label, bool enabled, double period_s = 10.0);
  void update(int64_t done, int64_t total);
  void finish();

 private:
  std::string label_;
  bool enabled_, tty_;
  double period_s_;
  std::chrono::steady_clock::time_point start_, last_;
  bool printed_ = false;
};

}  // namespace sinkscope
