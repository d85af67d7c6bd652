#include "io/hdf5_file.hpp"

#include <hdf5_hl.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "sinkscope/error.hpp"

// H5Pset_file_locking appeared in 1.10.7 and 1.12.1 (not in 1.12.0).
#if (H5_VERS_MAJOR == 1 && H5_VERS_MINOR == 10 && H5_VERS_RELEASE >= 7) || H5_VERSION_GE(1, 12, 1)
#define SINKSCOPE_H5_HAVE_FILE_LOCKING_PROPERTY 1
#else
#define SINKSCOPE_H5_HAVE_FILE_LOCKING_PROPERTY 0
#endif

namespace sinkscope::h5 {

namespace {

// Datasets at least this large are chunked and compressed: p0_per_query and attr_expert reach
// hundreds of MB for a 30B model, while small datasets stay contiguous (cheapest to read).
constexpr size_t kCompressFromBytes = 256 * 1024;
// Target chunk size: large enough for deflate to work well, small enough that reading a slice
// in Python does not inflate much more than it needs.
constexpr size_t kChunkBytes = 1024 * 1024;
// Deflate level 1 with byte shuffle: most of the gain on float data for little CPU time.
constexpr unsigned kDeflateLevel = 1;

// Keeps a message on one line (the CLI prints exactly one line per error).
std::string one_line(std::string text) {
  std::replace(text.begin(), text.end(), '\n', ' ');
  return text;
}

// "src/io/hdf5_file.cpp" rather than the builder's absolute path.
std::string short_source_path(const char* file) {
  const std::string path(file);
  const size_t src = path.rfind("src/");
  return src == std::string::npos ? path : path.substr(src);
}

// The function name of a call's source text: "H5Dcreate2(file, ...)" -> "H5Dcreate2". The
// location (file:line) identifies the exact call; the arguments as text would not help more.
std::string call_name(const char* call) {
  const std::string text(call);
  return text.substr(0, text.find('('));
}

struct ErrorStackSummary {
  std::string outermost;  // the API function the caller called, and its message
  std::string innermost;  // where HDF5 detected the problem (often the actual reason)
};

herr_t collect_error(unsigned position, const H5E_error2_t* error, void* client) {
  auto* summary = static_cast<ErrorStackSummary*>(client);
  std::string message = error->func_name != nullptr ? std::string(error->func_name) + "(): " : "";
  message += (error->desc != nullptr && error->desc[0] != '\0') ? error->desc : "(no description)";
  if (position == 0) summary->outermost = message;
  summary->innermost = message;  // the walk goes downward: the last entry is the innermost
  return 0;
}

// Normalises "/a/b" and "a/b" to "a/b"; the root is ".".
std::string relative(const std::string& name) {
  const size_t first = name.find_first_not_of('/');
  return first == std::string::npos ? "." : name.substr(first);
}

// A link-creation property list that creates missing intermediate groups, so writing
// "attention/sink_score" creates "attention" on demand.
Handle intermediate_groups_lcpl() {
  Handle lcpl(SINKSCOPE_H5_CALL(H5Pcreate(H5P_LINK_CREATE)), H5Pclose);
  SINKSCOPE_H5_CALL(H5Pset_create_intermediate_group(lcpl.id(), 1));
  return lcpl;
}

// A variable-length UTF-8 string type: what h5py reads back as `str`.
Handle utf8_string_type() {
  Handle type(SINKSCOPE_H5_CALL(H5Tcopy(H5T_C_S1)), H5Tclose);
  SINKSCOPE_H5_CALL(H5Tset_size(type.id(), H5T_VARIABLE));
  SINKSCOPE_H5_CALL(H5Tset_cset(type.id(), H5T_CSET_UTF8));
  return type;
}

Handle file_access_properties() {
  Handle fapl(SINKSCOPE_H5_CALL(H5Pcreate(H5P_FILE_ACCESS)), H5Pclose);
#if SINKSCOPE_H5_HAVE_FILE_LOCKING_PROPERTY
  // Keep HDF5's file locking where the filesystem supports it, but do not fail where it does
  // not (NFS and some Lustre mounts): otherwise every open there fails with "unable to lock file".
  SINKSCOPE_H5_CALL(H5Pset_file_locking(fapl.id(), 1, 1));
#endif
  return fapl;
}

std::vector<hsize_t> to_hsize(const std::vector<size_t>& shape) {
  return std::vector<hsize_t>(shape.begin(), shape.end());
}

size_t element_count(const std::vector<size_t>& shape) {
  size_t count = 1;
  for (size_t extent : shape) count *= extent;
  return count;
}

// Chunk shape of about kChunkBytes: keeps the trailing (fastest-varying) axes whole and halves
// the leading axes, so a chunk is a contiguous block of the C-order array.
std::vector<hsize_t> chunk_shape(const std::vector<size_t>& shape, size_t element_bytes) {
  std::vector<hsize_t> chunk = to_hsize(shape);
  size_t bytes = element_count(shape) * element_bytes;
  for (size_t axis = 0; axis < chunk.size() && bytes > kChunkBytes; ++axis) {
    while (chunk[axis] > 1 && bytes > kChunkBytes) {
      const hsize_t halved = (chunk[axis] + 1) / 2;
      bytes = bytes / chunk[axis] * halved;
      chunk[axis] = halved;
    }
  }
  return chunk;
}

Handle dataset_creation_properties(const std::vector<size_t>& shape, size_t element_bytes) {
  Handle dcpl(SINKSCOPE_H5_CALL(H5Pcreate(H5P_DATASET_CREATE)), H5Pclose);
  const size_t bytes = element_count(shape) * element_bytes;
  if (shape.empty() || bytes < kCompressFromBytes) return dcpl;
  if (SINKSCOPE_H5_CALL(H5Zfilter_avail(H5Z_FILTER_DEFLATE)) <= 0) return dcpl;
  const std::vector<hsize_t> chunk = chunk_shape(shape, element_bytes);
  SINKSCOPE_H5_CALL(H5Pset_chunk(dcpl.id(), static_cast<int>(chunk.size()), chunk.data()));
  SINKSCOPE_H5_CALL(H5Pset_shuffle(dcpl.id()));
  SINKSCOPE_H5_CALL(H5Pset_deflate(dcpl.id(), kDeflateLevel));
  return dcpl;
}

Handle simple_space(const std::vector<size_t>& shape) {
  if (shape.empty()) return Handle(SINKSCOPE_H5_CALL(H5Screate(H5S_SCALAR)), H5Sclose);
  const std::vector<hsize_t> dims = to_hsize(shape);
  return Handle(
      SINKSCOPE_H5_CALL(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr)),
      H5Sclose);
}

std::vector<size_t> space_shape(hid_t space) {
  const int rank = SINKSCOPE_H5_CALL(H5Sget_simple_extent_ndims(space));
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  if (rank > 0) SINKSCOPE_H5_CALL(H5Sget_simple_extent_dims(space, dims.data(), nullptr));
  return std::vector<size_t>(dims.begin(), dims.end());
}

// Reads every string of a string-typed dataset or attribute. `read(mem_type, buffer)` performs
// the H5Dread/H5Aread; variable- and fixed-length strings need different buffers.
template <typename Read>
std::vector<std::string> read_string_values(hid_t stored_type, hid_t space, Read read) {
  if (SINKSCOPE_H5_CALL(H5Tget_class(stored_type)) != H5T_STRING) {
    throw RuntimeFailure("holds numbers, not strings");
  }
  const size_t count = element_count(space_shape(space));
  std::vector<std::string> values;
  values.reserve(count);
  if (count == 0) return values;
  const H5T_cset_t cset = SINKSCOPE_H5_CALL(H5Tget_cset(stored_type));

  if (SINKSCOPE_H5_CALL(H5Tis_variable_str(stored_type)) > 0) {
    Handle mem_type(SINKSCOPE_H5_CALL(H5Tcopy(H5T_C_S1)), H5Tclose);
    SINKSCOPE_H5_CALL(H5Tset_size(mem_type.id(), H5T_VARIABLE));
    SINKSCOPE_H5_CALL(H5Tset_cset(mem_type.id(), cset));
    std::vector<char*> pointers(count, nullptr);
    read(mem_type.id(), pointers.data());
    for (const char* p : pointers) values.emplace_back(p != nullptr ? p : "");
      // The library allocated each string; hand them back the way it asks.
#if H5_VERSION_GE(1, 12, 0)
    SINKSCOPE_H5_CALL(H5Treclaim(mem_type.id(), space, H5P_DEFAULT, pointers.data()));
#else
    SINKSCOPE_H5_CALL(H5Dvlen_reclaim(mem_type.id(), space, H5P_DEFAULT, pointers.data()));
#endif
    return values;
  }

  // Fixed length: read in the stored layout (no conversion), then cut at the padding.
  const size_t length = SINKSCOPE_H5_SIZE(H5Tget_size(stored_type));
  const H5T_str_t pad = SINKSCOPE_H5_CALL(H5Tget_strpad(stored_type));
  Handle mem_type(SINKSCOPE_H5_CALL(H5Tcopy(stored_type)), H5Tclose);
  std::vector<char> buffer(count * length);
  read(mem_type.id(), buffer.data());
  for (size_t i = 0; i < count; ++i) {
    std::string value(buffer.data() + i * length, length);
    value.resize(std::min(value.find('\0'), value.size()));
    if (pad == H5T_STR_SPACEPAD) value.erase(value.find_last_not_of(' ') + 1);
    values.push_back(std::move(value));
  }
  return values;
}

// Prefixes the failure of one File operation with the file and what was being done:
// "<file>: cannot write dataset /a/b: H5Dcreate2 failed at ...", the compiler-style order that
// lets callers who name the file themselves strip it (see file_context_prefix).
template <typename Body>
auto in_context(const std::string& what, const std::string& path, Body&& body) {
  try {
    return body();
  } catch (const RuntimeFailure& e) {
    throw RuntimeFailure(file_context_prefix(path) + what + ": " + e.what());
  }
}

// How an object path appears in messages: "/" for the root, "/a/b" otherwise.
std::string shown(const std::string& object) {
  const std::string name = relative(object);
  return name == "." ? "/" : "/" + name;
}

}  // namespace

