// Error policy: library code throws one of two typed exceptions; `main`
// catches once, prints one line, and maps InputError -> exit 1, everything else -> exit 2.
#pragma once

#include <stdexcept>
#include <string>

namespace sinkscope {

// Bad input or usage: a file, tensor, option or token that the user must fix. Exit status 1.
// The message is one line and names the thing that is wrong.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  // Set when every rank of the job raised this same error (after an agreement step), so each
  // rank can exit 1 normally instead of aborting the job.
  bool agreed = false;
};

// A failure while running (a rank died, a collective failed, a numerical fault). Exit status 2.
class RuntimeFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace sinkscope
