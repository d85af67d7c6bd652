// Files read whole (config.json, the sharded index, .npy token files) and files handed to HDF5:
// refused unless they are regular files, and the whole-read ones unless they are at most a
// documented size (sinkscope/limits.hpp). A FIFO never blocks the open, a device node such as
// /dev/zero never grows memory, a huge file is refused before it is read.
#pragma once

#include <cstdint>
#include <string>

namespace sinkscope {

// All bytes of `path`. Throws InputError "<path>: ..." naming `what` ("config file", "token
// file", ...) when it cannot be opened, is not a regular file, or holds more than max_bytes.
std::string read_regular_file(const std::string& path, uint64_t max_bytes, const std::string& what);

// Throws InputError "<path>: ..." unless `path` (links followed) is an existing regular file.
// Checked with stat, without opening: for readers (HDF5) that open the path themselves.
void require_regular_file(const std::string& path, const std::string& what);

// "a FIFO", "a folder", "a character device", ...: what a non-regular st_mode is, for messages.
std::string file_kind(unsigned mode);

}  // namespace sinkscope