namespace detail {

void throw_call_failure(const char* call, const char* file, int line) {
  // First, before anything else touches HDF5: every API call clears the error stack.
  ErrorStackSummary summary;
  const herr_t walked = H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_error, &summary);
  std::string message =
      call_name(call) + " failed at " + short_source_path(file) + ":" + std::to_string(line) + ": ";
  if (walked < 0 || summary.outermost.empty()) {
    message += "HDF5 left no error message";
  } else {
    message += summary.outermost;
    if (summary.innermost != summary.outermost) message += " [" + summary.innermost + "]";
  }
  throw RuntimeFailure(one_line(message));
}

}  // namespace detail

void silence_hdf5_errors() {
  static std::once_flag once;
  std::call_once(once, [] {
    // No cleanup at exit: HDF5's exit handler flushes files still open, and after a failed write
    // (a full disk) it crashes doing so (HDF5 1.10: H5F__close_cb). Every writer here closes its
    // file explicitly before committing it, so the handler has nothing useful left to do. Only
    // effective before the library's first call; later it fails, which changes nothing.
    H5dont_atexit();
    SINKSCOPE_H5_CALL(H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr));
  });
}

void Handle::close() {
  if (id_ < 0) return;
  const hid_t id = std::exchange(id_, H5I_INVALID_HID);
  const Closer close = closer_;  // named for the message: "close failed at ...: H5Fclose(): ..."
  SINKSCOPE_H5_CALL(close(id));
}

