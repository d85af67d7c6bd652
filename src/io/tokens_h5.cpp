// Token files in HDF5 (docs/schema.md "Inputs": dataset /tokens, [N, T]).
#include "io/hdf5_file.hpp"
#include "io/small_file.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/io.hpp"
#include "sinkscope/probes.hpp"

namespace sinkscope {

IntArray read_tokens_h5(const std::string& path) {
  // HDF5 opens the path itself and would block on a FIFO: refuse anything but a regular file.
  require_regular_file(path, "token file");
  IntArray t;
  try {
    h5::File f = h5::File::open_read(path);
    if (!f.has_dataset("tokens")) throw InputError(path + ": no dataset /tokens");
    const h5::DatasetInfo info = f.dataset_info("tokens");
    if (info.kind != h5::DatasetInfo::Kind::kInteger)
      throw InputError(path + ": /tokens is not an integer dataset");
    if (info.shape.size() != 2) throw InputError(path + ": /tokens must be 2-D [N, T]");
    if (info.shape[0] == 0 || info.shape[1] == 0) throw InputError(path + ": /tokens is empty");
    // A tiny file can declare a huge chunked dataset: the shape is checked before the read.
    check_token_count(info.shape[0], info.shape[1], path + ": /tokens");
    std::vector<size_t> shape;
    const std::vector<int64_t> v = f.read_dataset<int64_t>("tokens", &shape);
    t = IntArray(shape, "probe,position");
    for (size_t i = 0; i < v.size(); ++i) {
      if (v[i] < INT32_MIN || v[i] > INT32_MAX)
        throw InputError(path + ": token id " + std::to_string(v[i]) + " at (row " +
                         std::to_string(i / shape[1]) + ", column " + std::to_string(i % shape[1]) +
                         ") does not fit int32");
      t.data[i] = static_cast<int32_t>(v[i]);
    }
  } catch (const RuntimeFailure& e) {
    throw InputError(path + ": cannot read tokens (" + e.what() + ")");
  }
  return t;
}

}  // namespace sinkscope
