// commit_atomically and check_output_path (sinkscope/io.hpp): an output appears complete at its
// final name or not at all. A killed job (Slurm time limit, a failed rank) must never leave a
// half-written file that
// `--resume` or the report would then read as a finished one.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>

#include "io/small_file.hpp"
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

}  // namespace

// The output checked up front so that a typo in --out fails in one clear line before any work is
// written, not with an HDF5 error stack from deep inside the writer, and so that a FIFO or device
// node at the name is never replaced by a regular file.
std::string check_output_path(const std::string& path, const std::string& prefix) {
  namespace fs = std::filesystem;
  const std::string shown = prefix + path;
  const fs::path parent = fs::path(path).parent_path();
  const std::string folder = parent.empty() ? "." : parent.string();
  const std::string name = fs::path(path).filename().string();
  if (name.empty() || name == "." || name == "..")
    throw InputError(shown + ": names a folder, not a file");
  struct stat st {};
  if (::stat(folder.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw InputError(shown + ": folder " + folder + " does not exist");
  if (::access(folder.c_str(), W_OK | X_OK) != 0)
    throw InputError(shown + ": folder " + folder + " is not writable");
  // The name must fit the filesystem (the temporary's always does, see create_temporary).
  const long name_max = ::pathconf(folder.c_str(), _PC_NAME_MAX);
  const size_t limit = name_max > 0 ? static_cast<size_t>(name_max) : 255;
  if (name.size() > limit)
    throw InputError(shown + ": file name has " + std::to_string(name.size()) +
                     " bytes, more than the filesystem's limit of " + std::to_string(limit));
  if (path.size() >= PATH_MAX)
    throw InputError(shown + ": path has " + std::to_string(path.size()) +
                     " bytes, more than the limit of " + std::to_string(PATH_MAX - 1));
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) throw InputError(shown + ": it is a folder");
    // Renaming over a FIFO, a device node or a socket would replace it with a regular file.
    if (!S_ISREG(st.st_mode))
      throw InputError(shown + ": it exists and is " + file_kind(st.st_mode) +
                       ", not a regular file");
  }
  return folder;
}

namespace {

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

// Creates an empty temporary for `path` in its folder, named ".<name>.<8 random letters>.tmp":
// hidden, unique among writers on several hosts of a shared filesystem (O_EXCL), and never longer
// than the filesystem allows: <name> is cut to fit (the temporary used to be
// "<name>.tmp.<host>.<pid>", so a legal 251-character name failed at the very end with
// ENAMETOOLONG). The job scripts find a checkpoint's temporaries by the uncut name
// (jobs/sweep_array.sbatch).
std::string create_temporary(const std::string& path, const std::string& folder) {
  static const char kLetters[] = "abcdefghijklmnopqrstuvwxyz0123456789";
  constexpr size_t kRandom = 8;
  const std::string name = std::filesystem::path(path).filename().string();
  const long name_max = ::pathconf(folder.c_str(), _PC_NAME_MAX);
  const size_t limit = name_max > 0 ? static_cast<size_t>(name_max) : 255;
  const size_t overhead = 1 + 1 + kRandom + 4;  // ".", ".", random, ".tmp"
  const std::string kept = name.substr(0, limit > overhead ? limit - overhead : 0);
  std::random_device entropy;
  std::uniform_int_distribution<size_t> pick(0, sizeof(kLetters) - 2);
  // The mode of a file created normally (0666 less the umask), as outputs had before.
  const mode_t mask = ::umask(0);
  ::umask(mask);
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::string random(kRandom, 'x');
    for (char& c : random) c = kLetters[pick(entropy)];
    const std::string tmp_path = folder + "/." + kept + "." + random + ".tmp";
    const int fd = ::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666 & ~mask);
    if (fd >= 0) {
      ::close(fd);
      return tmp_path;
    }
    if (errno != EEXIST)
      throw RuntimeFailure("cannot create a temporary file in " + folder + ": " +
                           errno_text(errno));
  }
  throw RuntimeFailure("cannot create a temporary file in " + folder + ": every name was taken");
}

}  // namespace

void commit_atomically(const std::string& path,
                       const std::function<void(const std::string& tmp_path)>& fill) {
  const std::string folder = check_output_path(path);
  const std::string tmp_path = create_temporary(path, folder);
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
    // Every object of the temporary is closed by now (the writer's file died with `fill`'s
    // scope); best effort: the original error is the one to report.
    std::error_code ignored;
    std::filesystem::remove(tmp_path, ignored);
    throw;
  }
  // The rename itself lives in the folder's entries; flush them so the new name survives a crash.
  fsync_path(folder, "folder");
}

}  // namespace sinkscope