void Handle::reset() noexcept {
  if (id_ < 0) return;
  // Unchecked on purpose: reached from destructors, possibly while unwinding another error.
  closer_(std::exchange(id_, H5I_INVALID_HID));
}

// ---- File: opening and closing ------------------------------------------------------------

File File::create(const std::string& path) {
  silence_hdf5_errors();
  return in_context("cannot create HDF5 file", path, [&] {
    Handle fapl = file_access_properties();
    // With the default ("weak") degree H5Fclose succeeds while any object is still open and the
    // file is only completed later; the writers then would commit an unfinished file. "Semi"
    // makes that close fail instead, so the commit is abandoned.
    SINKSCOPE_H5_CALL(H5Pset_fclose_degree(fapl.id(), H5F_CLOSE_SEMI));
    Handle file(SINKSCOPE_H5_CALL(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.id())),
                H5Fclose);
    return File(std::move(file), path);
  });
}

File File::open_read(const std::string& path) {
  silence_hdf5_errors();
  return in_context("cannot open HDF5 file", path, [&] {
    Handle fapl = file_access_properties();
    Handle file(SINKSCOPE_H5_CALL(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.id())), H5Fclose);
    return File(std::move(file), path);
  });
}

void File::close() {
  in_context("cannot close HDF5 file", path_, [&] { file_.close(); });
}

