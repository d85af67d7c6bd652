// Checkpoint folders: config.json + model.safetensors or an index with shards, memory-mapped.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <unordered_map>

#include "checkpoint/omp_threads.hpp"
#include "io/small_file.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/limits.hpp"
#include "sinkscope/probes.hpp"

namespace sinkscope {
namespace fs = std::filesystem;

namespace {

// A read-only mapping of one safetensors file.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    // O_NONBLOCK: a FIFO in place of the file opens at once (and is refused below) instead of
    // blocking until a writer appears; on a regular file the flag changes nothing.
    fd_ = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd_ < 0) throw InputError(path + ": cannot open (" + std::strerror(errno) + ")");
    struct stat st {};
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
      const std::string kind = file_kind(st.st_mode);
      ::close(fd_);
      throw InputError(path + ": safetensors file is " + kind + ", not a regular file");
    }
    size_ = static_cast<uint64_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
      if (p == MAP_FAILED) {
        ::close(fd_);
        throw InputError(path + ": cannot map (" + std::strerror(errno) + ")");
      }
      data_ = static_cast<const char*>(p);
    }
    // The pread readers (the CUDA loader) go through the data front to back: a larger read-ahead
    // window for this file description. The mapping's own read-ahead is unaffected.
    ::posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_) ::munmap(const_cast<char*>(data_), size_);
    if (fd_ >= 0) ::close(fd_);
  }
  const char* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  bool holds(const char* p) const { return data_ && p >= data_ && p < data_ + size_; }

  // n bytes at `offset` of the file into out, with pread(2): the page cache copies them, and no
  // page of the mapping is faulted in.
  void read(uint64_t offset, size_t n, void* out) const {
    char* to = static_cast<char*>(out);
    while (n > 0) {
      const ssize_t got = ::pread(fd_, to, n, static_cast<off_t>(offset));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0)
        throw InputError(path_ + ": read failed at byte " + std::to_string(offset) + " (" +
                         std::strerror(errno) + ")");
      if (got == 0)
        throw InputError(path_ + ": file ended at byte " + std::to_string(offset) +
                         " while reading (was it truncated?)");
      to += got;
      offset += static_cast<uint64_t>(got);
      n -= static_cast<size_t>(got);
    }
  }
  // Starts reading [offset, offset + n) into the page cache (advice only: errors are ignored).
  void prefetch(uint64_t offset, size_t n) const {
    ::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(n), POSIX_FADV_WILLNEED);
  }

 private:
  std::string path_;
  int fd_ = -1;
  const char* data_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace

struct Checkpoint::Impl {
  std::string dir;
  ModelConfig config;
  std::vector<std::string> file_names;
  std::vector<std::unique_ptr<MappedFile>> files;
  std::vector<uint64_t> data_start;  // byte offset of each file's data section
  std::vector<TensorInfo> tensors;
  std::unordered_map<std::string, size_t> by_name;
  mutable uint64_t bytes_read = 0;
  int threads = 0;
  std::function<void(uint64_t)> observer;

  void count(size_t n) const {
    bytes_read += n;
    if (observer) observer(bytes_read);
  }
  int nthreads() const { return threads > 0 ? threads : max_threads(); }

  void add_file(const std::string& file_name) {
    const std::string path = (fs::path(dir) / file_name).string();
    auto mf = std::make_unique<MappedFile>(path);
    if (mf->size() < 8)
      throw InputError(path + ": truncated safetensors file (" + std::to_string(mf->size()) +
                       " bytes)");
    uint64_t header_len = 0;
    std::memcpy(&header_len, mf->data(), 8);  // little-endian on every supported host
    if (header_len > kMaxSafetensorsHeaderBytes)
      throw InputError(path + ": safetensors header length " + std::to_string(header_len) +
                       " exceeds the limit of " + std::to_string(kMaxSafetensorsHeaderBytes) +
                       " bytes");
    if (header_len > mf->size() - 8)
      throw InputError(path + ": safetensors header length " + std::to_string(header_len) +
                       " runs past the end of the file (" + std::to_string(mf->size()) + " bytes)");
    const uint64_t data_len = mf->size() - 8 - header_len;
    auto infos = parse_safetensors_header(mf->data() + 8, header_len, data_len, path);
    const int index = static_cast<int>(files.size());
    for (auto& t : infos) {
      t.file = index;
      if (by_name.count(t.name))
        throw InputError(path + ": tensor '" + t.name + "' also appears in another shard");
      by_name.emplace(t.name, tensors.size());
      tensors.push_back(std::move(t));
    }
    data_start.push_back(8 + header_len);
    files.push_back(std::move(mf));
    file_names.push_back(file_name);
  }

