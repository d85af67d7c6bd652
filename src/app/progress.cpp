#include "app/progress.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace sinkscope {

Progress::Progress(std::string label, bool enabled, double period_s)
    : label_(std::move(label)),
      enabled_(enabled),
      tty_(isatty(STDERR_FILENO) == 1),
      period_s_(period_s),
      start_(std::chrono::steady_clock::now()),
      last_(start_) {}

void Progress::update(int64_t done, int64_t total) {
  if (!enabled_ || total <= 0) return;
  const auto now = std::chrono::steady_clock::now();
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  const double since = std::chrono::duration<double>(now - last_).count();
  const bool last = done >= total;
  if (!tty_ && !last && since < period_s_ && printed_) return;
  last_ = now;
  printed_ = true;
  const double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0;
  const double eta = rate > 0 ? static_cast<double>(total - done) / rate : 0;
  if (tty_) {
    const int width = 30, fill = static_cast<int>(width * done / total);
    std::fprintf(stderr, "\r%s [%.*s%*s] %lld/%lld probes  %.2f probes/s  %.0fs left ",
                 label_.c_str(), fill, "##############################", width - fill, "",
                 static_cast<long long>(done), static_cast<long long>(total), rate, eta);
    if (last) std::fprintf(stderr, "\n");
  } else {
    std::fprintf(stderr, "%s: %lld/%lld probes, %.2f probes/s, %.0f s elapsed, %.0f s left\n",
                 label_.c_str(), static_cast<long long>(done), static_cast<long long>(total), rate,
                 elapsed, eta);
  }
  std::fflush(stderr);
}

void Progress::update_bytes(uint64_t done, uint64_t total) {
  if (!enabled_ || !tty_ || total == 0) return;
  const auto now = std::chrono::steady_clock::now();
  const bool last = done >= total;
  // At most 10 redraws a second.
  if (!last && printed_ && std::chrono::duration<double>(now - last_).count() < 0.1) return;
  last_ = now;
  printed_ = true;
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  const double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0;
  const double eta = rate > 0 ? static_cast<double>(total - std::min(done, total)) / rate : 0;
  const int width = 30, fill = static_cast<int>(width * std::min(done, total) / total);
  std::fprintf(stderr, "\r%s [%.*s%*s] %.2f/%.2f GB  %.2f GB/s  %.0fs left ", label_.c_str(), fill,
               "##############################", width - fill, "", static_cast<double>(done) / 1e9,
               static_cast<double>(total) / 1e9, rate / 1e9, eta);
  if (last) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

void Progress::finish() {
  if (enabled_ && tty_ && printed_) std::fflush(stderr);
}

}  // namespace sinkscope
