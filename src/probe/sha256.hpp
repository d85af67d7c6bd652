// Incremental SHA-256 (FIPS 180-4), for digests of data that is not in one buffer (the content
// checksum of an analysis file, over every dataset). sha256_hex (probes.hpp) is the one-shot form.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace sinkscope {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  // The digest of everything passed to update, as 64 lowercase hex digits. Call once.
  std::string hex_digest();

 private:
  std::array<uint32_t, 8> state_;
  uint8_t buffer_[64] = {0};
  size_t buffered_ = 0;
  uint64_t total_ = 0;
};

}  // namespace sinkscope
