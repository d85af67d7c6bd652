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
  // Loading: a live line of bytes, GB/s and time left, on a terminal only (no plain lines: the
  // load of a rank is one step of the log already).
  void update_bytes(uint64_t done, uint64_t total);
  bool tty() const { return tty_; }

 private:
  std::string label_;
  bool enabled_, tty_;
  double period_s_;
  std::chrono::steady_clock::time_point start_, last_;
  bool printed_ = false;
};

}  // namespace sinkscope
