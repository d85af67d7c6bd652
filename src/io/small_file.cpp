#include "io/small_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "sinkscope/error.hpp"

namespace sinkscope {

namespace {

// Closes the descriptor on every path out of read_regular_file.
class Descriptor {
 public:
  explicit Descriptor(int fd) : fd_(fd) {}
  ~Descriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

}  // namespace

std::string file_kind(unsigned mode) {
  switch (mode & S_IFMT) {
    case S_IFREG:
      return "a regular file";
    case S_IFDIR:
      return "a folder";
    case S_IFIFO:
      return "a FIFO";
    case S_IFCHR:
      return "a character device";
    case S_IFBLK:
      return "a block device";
    case S_IFSOCK:
      return "a socket";
    default:
      return "not a regular file";
  }
}

std::string read_regular_file(const std::string& path, uint64_t max_bytes,
                              const std::string& what) {
  // O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer; the
  // fstat below then refuses it. On a regular file the flag changes nothing.
  const Descriptor fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (fd.get() < 0)
    throw InputError(path + ": cannot open " + what + " (" + std::strerror(errno) + ")");
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0)
    throw InputError(path + ": cannot read " + what + " (" + std::strerror(errno) + ")");
  if (!S_ISREG(st.st_mode))
    throw InputError(path + ": " + what + " is " + file_kind(st.st_mode) + ", not a regular file");
  const auto too_large = [&](uint64_t size) {
    return InputError(path + ": " + what + " has " + std::to_string(size) +
                      " bytes, more than the limit of " + std::to_string(max_bytes));
  };
  if (static_cast<uint64_t>(st.st_size) > max_bytes) throw too_large(st.st_size);
  // Read to the end, never past max_bytes + 1: a file that grows while being read is caught too.
  std::string bytes(static_cast<size_t>(st.st_size), '\0');
  size_t filled = 0;
  while (true) {
    if (filled == bytes.size()) {
      if (bytes.size() > max_bytes) throw too_large(bytes.size());
      bytes.resize(std::min<uint64_t>(max_bytes + 1, bytes.size() + 65536));
    }
    const ssize_t got = ::read(fd.get(), bytes.data() + filled, bytes.size() - filled);
    if (got < 0) {
      if (errno == EINTR) continue;
      throw InputError(path + ": cannot read " + what + " (" + std::strerror(errno) + ")");
    }
    if (got == 0) break;
    filled += static_cast<size_t>(got);
  }
  if (filled > max_bytes) throw too_large(filled);
  bytes.resize(filled);
  return bytes;
}

void require_regular_file(const std::string& path, const std::string& what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    throw InputError(path + ": cannot open " + what + " (" + std::strerror(errno) + ")");
  if (!S_ISREG(st.st_mode))
    throw InputError(path + ": " + what + " is " + file_kind(st.st_mode) + ", not a regular file");
}

}  // namespace sinkscope