File::~File() { release(); }

void File::release() noexcept {
  if (!file_) return;
  // A write that failed part way (a full disk) leaves objects open: a failed H5Dclose keeps its
  // dataset. With the "semi" close degree H5Fclose then fails and the file stays open. Close
  // whatever is left first, ignoring failures: on this path the caller reports the first error.
  const unsigned types =
      H5F_OBJ_DATASET | H5F_OBJ_GROUP | H5F_OBJ_DATATYPE | H5F_OBJ_ATTR | H5F_OBJ_LOCAL;
  const ssize_t count = H5Fget_obj_count(file_.id(), types);
  if (count > 0) {
    std::vector<hid_t> ids(static_cast<size_t>(count));
    const ssize_t listed = H5Fget_obj_ids(file_.id(), types, ids.size(), ids.data());
    for (ssize_t i = 0; i < listed; ++i) {
      // Every reference the application holds; stop when the id is gone or a close fails.
      while (H5Iis_valid(ids[i]) > 0 && H5Idec_ref(ids[i]) >= 0) {
      }
    }
  }
  file_ = Handle();  // H5Fclose, unchecked
}

// ---- File: writing ------------------------------------------------------------------------

void File::create_groups(const std::string& group_path) {
  const std::string name = relative(group_path);
  if (name == "." || has_dataset(name)) return;  // a dataset there makes H5Gcreate2 fail below
  in_context("cannot create group " + shown(name), path_, [&] {
    // Walk the path: create only what is missing, so calling this twice is harmless.
    size_t end = 0;
    while (end != std::string::npos) {
      end = name.find('/', end + 1);
      const std::string prefix = name.substr(0, end);
      if (SINKSCOPE_H5_CALL(H5Lexists(file_.id(), prefix.c_str(), H5P_DEFAULT)) > 0) continue;
      Handle group(SINKSCOPE_H5_CALL(H5Gcreate2(file_.id(), prefix.c_str(), H5P_DEFAULT,
                                                H5P_DEFAULT, H5P_DEFAULT)),
                   H5Gclose);
    }
  });
}

