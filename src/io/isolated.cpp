#include "io/isolated.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>

#include "sinkscope/error.hpp"

namespace sinkscope {

namespace {

void write_all(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

// Limits this process's address space to what it has now plus `budget` bytes.
void limit_memory_growth(uint64_t budget) {
  uint64_t pages = 0;
  std::ifstream("/proc/self/statm") >> pages;  // first field: total program size, in pages
  const uint64_t now = pages * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const rlimit limit{static_cast<rlim_t>(now + budget), static_cast<rlim_t>(now + budget)};
  ::setrlimit(RLIMIT_AS, &limit);
}

}  // namespace

IsolatedResult run_isolated(const std::function<std::string()>& check, int timeout_seconds,
                            uint64_t memory_budget_bytes) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0)
    throw RuntimeFailure(std::string("cannot create a pipe: ") + std::strerror(errno));
  const pid_t child = ::fork();
  if (child < 0) {
    const int error = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    throw RuntimeFailure(std::string("cannot fork a process to read a file in: ") +
                         std::strerror(error));
  }
  if (child == 0) {
    // The child ends with this process: killed by Slurm or by a caller's own deadline, it must
    // not leave a reader looping on a damaged file behind.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() == 1) ::_exit(1);  // the parent ended before prctl took effect
    ::close(fds[0]);
    const int null = ::open("/dev/null", O_WRONLY);
    if (null >= 0) ::dup2(null, STDERR_FILENO);
    if (memory_budget_bytes > 0) limit_memory_growth(memory_budget_bytes);
    std::string answer;
    try {
      answer = check();
    } catch (const std::exception& e) {
      answer = e.what();
    } catch (...) {
      answer = "unknown error";
    }
    write_all(fds[1], answer);
    ::_exit(0);
  }
  ::close(fds[1]);
  // Read the answer until the child closes the pipe (it ends), or the deadline passes.
  std::string answer;
  bool timed_out = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_seconds);
  char buffer[4096];
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          deadline - std::chrono::steady_clock::now())
                          .count();
    if (left <= 0) {
      timed_out = true;
      break;
    }
    pollfd pfd{fds[0], POLLIN, 0};
    const int ready = ::poll(&pfd, 1, static_cast<int>(std::min<long long>(left, 1000)));
    if (ready < 0 && errno != EINTR) break;
    if (ready <= 0) continue;
    const ssize_t n = ::read(fds[0], buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    answer.append(buffer, static_cast<size_t>(n));
  }
  ::close(fds[0]);
  if (timed_out) ::kill(child, SIGKILL);
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out)
    return {false, "reading it did not finish within " + std::to_string(timeout_seconds) + " s"};
  if (WIFSIGNALED(status))
    return {false, std::string("reading it crashed (signal ") + std::to_string(WTERMSIG(status)) +
                       ", " + ::strsignal(WTERMSIG(status)) + ")"};
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return {false, "reading it failed (exit status " + std::to_string(WEXITSTATUS(status)) + ")"};
  return {true, answer};
}

}  // namespace sinkscope