  const TensorInfo& get(const std::string& name) const {
    auto it = by_name.find(name);
    if (it == by_name.end())
      throw InputError(dir + ": tensor '" + name + "' is missing from the checkpoint");
    return tensors[it->second];
  }

  // The file whose mapping holds [p, p + n); InputError when none does (a caller's mistake).
  const MappedFile& file_of(const char* p, size_t n) const {
    for (const auto& f : files)
      if (f->holds(p) && n <= static_cast<size_t>(f->data() + f->size() - p)) return *f;
    throw InputError(dir + ": a stored read of " + std::to_string(n) +
                     " bytes lies outside every safetensors file of the checkpoint");
  }

  const char* bytes(const TensorInfo& t) const {
    return files[t.file]->data() + data_start[t.file] + t.begin;
  }

  // Multiplies out (rows [r0, r1) x columns [c0, c1) of FP8 tensor t, converted) by the block
  // scales of weight_scale_inv: element (r, c) by scale[r / block_rows, c / block_cols].
  void scale_fp8(const TensorInfo& t, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                 float* out) const;
};

namespace {
std::pair<int64_t, int64_t> fp8_block(const ModelConfig& c) {
  return {c.fp8_block_rows > 0 ? c.fp8_block_rows : 128,
          c.fp8_block_cols > 0 ? c.fp8_block_cols : 128};
}
std::string dims(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}
// The FP8 checks shared by validation and the reads; returns the scale tensor.
const TensorInfo& fp8_scale_of(const std::string& dir, const ModelConfig& c,
                               const std::function<const TensorInfo*(const std::string&)>& find,
                               const TensorInfo& t) {
  if (t.shape.size() != 2)
    throw InputError(dir + ": tensor '" + t.name + "' is F8_E4M3 with shape " + dims(t.shape) +
                     "; FP8 block scales need a 2-D weight");
  const std::string sname = fp8_scale_name(t.name);
  const TensorInfo* s = find(sname);
  if (!s)
    throw InputError(dir + ": tensor '" + t.name + "' is F8_E4M3 but its scale '" + sname +
                     "' is missing");
  const auto [br, bc] = fp8_block(c);
  const std::vector<int64_t> want = {(t.shape[0] + br - 1) / br, (t.shape[1] + bc - 1) / bc};
  if (s->dtype != DType::F32)
    throw InputError(dir + ": tensor '" + sname + "' has dtype " + s->dtype_str +
                     ", FP8 block scales must be F32");
  if (s->shape != want)
    throw InputError(dir + ": tensor '" + sname + "' has shape " + dims(s->shape) + ", the " +
                     std::to_string(br) + " x " + std::to_string(bc) + " blocks of '" + t.name +
                     "' " + dims(t.shape) + " need " + dims(want));
  return *s;
}
}  // namespace

void check_fp8_scale(const Checkpoint& ckpt, const TensorInfo& t) {
  fp8_scale_of(
      ckpt.dir(), ckpt.config(), [&](const std::string& n) { return ckpt.find(n); }, t);
}

void Checkpoint::Impl::scale_fp8(const TensorInfo& t, int64_t r0, int64_t r1, int64_t c0,
                                 int64_t c1, float* out) const {
  const TensorInfo& s = fp8_scale_of(
      dir, config,
      [&](const std::string& n) -> const TensorInfo* {
        auto it = by_name.find(n);
        return it == by_name.end() ? nullptr : &tensors[it->second];
      },
      t);
  const auto [br, bc] = fp8_block(config);
  const int64_t scols = s.shape[1], w = c1 - c0;
  const char* base = bytes(s);
  for (int64_t r = r0; r < r1; ++r) {
    float* row = out + (r - r0) * w;
    for (int64_t c = c0; c < c1;) {
      const int64_t blk = c / bc, end = std::min(c1, (blk + 1) * bc);
      float sc;
      std::memcpy(&sc, base + ((r / br) * scols + blk) * 4, 4);
      if (!std::isfinite(sc))
        throw InputError(dir + ": tensor '" + s.name + "' holds a non-finite scale");
      for (; c < end; ++c) row[c - c0] *= sc;
    }
  }
}

