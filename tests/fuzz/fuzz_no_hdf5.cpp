// The fuzz target parses .npy files only; .h5 token files go through HDF5, which is not fuzzed
// here (HDF5's own fuzzing is upstream's), so the HDF5 reader is replaced by a refusal.
#include "sinkscope/error.hpp"
#include "sinkscope/io.hpp"

namespace sinkscope {
IntArray read_tokens_h5(const std::string& path) {
  throw InputError(path + ": .h5 tokens are not fuzzed");
}
}  // namespace sinkscope
