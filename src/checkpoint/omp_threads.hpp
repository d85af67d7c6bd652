// OpenMP's thread count for the checkpoint's parallel conversions; 1 in builds without OpenMP
// (the fuzzers compile the parsers with plain clang).
#pragma once

#include <algorithm>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace sinkscope {

inline int max_threads() {
#ifdef _OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

}  // namespace sinkscope