Checkpoint::Checkpoint(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Checkpoint::Checkpoint(Checkpoint&&) noexcept = default;
Checkpoint& Checkpoint::operator=(Checkpoint&&) noexcept = default;
Checkpoint::~Checkpoint() = default;

Checkpoint Checkpoint::open(const std::string& model_dir) {
  if (!fs::is_directory(model_dir)) throw InputError(model_dir + ": model folder does not exist");
  auto impl = std::make_unique<Impl>();
  impl->dir = model_dir;
  impl->config = parse_model_config((fs::path(model_dir) / "config.json").string());
  const fs::path single = fs::path(model_dir) / "model.safetensors";
  const fs::path index = fs::path(model_dir) / "model.safetensors.index.json";
  if (fs::exists(index)) {
    const auto map = parse_safetensors_index(
        read_regular_file(index.string(), kMaxIndexBytes, "safetensors index"), index.string());
    std::vector<std::string> shards;
    for (const auto& [tensor, shard] : map)
      if (std::find(shards.begin(), shards.end(), shard) == shards.end()) shards.push_back(shard);
    for (const auto& shard : shards) {
      if (!fs::exists(fs::path(model_dir) / shard))
        throw InputError(index.string() + ": shard '" + shard + "' does not exist");
      impl->add_file(shard);
    }
    // Every weight of the index is where the index says it is, and nothing else is there.
    for (const auto& [tensor, shard] : map) {
      auto it = impl->by_name.find(tensor);
      if (it == impl->by_name.end() || impl->file_names[impl->tensors[it->second].file] != shard)
        throw InputError(index.string() + ": tensor '" + tensor + "' is not in shard '" + shard +
                         "'");
    }
    if (map.size() != impl->tensors.size())
      throw InputError(index.string() + ": shards hold tensors the index does not list");
  } else if (fs::exists(single)) {
    impl->add_file("model.safetensors");
  } else {
    throw InputError(model_dir + ": no model.safetensors or model.safetensors.index.json");
  }
  return Checkpoint(std::move(impl));
}

const std::string& Checkpoint::dir() const { return impl_->dir; }
const ModelConfig& Checkpoint::config() const { return impl_->config; }
const std::vector<std::string>& Checkpoint::files() const { return impl_->file_names; }
const std::vector<TensorInfo>& Checkpoint::tensors() const { return impl_->tensors; }
const TensorInfo* Checkpoint::find(const std::string& name) const {
  auto it = impl_->by_name.find(name);
  return it == impl_->by_name.end() ? nullptr : &impl_->tensors[it->second];
}

namespace {
[[noreturn]] void non_finite(float value, size_t i, const std::string& dir,
                             const std::string& name) {
  throw InputError(dir + ": tensor '" + name + "' holds a non-finite value (" +
                   std::to_string(value) + ") at element " + std::to_string(i));
}
void check_finite(const float* p, size_t n, const std::string& dir, const std::string& name) {
  // One pass, no per-element branch in the hot loop: accumulate p*0, which is NaN iff p is not
  // finite.
  float acc = 0.f;
  for (size_t i = 0; i < n; ++i) acc += p[i] * 0.f;
  if (!std::isfinite(acc)) {
    for (size_t i = 0; i < n; ++i)
      if (!std::isfinite(p[i])) non_finite(p[i], i, dir, name);
  }
}
int64_t row_length(const TensorInfo& t) { return t.shape.empty() ? 1 : t.shape.back(); }
int64_t row_count(const TensorInfo& t) {
  int64_t n = 1;
  for (size_t i = 0; i + 1 < t.shape.size(); ++i) n *= t.shape[i];
  return t.shape.size() <= 1 ? (t.shape.empty() ? 1 : t.shape[0]) : n;
}
// The 2-D view of read_rows: 1-D tensors are rows of one element.
int64_t view_len(const TensorInfo& t) { return t.shape.size() <= 1 ? 1 : row_length(t); }
int64_t view_rows(const TensorInfo& t) {
  return t.shape.size() <= 1 ? (t.shape.empty() ? 1 : t.shape[0]) : row_count(t);
}

constexpr int64_t kChunk = int64_t{1} << 16;        // elements per OpenMP work item
constexpr int64_t kParallelMin = int64_t{1} << 18;  // fewer elements: one thread

// Converts `rows` rows of `width` stored values (row r at src + r * pitch bytes) to fp32 rows of
// `width` in out and checks them, in parallel over chunks of whole rows (or of one long row).
void convert_rows(const TensorInfo& t, const char* src, int64_t rows, int64_t width, size_t pitch,
                  float* out, int threads, const std::string& dir) {
  const int64_t n = rows * width;
  if (n == 0) return;
  const bool contiguous = pitch == static_cast<size_t>(width) * t.elem_size;
  if (threads <= 1 || n < kParallelMin) {
    if (contiguous) {
      convert_to_f32(t.dtype, src, static_cast<size_t>(n), out);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        convert_to_f32(t.dtype, src + r * pitch, width, out + r * width);
    }
    bool bad = false;
    for (int64_t r = 0; r < (contiguous ? 1 : rows); ++r)
      bad |= any_non_finite(t.dtype, src + r * pitch, static_cast<size_t>(contiguous ? n : width));
    if (bad) check_finite(out, static_cast<size_t>(n), dir, t.name);  // names the first one
    return;
  }
  // Work items: pieces of about kChunk elements, each within a row when rows are not contiguous.
  const int64_t per_row = contiguous ? 1 : std::max<int64_t>(1, (width + kChunk - 1) / kChunk);
  const int64_t items = contiguous ? (n + kChunk - 1) / kChunk : rows * per_row;
  const int64_t piece = contiguous ? kChunk : (width + per_row - 1) / per_row;
  bool bad = false;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(|| : bad)
  for (int64_t it = 0; it < items; ++it) {
    const char* from;
    int64_t len;
    if (contiguous) {
      const int64_t a = it * kChunk;
      len = std::min(n, a + kChunk) - a;
      from = src + a * static_cast<int64_t>(t.elem_size);
      convert_to_f32(t.dtype, from, static_cast<size_t>(len), out + a);
    } else {
      const int64_t r = it / per_row, a = (it % per_row) * piece;
      len = std::max<int64_t>(0, std::min(width, a + piece) - a);
      from = src + r * pitch + a * static_cast<int64_t>(t.elem_size);
      convert_to_f32(t.dtype, from, static_cast<size_t>(len), out + r * width + a);
    }
    bad = any_non_finite(t.dtype, from, static_cast<size_t>(len)) || bad;
  }
  if (bad) check_finite(out, static_cast<size_t>(n), dir, t.name);  // names the first one
}

// Page-aligned madvise over [p, p + n) of a mapping.
void advise(const char* p, size_t n, int advice) {
  if (n == 0) return;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t b = reinterpret_cast<uintptr_t>(p) + n;
  ::madvise(reinterpret_cast<void*>(a), b - a, advice);  // advice only: errors are ignored
}
}  // namespace

void Checkpoint::read_rows(const std::string& name, int64_t row_begin, int64_t row_end,
                           float* out) const {
  const TensorInfo& t = impl_->get(name);
  if (t.dtype == DType::Other)
    throw InputError(impl_->dir + ": tensor '" + name + "' has unsupported dtype " + t.dtype_str);
  // 1-D tensors read elements; n-D tensors are [prod(shape[:-1]), shape[-1]].
  const int64_t len = view_len(t), rows = view_rows(t);
  if (row_begin < 0 || row_end > rows || row_begin > row_end)
    throw InputError(impl_->dir + ": rows [" + std::to_string(row_begin) + ", " +
                     std::to_string(row_end) + ") out of range for tensor '" + name + "'");
  const size_t n = static_cast<size_t>((row_end - row_begin) * len);
  convert_rows(t, impl_->bytes(t) + row_begin * len * t.elem_size, 1, static_cast<int64_t>(n),
               n * t.elem_size, out, impl_->nthreads(), impl_->dir);
  if (t.dtype == DType::F8E4M3) impl_->scale_fp8(t, row_begin, row_end, 0, len, out);
  impl_->count(n * t.elem_size);
}

void Checkpoint::read_cols(const std::string& name, int64_t col_begin, int64_t col_end,
                           float* out) const {
  const TensorInfo& t = impl_->get(name);
  if (t.shape.size() != 2) throw InputError(impl_->dir + ": tensor '" + name + "' is not 2-D");
  read_block(name, 0, t.shape[0], col_begin, col_end, out);
}

StoredSlice Checkpoint::unchecked_block(const std::string& name, int64_t row_begin, int64_t row_end,
                                        int64_t col_begin, int64_t col_end) const {
  const TensorInfo& t = impl_->get(name);
  if (t.dtype == DType::Other)
    throw InputError(impl_->dir + ": tensor '" + name + "' has unsupported dtype " + t.dtype_str);
  if (t.dtype == DType::F8E4M3)
    throw InputError(impl_->dir + ": tensor '" + name +
                     "' is F8_E4M3: FP8 checkpoints are dequantised by the CPU loader only "
                     "(use --device cpu)");
  const int64_t rows = view_rows(t), cols = view_len(t);
  if (row_begin < 0 || row_end > rows || row_begin > row_end || col_begin < 0 || col_end > cols ||
      col_begin > col_end)
    throw InputError(impl_->dir + ": block out of range for tensor '" + name + "'");
  StoredSlice s;
  s.dtype = t.dtype;
  s.elem_size = t.elem_size;
  s.rows = row_end - row_begin;
  s.cols = col_end - col_begin;
  s.row_pitch = static_cast<size_t>(cols) * t.elem_size;
  s.data = impl_->bytes(t) + (row_begin * cols + col_begin) * static_cast<int64_t>(t.elem_size);
  impl_->count(s.bytes());
  return s;
}

StoredSlice Checkpoint::unchecked_rows(const std::string& name, int64_t row_begin,
                                       int64_t row_end) const {
  return unchecked_block(name, row_begin, row_end, 0, view_len(impl_->get(name)));
}

void Checkpoint::throw_non_finite(const std::string& name, float value, size_t element) const {
  non_finite(value, element, impl_->dir, name);
}

StoredSlice Checkpoint::stored_block(const std::string& name, int64_t row_begin, int64_t row_end,
                                     int64_t col_begin, int64_t col_end) const {
  const StoredSlice s = unchecked_block(name, row_begin, row_end, col_begin, col_end);
  // Every value finite, as the converting reads require (checked on the stored bits).
  const DType dtype = s.dtype;
  const int64_t width = s.cols, es = static_cast<int64_t>(s.elem_size);
  bool bad = false;
  const int threads = s.bytes() >= static_cast<size_t>(kParallelMin) ? impl_->nthreads() : 1;
  if (s.contiguous()) {
    const int64_t n = s.rows * width, items = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(|| : bad)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t a = it * kChunk, len = std::min(n, a + kChunk) - a;
      bad = any_non_finite(dtype, s.data + a * es, static_cast<size_t>(len)) || bad;
    }
  } else {
#pragma omp parallel for num_threads(threads) schedule(static) reduction(|| : bad)
    for (int64_t r = 0; r < s.rows; ++r)
      bad = any_non_finite(dtype, s.data + r * s.row_pitch, static_cast<size_t>(width)) || bad;
  }
  if (bad) {
    for (int64_t r = 0; r < s.rows; ++r) {
      const char* row = s.data + r * s.row_pitch;
      const size_t i = first_non_finite(dtype, row, static_cast<size_t>(width));
      if (i < static_cast<size_t>(width)) {
        float v;
        convert_to_f32(dtype, row + i * s.elem_size, 1, &v);
        non_finite(v, static_cast<size_t>(r * width) + i, impl_->dir, name);
      }
    }
  }
  return s;
}

