// Hugging Face checkpoints: config.json + model.safetensors or model.safetensors.index.json with
// shards. Files are memory-mapped; a rank converts (and so pages in) only the slices it asks for.
// Every header is validated before anything is trusted (docs/reliability.md lists the rules).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "sinkscope/config.hpp"

namespace sinkscope {

// Computable dtypes; `Other` is a valid safetensors dtype that sinkscope cannot compute with
// (the header still parses; reading such a tensor is refused by name).
// F8E4M3 (OCP FP8 E4M3 "fn": no infinities, S.1111.111 is NaN, max 448) is read with its block
// scales: a 2-D tensor `X` of that dtype needs `X_scale_inv` (F32 [ceil(rows / block),
// ceil(cols / block)], the config's quantization_config.weight_block_size, 128 x 128 by default),
// and every converting read returns value x scale of its block (dequantised at load).
enum class DType { F32, F16, BF16, Other, F8E4M3 };
const char* dtype_name(DType t);
size_t dtype_size(DType t);

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::string dtype_str;  // as stored ("BF16", "F32", "I64", ...)
  size_t elem_size = 4;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range inside the data section of its file
  int file = 0;                 // index into Checkpoint::files()
};

// Parses and validates a safetensors header (the bytes after the 8-byte length) for a file of
// `file_size` bytes. Pure function on untrusted bytes (fuzzed). Throws InputError naming `file`.
std::vector<TensorInfo> parse_safetensors_header(const char* header, size_t header_len,
                                                 uint64_t data_len, const std::string& file);

// Parses model.safetensors.index.json: returns tensor name -> shard file name. Throws InputError.
std::vector<std::pair<std::string, std::string>> parse_safetensors_index(
    const std::string& json_text, const std::string& file);

// A slice of a tensor exactly as stored (no conversion): `rows` rows of `cols` elements, row r at
// data + r * row_pitch. Points into the checkpoint's mapping (valid while the Checkpoint lives).
struct StoredSlice {
  const char* data = nullptr;
  DType dtype = DType::F32;
  size_t elem_size = 4;
  int64_t rows = 0, cols = 0;
  size_t row_pitch = 0;  // bytes from one row to the next
  size_t bytes() const { return static_cast<size_t>(rows * cols) * elem_size; }
  bool contiguous() const {
    return rows <= 1 || row_pitch == static_cast<size_t>(cols) * elem_size;
  }
};

class Checkpoint {
 public:
  // Opens `model_dir`: parses config.json, maps and validates every safetensors file.
  static Checkpoint open(const std::string& model_dir);

  Checkpoint(Checkpoint&&) noexcept;
  Checkpoint& operator=(Checkpoint&&) noexcept;
  ~Checkpoint();

  const std::string& dir() const;
  const ModelConfig& config() const;
  const std::vector<std::string>& files() const;
  const std::vector<TensorInfo>& tensors() const;
  const TensorInfo* find(const std::string& name) const;

  // Reads rows [row_begin, row_end) of tensor `name` (1-D: elements), converted to fp32, into out.
  void read_rows(const std::string& name, int64_t row_begin, int64_t row_end, float* out) const;
  // Reads columns [col_begin, col_end) of every row of a 2-D tensor, converted to fp32
  // (out is [rows, col_end - col_begin], row-major).
  void read_cols(const std::string& name, int64_t col_begin, int64_t col_end, float* out) const;
  // Reads the block rows [row_begin, row_end) x columns [col_begin, col_end) of the 2-D view
  // [prod(shape[:-1]), shape[-1]] of a tensor, converted to fp32 (row-major into out).
  void read_block(const std::string& name, int64_t row_begin, int64_t row_end, int64_t col_begin,
                  int64_t col_end, float* out) const;
  // Rows [row_begin, row_end) of a tensor's 2-D view (1-D: elements, as rows of width 1) as stored,
  // without conversion: rows are contiguous, so the slice is one byte range. Every value is checked
  // to be finite and the bytes count as read (weight_bytes_read), as with read_rows.
  StoredSlice stored_rows(const std::string& name, int64_t row_begin, int64_t row_end) const;
  // The block rows [row_begin, row_end) x columns [col_begin, col_end) of the 2-D view as stored
  // (row_pitch is the full row; contiguous when the block spans whole rows). Checked and counted
  // like read_block.
  StoredSlice stored_block(const std::string& name, int64_t row_begin, int64_t row_end,
                           int64_t col_begin, int64_t col_end) const;
  // stored_block without the finite check, for a caller that checks the values as it copies them
  // (any_non_finite) and reports the first non-finite one with throw_non_finite: the CUDA loader
  // checks its staged pieces, so the mapped bytes are read once. Validated and counted as read
  // like stored_block.
  StoredSlice unchecked_block(const std::string& name, int64_t row_begin, int64_t row_end,
                              int64_t col_begin, int64_t col_end) const;
  // The rows of stored_rows, unchecked like unchecked_block.
  StoredSlice unchecked_rows(const std::string& name, int64_t row_begin, int64_t row_end) const;
  // The InputError of a read that met the non-finite `value` at `element` of its slice of tensor
  // `name` (the message of stored_block and read_rows).
  [[noreturn]] void throw_non_finite(const std::string& name, float value, size_t element) const;
  // Rows [row_begin, row_end) of a tensor's 2-D view exactly as stored, of any dtype (packed
  // formats that the caller decodes, e.g. MXFP4's uint8 blocks and scales): not checked, counted
  // as read like stored_rows.
  StoredSlice raw_rows(const std::string& name, int64_t row_begin, int64_t row_end) const;
  // Tells the kernel that rows [row_begin, row_end) of `name` will be read soon and in order
  // (madvise MADV_WILLNEED + MADV_SEQUENTIAL on their pages): the disk reads ahead of the
  // conversion. Returns the bytes advised. Out-of-range rows are ignored (the read reports them).
  uint64_t advise_rows(const std::string& name, int64_t row_begin, int64_t row_end) const;

