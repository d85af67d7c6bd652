// The median of docs/metrics.md (numpy's convention: the mean of the two middle values of an even
// count), shared by the backends so every path computes residual medians the same way.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

namespace sinkscope {

// Reorders `v`. NaN for an empty vector.
inline double median_of(std::vector<float>& v) {
  if (v.empty()) return std::nan("");
  const size_t n = v.size(), mid = n / 2;
  std::nth_element(v.begin(), v.begin() + static_cast<long>(mid), v.end());
  const double hi = v[mid];
  if (n % 2 == 1) return hi;
  const double lo = *std::max_element(v.begin(), v.begin() + static_cast<long>(mid));
  return 0.5 * (lo + hi);
}

}  // namespace sinkscope