StoredSlice Checkpoint::stored_rows(const std::string& name, int64_t row_begin,
                                    int64_t row_end) const {
  const TensorInfo& t = impl_->get(name);
  return stored_block(name, row_begin, row_end, 0, view_len(t));
}

StoredSlice Checkpoint::raw_rows(const std::string& name, int64_t row_begin,
                                 int64_t row_end) const {
  const TensorInfo& t = impl_->get(name);
  const int64_t rows = view_rows(t), cols = view_len(t);
  if (row_begin < 0 || row_end > rows || row_begin > row_end)
    throw InputError(impl_->dir + ": rows [" + std::to_string(row_begin) + ", " +
                     std::to_string(row_end) + ") out of range for tensor '" + name + "'");
  StoredSlice s;
  s.dtype = t.dtype;
  s.elem_size = t.elem_size;
  s.rows = row_end - row_begin;
  s.cols = cols;
  s.row_pitch = static_cast<size_t>(cols) * t.elem_size;
  s.data = impl_->bytes(t) + row_begin * cols * static_cast<int64_t>(t.elem_size);
  impl_->count(s.bytes());
  return s;
}

uint64_t Checkpoint::advise_rows(const std::string& name, int64_t row_begin,
                                 int64_t row_end) const {
  const TensorInfo& t = impl_->get(name);
  const int64_t len = view_len(t), rows = view_rows(t);
  row_begin = std::clamp<int64_t>(row_begin, 0, rows);
  row_end = std::clamp<int64_t>(row_end, row_begin, rows);
  const size_t n = static_cast<size_t>((row_end - row_begin) * len) * t.elem_size;
  const char* p = impl_->bytes(t) + row_begin * len * static_cast<int64_t>(t.elem_size);
  advise(p, n, MADV_SEQUENTIAL);
  advise(p, n, MADV_WILLNEED);
  return n;
}