void File::write_dataset_raw(const std::string& dataset, hid_t mem_type, hid_t file_type,
                             size_t element_bytes, const void* data,
                             const std::vector<size_t>& shape, const std::string& dims) {
  const std::string name = relative(dataset);
  in_context("cannot write dataset " + shown(name), path_, [&] {
    Handle space = simple_space(shape);
    Handle lcpl = intermediate_groups_lcpl();
    Handle dcpl = dataset_creation_properties(shape, element_bytes);
    Handle set(SINKSCOPE_H5_CALL(H5Dcreate2(file_.id(), name.c_str(), file_type, space.id(),
                                            lcpl.id(), dcpl.id(), H5P_DEFAULT)),
               H5Dclose);
    // HDF5 rejects a null buffer even for zero elements; an empty dataset needs no write.
    if (element_count(shape) > 0) {
      SINKSCOPE_H5_CALL(H5Dwrite(set.id(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data));
    }
    set.close();
  });
  write_string_attribute("dims", dims, name);
}

void File::write_strings(const std::string& dataset, const std::vector<std::string>& values,
                         const std::string& dims) {
  const std::string name = relative(dataset);
  in_context("cannot write dataset " + shown(name), path_, [&] {
    Handle type = utf8_string_type();
    Handle space = simple_space({values.size()});
    Handle lcpl = intermediate_groups_lcpl();
    Handle set(SINKSCOPE_H5_CALL(H5Dcreate2(file_.id(), name.c_str(), type.id(), space.id(),
                                            lcpl.id(), H5P_DEFAULT, H5P_DEFAULT)),
               H5Dclose);
    std::vector<const char*> pointers;
    pointers.reserve(values.size());
    for (const std::string& value : values) pointers.push_back(value.c_str());
    if (!pointers.empty()) {
      SINKSCOPE_H5_CALL(
          H5Dwrite(set.id(), type.id(), H5S_ALL, H5S_ALL, H5P_DEFAULT, pointers.data()));
    }
    set.close();
  });
  write_string_attribute("dims", dims, name);
}

void File::write_attribute(const std::string& name, const std::string& object, hid_t file_type,
                           hid_t mem_type, const void* value) {
  const std::string where = relative(object);
  in_context("cannot write attribute " + name + " of " + shown(where), path_, [&] {
    Handle target = open_object(where);
    // Rewriting an attribute replaces it (H5Acreate2 would fail on an existing name).
    if (SINKSCOPE_H5_CALL(H5Aexists(target.id(), name.c_str())) > 0) {
      SINKSCOPE_H5_CALL(H5Adelete(target.id(), name.c_str()));
    }
    Handle space = simple_space({});
    Handle attribute(SINKSCOPE_H5_CALL(H5Acreate2(target.id(), name.c_str(), file_type, space.id(),
                                                  H5P_DEFAULT, H5P_DEFAULT)),
                     H5Aclose);
    SINKSCOPE_H5_CALL(H5Awrite(attribute.id(), mem_type, value));
    attribute.close();
  });
}

void File::write_string_attribute(const std::string& name, const std::string& value,
                                  const std::string& object) {
  Handle type = utf8_string_type();
  const char* text = value.c_str();
  write_attribute(name, object, type.id(), type.id(), &text);
}

void File::write_int_attribute(const std::string& name, int64_t value, const std::string& object) {
  write_attribute(name, object, stored_type<int64_t>(), H5T_NATIVE_INT64, &value);
}

void File::write_double_attribute(const std::string& name, double value,
                                  const std::string& object) {
  write_attribute(name, object, stored_type<double>(), H5T_NATIVE_DOUBLE, &value);
}

// ---- File: dimension scales ---------------------------------------------------------------

void File::make_dimension_scale(const std::string& scale, const std::string& dimension) {
  const std::string name = relative(scale);
  in_context("cannot make " + shown(name) + " a dimension scale", path_, [&] {
    Handle set(SINKSCOPE_H5_CALL(H5Dopen2(file_.id(), name.c_str(), H5P_DEFAULT)), H5Dclose);
    SINKSCOPE_H5_CALL(H5DSset_scale(set.id(), dimension.c_str()));
    set.close();
  });
}

void File::attach_dimension_scale(const std::string& dataset, const std::string& scale,
                                  unsigned axis) {
  const std::string name = relative(dataset);
  const std::string scale_name = relative(scale);
  in_context("cannot attach dimension scale " + shown(scale_name) + " to axis " +
                 std::to_string(axis) + " of " + shown(name),
             path_, [&] {
               Handle set(SINKSCOPE_H5_CALL(H5Dopen2(file_.id(), name.c_str(), H5P_DEFAULT)),
                          H5Dclose);
               Handle dim(SINKSCOPE_H5_CALL(H5Dopen2(file_.id(), scale_name.c_str(), H5P_DEFAULT)),
                          H5Dclose);
               SINKSCOPE_H5_CALL(H5DSattach_scale(set.id(), dim.id(), axis));
               dim.close();
               set.close();
             });
}

namespace {

// H5DSiterate_scales visitor: the name of the first scale attached to the axis.
herr_t first_scale_name(hid_t, unsigned, hid_t scale, void* client) {
  auto* name = static_cast<std::string*>(client);
  const ssize_t length = H5DSget_scale_name(scale, nullptr, 0);
  if (length <= 0) return 1;  // a scale without a name: stop, leaving ""
  std::vector<char> buffer(static_cast<size_t>(length) + 1, '\0');
  if (H5DSget_scale_name(scale, buffer.data(), buffer.size()) < 0) return -1;
  *name = buffer.data();
  return 1;
}

}  // namespace

std::vector<std::string> File::attached_scales(const std::string& dataset) const {
  const std::string name = relative(dataset);
  return in_context("cannot list the dimension scales of " + shown(name), path_, [&] {
    Handle set(SINKSCOPE_H5_CALL(H5Dopen2(file_.id(), name.c_str(), H5P_DEFAULT)), H5Dclose);
    Handle space(SINKSCOPE_H5_CALL(H5Dget_space(set.id())), H5Sclose);
    const size_t rank = space_shape(space.id()).size();
    std::vector<std::string> names(rank);
    for (size_t axis = 0; axis < rank; ++axis) {
      if (SINKSCOPE_H5_CALL(H5DSget_num_scales(set.id(), static_cast<unsigned>(axis))) <= 0)
        continue;
      int index = 0;
      SINKSCOPE_H5_CALL(H5DSiterate_scales(set.id(), static_cast<unsigned>(axis), &index,
                                           first_scale_name, &names[axis]));
    }
    return names;
  });
}

// ---- File: reading ------------------------------------------------------------------------

Handle File::open_object(const std::string& object) const {
  const std::string name = relative(object);
  return Handle(SINKSCOPE_H5_CALL(H5Oopen(file_.id(), name.c_str(), H5P_DEFAULT)), H5Oclose);
}

bool File::has_dataset(const std::string& dataset) const {
  const std::string name = relative(dataset);
  if (name == ".") return false;
  return in_context("cannot look up " + shown(name), path_, [&] {
    // H5Lexists fails (rather than answering false) when an intermediate group is missing,
    // so test each prefix in turn.
    size_t end = 0;
    while (end != std::string::npos) {
      end = name.find('/', end + 1);
      const std::string prefix = name.substr(0, end);
      if (SINKSCOPE_H5_CALL(H5Lexists(file_.id(), prefix.c_str(), H5P_DEFAULT)) <= 0) {
        return false;
      }
    }
    // A dangling soft link exists as a link but cannot be opened.
    if (SINKSCOPE_H5_CALL(H5Oexists_by_name(file_.id(), name.c_str(), H5P_DEFAULT)) <= 0) {
      return false;
    }
    Handle object = open_object(name);
    return SINKSCOPE_H5_CALL(H5Iget_type(object.id())) == H5I_DATASET;
  });
}

bool File::has_attribute(const std::string& name, const std::string& object) const {
  const std::string where = relative(object);
  if (where != "." && !has_dataset(where)) {
    // Groups: a missing object means a missing attribute, not an error.
    const bool exists = in_context("cannot look up " + shown(where), path_, [&] {
      return SINKSCOPE_H5_CALL(H5Lexists(file_.id(), where.c_str(), H5P_DEFAULT)) > 0;
    });
    if (!exists) return false;
  }
  return in_context("cannot look up attribute " + name + " of " + shown(where), path_, [&] {
    Handle target = open_object(where);
    return SINKSCOPE_H5_CALL(H5Aexists(target.id(), name.c_str())) > 0;
  });
}

DatasetInfo File::dataset_info(const std::string& dataset) const {
  const std::string name = relative(dataset);
  return in_context("cannot inspect dataset " + shown(name), path_, [&] {
    Handle set(SINKSCOPE_H5_CALL(H5Dopen2(file_.id(), name.c_str(), H5P_DEFAULT)), H5Dclose);
    Handle type(SINKSCOPE_H5_CALL(H5Dget_type(set.id())), H5Tclose);
    Handle space(SINKSCOPE_H5_CALL(H5Dget_space(set.id())), H5Sclose);
    DatasetInfo info;
    switch (SINKSCOPE_H5_CALL(H5Tget_class(type.id()))) {
      case H5T_INTEGER:
        info.kind = DatasetInfo::Kind::kInteger;
        break;
      case H5T_FLOAT:
        info.kind = DatasetInfo::Kind::kFloat;
        break;
      case H5T_STRING:
        info.kind = DatasetInfo::Kind::kString;
        break;
      default:
        info.kind = DatasetInfo::Kind::kOther;
    }
    info.element_bytes = SINKSCOPE_H5_SIZE(H5Tget_size(type.id()));
    info.shape = space_shape(space.id());
    return info;
  });
}

void File::read_dataset_raw(const std::string& dataset, hid_t mem_type, void* data,
                            size_t count) const {
  const std::string name = relative(dataset);
  in_context("cannot read dataset " + shown(name), path_, [&] {
    Handle set(SINKSCOPE_H5_CALL(H5Dopen2(file_.id(), name.c_str(), H5P_DEFAULT)), H5Dclose);
    Handle space(SINKSCOPE_H5_CALL(H5Dget_space(set.id())), H5Sclose);
    if (element_count(space_shape(space.id())) != count) {
      throw RuntimeFailure("dataset changed size while being read");
    }
    if (count > 0) {
      SINKSCOPE_H5_CALL(H5Dread(set.id(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data));
    }
  });
}

std::vector<std::string> File::read_strings(const std::string& dataset) const {
  const std::string name = relative(dataset);
  return in_context("cannot read string dataset " + shown(name), path_, [&] {
    Handle set(SINKSCOPE_H5_CALL(H5Dopen2(file_.id(), name.c_str(), H5P_DEFAULT)), H5Dclose);
    Handle type(SINKSCOPE_H5_CALL(H5Dget_type(set.id())), H5Tclose);
    Handle space(SINKSCOPE_H5_CALL(H5Dget_space(set.id())), H5Sclose);
    return read_string_values(type.id(), space.id(), [&](hid_t mem_type, void* buffer) {
      SINKSCOPE_H5_CALL(H5Dread(set.id(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buffer));
    });
  });
}

Handle File::open_attribute(const std::string& name, const std::string& object) const {
  const std::string where = relative(object);
  return Handle(SINKSCOPE_H5_CALL(H5Aopen_by_name(file_.id(), where.c_str(), name.c_str(),
                                                  H5P_DEFAULT, H5P_DEFAULT)),
                H5Aclose);
}

std::string File::read_string_attribute(const std::string& name, const std::string& object) const {
  return in_context("cannot read attribute " + name + " of " + shown(object), path_, [&] {
    Handle attribute = open_attribute(name, object);
    Handle type(SINKSCOPE_H5_CALL(H5Aget_type(attribute.id())), H5Tclose);
    Handle space(SINKSCOPE_H5_CALL(H5Aget_space(attribute.id())), H5Sclose);
    std::vector<std::string> values =
        read_string_values(type.id(), space.id(), [&](hid_t mem_type, void* buffer) {
          SINKSCOPE_H5_CALL(H5Aread(attribute.id(), mem_type, buffer));
        });
    if (values.size() != 1)
      throw RuntimeFailure("holds " + std::to_string(values.size()) + " strings, expected one");
    return values.front();
  });
}

namespace {

// Reads a one-element numeric attribute as `mem_type`; `allowed` says which stored classes
// convert without surprise (an integer attribute read as double is fine, the reverse is not).
void read_numeric_attribute(hid_t attribute, hid_t mem_type, bool allow_float, void* value) {
  Handle type(SINKSCOPE_H5_CALL(H5Aget_type(attribute)), H5Tclose);
  const H5T_class_t type_class = SINKSCOPE_H5_CALL(H5Tget_class(type.id()));
  if (type_class != H5T_INTEGER && !(allow_float && type_class == H5T_FLOAT)) {
    throw RuntimeFailure(allow_float ? "is not a number" : "is not an integer");
  }
  Handle space(SINKSCOPE_H5_CALL(H5Aget_space(attribute)), H5Sclose);
  if (element_count(space_shape(space.id())) != 1) throw RuntimeFailure("is not a single value");
  SINKSCOPE_H5_CALL(H5Aread(attribute, mem_type, value));
}

}  // namespace

int64_t File::read_int_attribute(const std::string& name, const std::string& object) const {
  return in_context("cannot read attribute " + name + " of " + shown(object), path_, [&] {
    Handle attribute = open_attribute(name, object);
    int64_t value = 0;
    read_numeric_attribute(attribute.id(), H5T_NATIVE_INT64, false, &value);
    return value;
  });
}

double File::read_double_attribute(const std::string& name, const std::string& object) const {
  return in_context("cannot read attribute " + name + " of " + shown(object), path_, [&] {
    Handle attribute = open_attribute(name, object);
    double value = 0;
    read_numeric_attribute(attribute.id(), H5T_NATIVE_DOUBLE, true, &value);
    return value;
  });
}

}  // namespace sinkscope::h5
