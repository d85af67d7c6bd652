// Runs a check in a forked child process, so that a library that misbehaves on damaged input
// cannot take sinkscope down: HDF5, given a file with one flipped byte, can segfault (reading a
// string attribute), abort on a corrupted heap, or allocate tens of GB and run for minutes.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace sinkscope {

struct IsolatedResult {
  bool completed = false;  // the child ran `check` to its end (returned or threw)
  std::string answer;      // what it returned (an exception's what()); otherwise how it ended
};

// Forks; the child runs `check` and sends its string back; the parent waits at most
// timeout_seconds. The child's address space may grow by at most memory_budget_bytes beyond what
// it inherited (RLIMIT_AS; 0: no limit), its stderr goes to /dev/null (a crashing library's
// messages would break the one-line rule), and it ends with _exit: no atexit handler, buffered
// stream or MPI call of the parent runs twice. The parent never runs `check` itself.
IsolatedResult run_isolated(const std::function<std::string()>& check, int timeout_seconds,
                            uint64_t memory_budget_bytes = 0);

}  // namespace sinkscope
