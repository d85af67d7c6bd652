// libFuzzer target for the parsers that see untrusted bytes first: the safetensors header, the
// sharded index, config.json and .npy token files (docs/reliability.md has the runs and results).
// The first input byte picks the parser. Only InputError may escape a parser: anything else
// (a crash, a sanitizer report, another exception) is a finding.
#include <unistd.h>
#include <cstdint>
#include <cstdio>
#include <string>

#include "sinkscope/checkpoint.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/probes.hpp"

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
        sinkscope::parse_model_config_text(body, "fuzz/config.json");
        break;
      default: {
        char path[] = "/tmp/sinkscope-fuzz-XXXXXX.npy";
        const int fd = ::mkstemps(path, 4);
        if (fd < 0) return 0;
        if (::write(fd, body.data(), body.size()) != static_cast<ssize_t>(body.size())) {
          ::close(fd);
          ::unlink(path);
          return 0;
        }
        ::close(fd);
        try {
          sinkscope::load_tokens(path);
        } catch (...) {
          ::unlink(path);
          throw;
        }
        ::unlink(path);
      }
    }
  } catch (const sinkscope::InputError&) {
    // The expected outcome for bad input.
  }
  return 0;
}
