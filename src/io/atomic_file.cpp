// commit_atomically (sinkscope/io.hpp): an output appears complete at its final name or not at
// all. A killed job (Slurm time limit, a failed rank) must never leave a half-written file that
// `--resume` or the report would then read as a finished one.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include "sinkscope/error.hpp"
#include "sinkscope/io.hpp"

namespace sinkscope {

namespace {

std::string errno_text(int error) { return std::strerror(error); }

// fsync of `path` (a file or a folder). Opening read-only is enough: fsync flushes the inode's
// data whatever the descriptor's mode, and folders cannot be opened for writing.
void fsync_path(const std::string& path, const std::string& what) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw RuntimeFailure("cannot open " + what + " " + path + " to flush it: " + errno_text(errno));
  }
  const int synced = ::fsync(fd);
  const int sync_error = errno;
  ::close(fd);
  // Some filesystems cannot fsync a folder (EINVAL); the rename is then as durable as it gets.
  if (synced != 0 && !(what == "folder" && sync_error == EINVAL)) {
    throw RuntimeFailure("cannot flush " + what + " " + path +
                         " to disk: " + errno_text(sync_error));
  }
}

// The folder the output goes to: checked up front so that a typo in --out fails in one clear
// line before any work is written, not with an HDF5 error stack from deep inside the writer.
std::string check_output_folder(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path parent = fs::path(path).parent_path();
  const std::string folder = parent.empty() ? "." : parent.string();
  std::error_code error;
  if (!fs::is_directory(folder, error)) {
    throw InputError("cannot write " + path + ": folder " + folder + " does not exist");
  }
  if (::access(folder.c_str(), W_OK | X_OK) != 0) {
    throw InputError("cannot write " + path + ": folder " + folder + " is not writable");
  }
  if (fs::is_directory(path, error)) {
    throw InputError("cannot write " + path + ": it is a folder");
  }
  return folder;
}

// The temporary being written, removed by the termination handler: a job killed by Slurm
// (SIGTERM at cancel, requeue or time limit) leaves no partial file behind. unlink() is
// async-signal-safe; the path lives in a static buffer so the handler never allocates.
char g_tmp_path[4096] = {0};
volatile std::sig_atomic_t g_tmp_set = 0;

extern "C" void remove_temporary_and_die(int sig) {
  if (g_tmp_set) ::unlink(g_tmp_path);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

class TemporaryGuard {
 public:
  explicit TemporaryGuard(const std::string& path) {
    static const bool installed = [] {
      for (int sig : {SIGTERM, SIGINT, SIGHUP}) std::signal(sig, remove_temporary_and_die);
      return true;
    }();
    (void)installed;
    if (path.size() < sizeof(g_tmp_path)) {
      std::memcpy(g_tmp_path, path.c_str(), path.size() + 1);
      g_tmp_set = 1;
    }
  }
  ~TemporaryGuard() { g_tmp_set = 0; }
  TemporaryGuard(const TemporaryGuard&) = delete;
  TemporaryGuard& operator=(const TemporaryGuard&) = delete;
};

}  // namespace

void commit_atomically(const std::string& path,
                       const std::function<void(const std::string& tmp_path)>& fill) {
  const std::string folder = check_output_folder(path);
  // Host and pid keep concurrent writers of the same output (two array tasks on different nodes
  // of a shared filesystem given the same checkpoint) from writing into each other's temporary.
  char host[64] = {0};
  if (::gethostname(host, sizeof(host) - 1) != 0) std::snprintf(host, sizeof(host), "host");
  const std::string tmp_path = path + ".tmp." + host + "." + std::to_string(::getpid());
  TemporaryGuard guard(tmp_path);
  try {
    fill(tmp_path);
    // Data on disk before the rename: otherwise a crash right after it can leave the final
    // name pointing at an empty or partial file on filesystems that reorder metadata and data.
    fsync_path(tmp_path, "file");
    if (std::rename(tmp_path.c_str(), path.c_str()) != 0) {
      throw RuntimeFailure("cannot rename " + tmp_path + " to " + path + ": " + errno_text(errno));
    }
  } catch (...) {
    std::error_code ignored;  // best effort: the original error is the one to report
    std::filesystem::remove(tmp_path, ignored);
    throw;
  }
  // The rename itself lives in the folder's entries; flush them so the new name survives a crash.
  fsync_path(folder, "folder");
}

}  // namespace sinkscope