void Checkpoint::read_stored(const char* at, size_t n, void* out) const {
  if (n == 0) return;
  const MappedFile& f = impl_->file_of(at, n);
  f.read(static_cast<uint64_t>(at - f.data()), n, out);
}

void Checkpoint::prefetch_stored(const char* at, size_t n) const {
  if (n == 0) return;
  const MappedFile& f = impl_->file_of(at, n);
  f.prefetch(static_cast<uint64_t>(at - f.data()), n);
}

void Checkpoint::set_read_threads(int threads) const { impl_->threads = std::max(0, threads); }
int Checkpoint::read_threads() const { return impl_->nthreads(); }
void Checkpoint::set_read_observer(std::function<void(uint64_t)> observer) const {
  impl_->observer = std::move(observer);
}

void Checkpoint::read_block(const std::string& name, int64_t row_begin, int64_t row_end,
                            int64_t col_begin, int64_t col_end, float* out) const {
  const TensorInfo& t = impl_->get(name);
  if (t.shape.size() < 2) throw InputError(impl_->dir + ": tensor '" + name + "' is not a matrix");
  if (t.dtype == DType::Other)
    throw InputError(impl_->dir + ": tensor '" + name + "' has unsupported dtype " + t.dtype_str);
  const int64_t rows = row_count(t), cols = row_length(t);
  if (row_begin < 0 || row_end > rows || row_begin > row_end || col_begin < 0 || col_end > cols ||
      col_begin > col_end)
    throw InputError(impl_->dir + ": block out of range for tensor '" + name + "'");
  const int64_t width = col_end - col_begin;
  convert_rows(t, impl_->bytes(t) + (row_begin * cols + col_begin) * t.elem_size,
               row_end - row_begin, width, static_cast<size_t>(cols) * t.elem_size, out,
               impl_->nthreads(), impl_->dir);
  if (t.dtype == DType::F8E4M3) impl_->scale_fp8(t, row_begin, row_end, col_begin, col_end, out);
  impl_->count(static_cast<size_t>((row_end - row_begin) * width) * t.elem_size);
}

