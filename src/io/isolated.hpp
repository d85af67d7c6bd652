// Runs a check in a forked child process, so that a library that crashes on damaged input (HDF5
// on some corrupted files: a segfault reading a string attribute) cannot take sinkscope down.
#pragma once

#include <functional>
#include <string>

namespace sinkscope {

// Forks; the child runs `check` (its exceptions become their what()) and sends the string back;
// the parent waits at most timeout_seconds. Returns the child's string (by convention empty when
// all is well), or a description of how the child ended: killed by a signal, or still running
// after the timeout (then it is killed). The parent never runs `check` itself. The child ends
// with _exit: no atexit handler, buffered stream or MPI call of the parent runs twice.
std::string run_isolated(const std::function<std::string()>& check, int timeout_seconds);

}  // namespace sinkscope