  // Copies the n stored bytes at `at` (inside a StoredSlice of this checkpoint, e.g.
  // unchecked_block's data + r * row_pitch) into out with pread(2), not through the mapping: the
  // kernel copies from the page cache in large reads and the mapping is not faulted in page by
  // page. Thread-safe. Throws InputError on a read error or a file that ends early.
  void read_stored(const char* at, size_t n, void* out) const;
  // Asks the kernel to start reading the file bytes behind [at, at + n) (posix_fadvise WILLNEED),
  // for a read_stored that follows. Advice only.
  void prefetch_stored(const char* at, size_t n) const;

  // Threads converting in read_rows/read_cols/read_block/stored_* (OpenMP over rows and chunks);
  // 0 (the default) = omp_get_max_threads(). Results do not depend on it. The backends set it to
  // --threads before they load.
  void set_read_threads(int threads) const;
  // The threads the reads use now (set_read_threads, or OpenMP's count).
  int read_threads() const;
  // Called after every read with the bytes read so far (weight_bytes_read), for load progress.
  void set_read_observer(std::function<void(uint64_t)> observer) const;

  // Reads one row of a 2-D tensor (embedding lookup) without counting it as a weight load.
  void read_row(const std::string& name, int64_t row, float* out) const;

  // Bytes of stored tensor data converted so far by read_rows/read_cols (the sharded-load measure).
  uint64_t weight_bytes_read() const;

  // Hex SHA-256 over every safetensors file's name, length prefix and JSON header, in the order of
  // files(): identifies the checkpoint's tensors (names, shapes, offsets) without reading the
  // weights (the `checkpoint_headers_sha256` attribute).
  std::string headers_sha256() const;

 private:
  struct Impl;
  explicit Checkpoint(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Converts `n` stored values of dtype `t` to fp32 (one thread).
void convert_to_f32(DType t, const void* src, size_t n, float* dst);
// The same conversion split over `threads` OpenMP threads (0 = omp_get_max_threads()) in chunks;
// bit for bit the same result as convert_to_f32.
void convert_to_f32_parallel(DType t, const void* src, size_t n, float* dst, int threads = 0);
// Index of the first non-finite stored value among n values of dtype t, or n when all are finite
// (inspects the exponent bits; no conversion).
size_t first_non_finite(DType t, const void* src, size_t n);
// Whether any of n stored values of dtype t is inf or NaN: the exponent bits, OR-reduced without
// an early exit so that the loop vectorises (first_non_finite then finds the first one).
bool any_non_finite(DType t, const void* src, size_t n);
// One FP8 E4M3 (fn) byte as fp32, exactly (the format is a subset of fp32).
float e4m3_to_f32(uint8_t x);
// fp32 -> FP8 E4M3 (fn), round to nearest even, saturating at +-448 (NaN stays NaN).
uint8_t f32_to_e4m3(float x);
// The block-scale tensor of an FP8 weight: `name` + "_scale_inv".
std::string fp8_scale_name(const std::string& weight_name);
// Checks that FP8 tensor `t` of `ckpt` is 2-D and has its scale tensor, F32 with the block grid's
// shape; throws InputError naming the tensor otherwise.
void check_fp8_scale(const Checkpoint& ckpt, const TensorInfo& t);
// fp32 -> bf16 (round to nearest even; NaN stays a quiet NaN), used by `synth` and the writer.
// Inline so that loops over it vectorise.
inline uint16_t f32_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float bf16_to_f32(uint16_t x);

// A safetensors file written in pieces: the header (names, dtypes, shapes, data offsets, and
// `metadata` beside "format": "pt") is written when the file is created, then every tensor's bytes
// at their offsets, in any order and from any number of threads (pwrite). The data section follows
// the tensors' order. A file that was not finish()ed is removed by the destructor.
class SafetensorsFileWriter {
 public:
  struct Tensor {
    std::string name;
    DType dtype;  // F32 or BF16
    std::vector<int64_t> shape;
  };
  SafetensorsFileWriter(std::string path, const std::vector<Tensor>& tensors,
                        const std::map<std::string, std::string>& metadata = {});
  SafetensorsFileWriter(const SafetensorsFileWriter&) = delete;
  SafetensorsFileWriter& operator=(const SafetensorsFileWriter&) = delete;
  ~SafetensorsFileWriter();

  // Bytes of tensor i's data.
  uint64_t tensor_bytes(size_t i) const { return end_[i] - begin_[i]; }
  // Writes n bytes at byte `offset` of tensor i's data; thread-safe. Throws InputError (the path
  // and the system's reason) when the write fails, e.g. on a full disk.
  void write(size_t i, uint64_t offset, const void* bytes, size_t n) const;
  // Closes the file. Throws InputError when fewer bytes were written than the data section holds
  // or the close fails (the file is removed then).
  void finish();

 private:
  void write_at(const char* p, size_t n, uint64_t pos) const;  // all n bytes, or InputError
  std::string path_;
  int fd_ = -1;
  uint64_t data_start_ = 0;            // 8 + header length
  std::vector<uint64_t> begin_, end_;  // byte ranges in the data section
  mutable std::atomic<uint64_t> written_{0};
};

// Writes a single-file safetensors checkpoint (used by the tests).
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const float* data;  // fp32 values, converted to dtype on write
};
// Values are converted in parallel (OpenMP) and written in large chunks; the file is the same bytes
// whatever the thread count.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors);

}  // namespace sinkscope