void Checkpoint::read_row(const std::string& name, int64_t row, float* out) const {
  const TensorInfo& t = impl_->get(name);
  if (t.shape.size() != 2 || row < 0 || row >= t.shape[0])
    throw InputError(impl_->dir + ": row " + std::to_string(row) + " out of range for tensor '" +
                     name + "'");
  if (t.dtype == DType::Other)
    throw InputError(impl_->dir + ": tensor '" + name + "' has unsupported dtype " + t.dtype_str);
  convert_to_f32(t.dtype, impl_->bytes(t) + row * t.shape[1] * t.elem_size,
                 static_cast<size_t>(t.shape[1]), out);
  if (t.dtype == DType::F8E4M3) impl_->scale_fp8(t, row, row + 1, 0, t.shape[1], out);
  check_finite(out, static_cast<size_t>(t.shape[1]), impl_->dir, name);
}

uint64_t Checkpoint::weight_bytes_read() const { return impl_->bytes_read; }

std::string Checkpoint::headers_sha256() const {
  // File name, then the 8-byte length and the JSON header exactly as stored, file by file.
  std::string bytes;
  for (size_t i = 0; i < impl_->files.size(); ++i) {
    bytes += impl_->file_names[i];
    bytes.push_back('\0');
    bytes.append(impl_->files[i]->data(), impl_->data_start[i]);
  }
  return sha256_hex(bytes.data(), bytes.size());
}

}  // namespace sinkscope
