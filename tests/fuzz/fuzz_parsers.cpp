// libFuzzer target for the parsers that see untrusted bytes first: the safetensors header, the
// sharded index, config.json (through parse_model_config: size limit, bounded nesting) and .npy
// token files (docs/reliability.md has the runs and results). Inputs grow to 128 KiB, enough for
// nesting past the depth limit and .npy headers with long fields.
// The first input byte picks the parser. Only InputError may escape a parser: anything else
// (a crash, a sanitizer report, another exception) is a finding.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "sinkscope/checkpoint.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/probes.hpp"

namespace {

// Runs `parse` on `body` written to a temporary file named *`suffix` (the readers take paths).
template <typename Parse>
void with_temporary_file(const std::string& body, const char* suffix, Parse&& parse) {
  std::string path = std::string("/tmp/sinkscope-fuzz-XXXXXX") + suffix;
  const int fd = ::mkstemps(path.data(), static_cast<int>(std::strlen(suffix)));
  if (fd < 0) return;
  if (::write(fd, body.data(), body.size()) != static_cast<ssize_t>(body.size())) {
    ::close(fd);
    ::unlink(path.c_str());
    return;
  }
  ::close(fd);
  try {
    parse(path);
  } catch (...) {
    ::unlink(path.c_str());
    throw;
  }
  ::unlink(path.c_str());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string body(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    switch (data[0] % 4) {
      case 0: {
        // The header as the reader sees it: the data section is whatever follows a declared length.
        const uint64_t data_len = body.size() > 64 ? body.size() - 64 : 0;
        sinkscope::parse_safetensors_header(body.data(), body.size() - data_len, data_len,
                                            "fuzz.safetensors");
        break;
      }
      case 1:
        sinkscope::parse_safetensors_index(body, "fuzz.index.json");
        break;
      case 2:
        // Through the file reader: the size limit and the bounded-depth parse come first.
        with_temporary_file(body, ".json",
                            [](const std::string& path) { sinkscope::parse_model_config(path); });
        break;
      default:
        with_temporary_file(body, ".npy",
                            [](const std::string& path) { sinkscope::load_tokens(path); });
    }
  } catch (const sinkscope::InputError&) {
    // The expected outcome for bad input.
  }
  return 0;
}
