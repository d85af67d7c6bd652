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

// Threads that load a checkpoint: --threads, or every thread OpenMP gives this rank
// (OMP_NUM_THREADS, by default the cores), whichever is more. Loading is conversion and copying at
// memory bandwidth, which one thread (the default --threads of a rank per core) cannot reach.
inline int load_threads(int requested) { return std::max(requested, max_threads()); }

}  // namespace sinkscope
