// A thin RAII layer over the HDF5 C API (in the spirit of HighFive, much smaller).
//
// Every raw HDF5 call in sinkscope goes through the SINKSCOPE_H5_* macro family below: a failed
// call becomes a sinkscope::RuntimeFailure that names the call, its file:line and HDF5's own
// error-stack message, instead of HDF5's default of printing the stack to stderr and returning -1.
// Callers that can blame the input (a damaged file, a missing dataset) catch RuntimeFailure and
// rethrow InputError with the file name; this layer cannot know which failures are the user's.
//
// Internal to src/: public headers stay free of HDF5 types.
#pragma once

#include <hdf5.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace sinkscope::h5 {

namespace detail {

// Throws RuntimeFailure for the failed `call`. Reads HDF5's error stack first, before any other
// HDF5 call can clear it.
[[noreturn]] void throw_call_failure(const char* call, const char* file, int line);

inline bool is_negative(long long value) { return value < 0; }
inline bool is_zero(size_t value) { return value == 0; }

template <typename Result, typename Failed>
Result checked(Result result, Failed failed, const char* call, const char* file, int line) {
  if (failed(result)) throw_call_failure(call, file, line);
  return result;
}

}  // namespace detail

// The one generic check: evaluates `call` once, throws when `failed(result)`, else yields it.
#define SINKSCOPE_H5_CHECKED(call, failed) \
  ::sinkscope::h5::detail::checked((call), (failed), #call, __FILE__, __LINE__)
// Calls that signal failure with a negative herr_t / hid_t / htri_t / enum (nearly all of them).
#define SINKSCOPE_H5_CALL(call) SINKSCOPE_H5_CHECKED(call, ::sinkscope::h5::detail::is_negative)
// Calls that signal failure by returning 0 (H5Tget_size and friends).
#define SINKSCOPE_H5_SIZE(call) SINKSCOPE_H5_CHECKED(call, ::sinkscope::h5::detail::is_zero)

// "<path>: ", the start of every RuntimeFailure message that a File operation throws.
inline std::string file_context_prefix(const std::string& path) { return path + ": "; }

// Turns HDF5's automatic error printing off (once per process): errors reach the user through
// our exceptions, not as a stack dump on stderr from every rank.
void silence_hdf5_errors();

// Owns one HDF5 identifier and closes it with the matching H5*close. Move-only: an id closed
// twice would close whatever object HDF5 handed that number to in between.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);

  Handle() = default;
  Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  ~Handle() { reset(); }
  Handle(Handle&& other) noexcept : id_(other.id_), closer_(other.closer_) {
    other.id_ = H5I_INVALID_HID;
  }
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = other.id_;
      closer_ = other.closer_;
      other.id_ = H5I_INVALID_HID;
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  hid_t id() const { return id_; }
  explicit operator bool() const { return id_ >= 0; }

  // Closes now and reports a failed close (the destructor cannot: it must not throw).
  void close();

 private:
  // Destructor path: a failed close is ignored here on purpose; explicit close() checks it.
  void reset() noexcept;

  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

// The HDF5 memory type for the element types sinkscope stores.
template <typename T>
hid_t native_type() {
  if constexpr (std::is_same_v<T, float>) {
    return H5T_NATIVE_FLOAT;
  } else if constexpr (std::is_same_v<T, double>) {
    return H5T_NATIVE_DOUBLE;
  } else if constexpr (std::is_same_v<T, int32_t>) {
    return H5T_NATIVE_INT32;
  } else if constexpr (std::is_same_v<T, int64_t>) {
    return H5T_NATIVE_INT64;
  } else {
    static_assert(sizeof(T) == 0, "sinkscope stores float, double, int32 and int64 datasets");
  }
}

// The type a dataset of T is stored as: fixed little-endian types, so a file reads the same on
// every machine whatever the writer's byte order.
template <typename T>
hid_t stored_type() {
  if constexpr (std::is_same_v<T, float>) {
    return H5T_IEEE_F32LE;
  } else if constexpr (std::is_same_v<T, double>) {
    return H5T_IEEE_F64LE;
  } else if constexpr (std::is_same_v<T, int32_t>) {
    return H5T_STD_I32LE;
  } else if constexpr (std::is_same_v<T, int64_t>) {
    return H5T_STD_I64LE;
  } else {
    static_assert(sizeof(T) == 0, "sinkscope stores float, double, int32 and int64 datasets");
  }
}

// What a stored dataset holds, enough to check it before reading.
struct DatasetInfo {
  enum class Kind { kInteger, kFloat, kString, kOther };
  Kind kind = Kind::kOther;
  size_t element_bytes = 0;   // stored size of one element (strings: fixed length, or pointer)
  std::vector<size_t> shape;  // empty for a scalar (rank-0) dataset
};

// One open HDF5 file. Paths of datasets and attributes' objects are relative to the root
// ("attention/sink_score"); a leading '/' is accepted too.
class File {
 public:
  // Creates (truncates) `path` for writing.
  static File create(const std::string& path);
  // Opens an existing file read-only.
  static File open_read(const std::string& path);

  File(File&&) noexcept = default;
  File& operator=(File&&) noexcept = default;
  // Closes what is still open (the error path: close() was not reached); see release().
  ~File();

  const std::string& path() const { return path_; }

  // Flushes and closes the file, reporting failures (a full disk shows up here). Writers call
  // it before committing; the destructor's silent close is for error paths only.
  void close();

  // ---- writing ---------------------------------------------------------------------------
  // Creates the groups of `group_path` that do not exist yet ("a/b/c").
  void create_groups(const std::string& group_path);

  // Writes `data` (C order, product(shape) values) as a dataset of rank shape.size() (rank 0 =
  // scalar), creating missing parent groups, with a string attribute `dims` naming the axes.
  // Large datasets are stored chunked and deflate-compressed (readable by any HDF5 reader).
  template <typename T>
  void write_dataset(const std::string& name, const T* data, const std::vector<size_t>& shape,
                     const std::string& dims) {
    write_dataset_raw(name, native_type<T>(), stored_type<T>(), sizeof(T), data, shape, dims);
  }
  template <typename T>
  void write_scalar(const std::string& name, T value) {
    write_dataset(name, &value, {}, "scalar");
  }
  // A 1-D dataset of variable-length UTF-8 strings (what h5py writes for a list of str).
  void write_strings(const std::string& name, const std::vector<std::string>& values,
                     const std::string& dims);

  // Attributes on the root group ("/") or on an object at `object` (a group or dataset).
  void write_string_attribute(const std::string& name, const std::string& value,
                              const std::string& object = "/");
  void write_int_attribute(const std::string& name, int64_t value, const std::string& object = "/");
  void write_double_attribute(const std::string& name, double value,
                              const std::string& object = "/");

  // ---- dimension scales (netCDF-4 dimensions; what xarray and h5netcdf read as dims) --------
  // Turns the 1-D dataset `scale` into a dimension scale named `dimension` (its basename).
  void make_dimension_scale(const std::string& scale, const std::string& dimension);
  // Attaches dimension scale `scale` to axis `axis` of `dataset`.
  void attach_dimension_scale(const std::string& dataset, const std::string& scale, unsigned axis);
  // The names of the dimension scales attached to each axis of `dataset` ("" where none).
  std::vector<std::string> attached_scales(const std::string& dataset) const;

  // ---- reading ---------------------------------------------------------------------------
  // True when every group on the way exists and `name` is a dataset (not a group).
  bool has_dataset(const std::string& name) const;
  bool has_attribute(const std::string& name, const std::string& object = "/") const;

  DatasetInfo dataset_info(const std::string& name) const;

  // Reads the whole dataset converted to T (HDF5 converts between numeric types); `shape`
  // receives its shape when given.
  template <typename T>
  std::vector<T> read_dataset(const std::string& name, std::vector<size_t>* shape = nullptr) const {
    std::vector<size_t> stored_shape = dataset_info(name).shape;
    size_t count = 1;
    for (size_t extent : stored_shape) count *= extent;
    std::vector<T> values(count);
    read_dataset_raw(name, native_type<T>(), values.data(), count);
    if (shape != nullptr) *shape = std::move(stored_shape);
    return values;
  }
  // A 1-D (or scalar) string dataset, variable- or fixed-length, any character set.
  std::vector<std::string> read_strings(const std::string& name) const;

  std::string read_string_attribute(const std::string& name, const std::string& object = "/") const;
  int64_t read_int_attribute(const std::string& name, const std::string& object = "/") const;
  double read_double_attribute(const std::string& name, const std::string& object = "/") const;

 private:
  File(Handle file, std::string path) : file_(std::move(file)), path_(std::move(path)) {}

  // Closes every object of this file that is still open, then the file, ignoring failures.
  void release() noexcept;

  void write_dataset_raw(const std::string& name, hid_t mem_type, hid_t file_type,
                         size_t element_bytes, const void* data, const std::vector<size_t>& shape,
                         const std::string& dims);
  void read_dataset_raw(const std::string& name, hid_t mem_type, void* data, size_t count) const;
  Handle open_object(const std::string& object) const;
  Handle open_attribute(const std::string& name, const std::string& object) const;
  void write_attribute(const std::string& name, const std::string& object, hid_t file_type,
                       hid_t mem_type, const void* value);

  Handle file_;
  std::string path_;
};

}  // namespace sinkscope::h5
