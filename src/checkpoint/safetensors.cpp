// safetensors: header validation (the reference implementation's rules), dtype conversion and a
// writer. Everything here runs on untrusted bytes: sizes are checked before they are used.
#include <fcntl.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "checkpoint/omp_threads.hpp"
#include "io/bounded_text.hpp"
#include "io/json_bounded.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/limits.hpp"

namespace sinkscope {
namespace {

using nlohmann::json;

[[noreturn]] void fail(const std::string& file, const std::string& what) {
  throw InputError(file + ": " + what);
}

struct DTypeEntry {
  const char* name;
  size_t size;
  DType type;
};
// Every dtype the safetensors format defines; sizes in bytes (sub-byte types are not supported
// by the format version sinkscope reads and are rejected as unknown).
constexpr DTypeEntry kDTypes[] = {
    {"F32", 4, DType::F32},    {"F16", 2, DType::F16},        {"BF16", 2, DType::BF16},
    {"F64", 8, DType::Other},  {"I64", 8, DType::Other},      {"U64", 8, DType::Other},
    {"I32", 4, DType::Other},  {"U32", 4, DType::Other},      {"I16", 2, DType::Other},
    {"U16", 2, DType::Other},  {"I8", 1, DType::Other},       {"U8", 1, DType::Other},
    {"BOOL", 1, DType::Other}, {"F8_E4M3", 1, DType::F8E4M3}, {"F8_E5M2", 1, DType::Other},
};

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return true;
  *out = a * b;
  return false;
}

}  // namespace

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::F8E4M3:
      return "F8_E4M3";
    default:
      return "other";
  }
}

size_t dtype_size(DType t) { return t == DType::F32 ? 4 : t == DType::F8E4M3 ? 1 : 2; }

float e4m3_to_f32(uint8_t x) {
  // S EEEE MMM, exponent bias 7; E = 0: subnormal M/8 * 2^-6; E = 15, M = 7: NaN (no infinity).
  const float sign = (x & 0x80u) ? -1.f : 1.f;
  const int e = (x >> 3) & 0xf, m = x & 0x7;
  if (e == 15 && m == 7) return std::numeric_limits<float>::quiet_NaN();
  if (e == 0) return sign * std::ldexp(static_cast<float>(m), -9);
  return sign * std::ldexp(static_cast<float>(8 + m), e - 10);
}

uint8_t f32_to_e4m3(float x) {
  if (std::isnan(x)) return 0x7f;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0;
  const float a = std::fabs(x);
  if (a >= 448.f) return sign | 0x7e;  // saturate at the largest finite value
  // Codes 0..126 are the finite magnitudes in increasing order: the last code not above a, or the
  // next one when it is nearer (a tie goes to the even code, i.e. the even mantissa).
  int lo = 0, hi = 126;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (e4m3_to_f32(static_cast<uint8_t>(mid)) <= a)
      lo = mid;
    else
      hi = mid - 1;
  }
  if (lo < 126) {
    const float below = a - e4m3_to_f32(static_cast<uint8_t>(lo)),
                above = e4m3_to_f32(static_cast<uint8_t>(lo + 1)) - a;
    if (above < below || (above == below && (lo & 1))) ++lo;
  }
  return sign | static_cast<uint8_t>(lo);
}

std::string fp8_scale_name(const std::string& weight_name) { return weight_name + "_scale_inv"; }

std::vector<TensorInfo> parse_safetensors_header(const char* header, size_t header_len,
                                                 uint64_t data_len, const std::string& file) {
  // Duplicate top-level keys are an error; nlohmann keeps the last one silently, so the parser
  // callback watches the keys of the top-level object.
  std::set<std::string> seen;
  std::string duplicate;
  json::parser_callback_t watch = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1) {
      const auto& k = parsed.get_ref<const std::string&>();
      if (!seen.insert(k).second && duplicate.empty()) duplicate = k;
    }
    return true;
  };
  const json j = parse_json_bounded(std::string_view(header, header_len),
                                    file + ": safetensors header", kMaxJsonDepth, watch);
  if (!duplicate.empty())
    fail(file, "safetensors header names tensor '" + excerpt(duplicate, 200) + "' twice");
  if (!j.is_object()) fail(file, "safetensors header is not a JSON object");

  std::vector<TensorInfo> out;
  out.reserve(j.size());
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail(file, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m)
        if (!m.value().is_string())
          fail(file, "__metadata__ value '" + excerpt(m.key(), 200) + "' is not a string");
      continue;
    }
    // Names come from the file: a message quotes at most 200 characters of one.
    const std::string tensor = "tensor '" + excerpt(name, 200) + "'";
    if (!v.is_object()) fail(file, tensor + ": entry is not an object");
    auto dt = v.find("dtype");
    auto sh = v.find("shape");
    auto off = v.find("data_offsets");
    if (dt == v.end() || !dt->is_string()) fail(file, tensor + ": missing or bad 'dtype'");
    if (sh == v.end() || !sh->is_array()) fail(file, tensor + ": missing or bad 'shape'");
    if (off == v.end() || !off->is_array() || off->size() != 2)
      fail(file, tensor + ": missing or bad 'data_offsets'");
    TensorInfo t;
    t.name = name;
    t.dtype_str = dt->get<std::string>();
    const DTypeEntry* entry = nullptr;
    for (const auto& e : kDTypes)
      if (t.dtype_str == e.name) entry = &e;
    if (!entry) fail(file, tensor + ": unknown dtype '" + excerpt(t.dtype_str) + "'");
    t.dtype = entry->type;
    t.elem_size = entry->size;
    uint64_t nbytes = entry->size;
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned())
        fail(file, tensor + ": shape has a non-integer or negative entry");
      const uint64_t dim = d.get<uint64_t>();
      // Shapes are int64 everywhere after this; a zero-sized tensor would otherwise let any
      // dimension through the byte-count check below.
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail(file, tensor + ": shape entry " + std::to_string(dim) + " does not fit int64");
      if (mul_overflows(nbytes, dim, &nbytes)) fail(file, tensor + ": shape overflows");
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    for (const auto& o : *off)
      if (!o.is_number_unsigned())
        fail(file, tensor + ": data_offsets are not non-negative integers");
    t.begin = (*off)[0].get<uint64_t>();
    t.end = (*off)[1].get<uint64_t>();
    if (t.end < t.begin) fail(file, tensor + ": data_offsets end before they begin");
    if (t.end - t.begin != nbytes)
      fail(file, tensor + ": byte range " + std::to_string(t.end - t.begin) +
                     " does not match shape x dtype size " + std::to_string(nbytes));
    out.push_back(std::move(t));
  }
  // Offsets start at 0, are contiguous, do not overlap and end exactly at the end of the file.
  std::vector<const TensorInfo*> order;
  for (const auto& t : out) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t expected = 0;
  for (const TensorInfo* t : order) {
    if (t->begin < expected)
      fail(file, "tensor '" + excerpt(t->name, 200) + "' overlaps the previous tensor");
    if (t->begin > expected)
      fail(file, "gap before tensor '" + excerpt(t->name, 200) + "' (offset " +
                     std::to_string(t->begin) + ", expected " + std::to_string(expected) + ")");
    expected = t->end;
  }
  if (expected != data_len)
    fail(file, "tensor data ends at byte " + std::to_string(expected) +
                   " but the data section has " + std::to_string(data_len) + " bytes");
  return out;
}

std::vector<std::pair<std::string, std::string>> parse_safetensors_index(const std::string& text,
                                                                         const std::string& file) {
  // A tensor named twice inside weight_map is an error (nlohmann would keep the last entry); keys
  // elsewhere (`metadata`) may repeat tensor names. Top-level keys must be unique too, or two
  // weight_map objects would be merged silently.
  std::set<std::string> top_keys, tensors;
  std::string top_key, duplicate_key, duplicate_tensor;
  json::parser_callback_t watch = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event != json::parse_event_t::key) return true;
    const auto& k = parsed.get_ref<const std::string&>();
    if (depth == 1) {
      top_key = k;
      if (!top_keys.insert(k).second && duplicate_key.empty()) duplicate_key = k;
    } else if (depth == 2 && top_key == "weight_map") {
      if (!tensors.insert(k).second && duplicate_tensor.empty()) duplicate_tensor = k;
    }
    return true;
  };
  const json j = parse_json_bounded(text, file, kMaxJsonDepth, watch);
  if (!j.is_object()) fail(file, "top level is not a JSON object");
  if (!duplicate_key.empty()) fail(file, "key '" + excerpt(duplicate_key, 200) + "' appears twice");
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object()) fail(file, "missing 'weight_map' object");
  if (!duplicate_tensor.empty())
    fail(file, "weight_map names tensor '" + excerpt(duplicate_tensor, 200) + "' twice");
  std::vector<std::pair<std::string, std::string>> out;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    const std::string tensor = "weight_map entry '" + excerpt(it.key(), 200) + "'";
    if (!it.value().is_string()) fail(file, tensor + " is not a file name");
    const auto shard = it.value().get<std::string>();
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..")
      fail(file, tensor + " names a bad shard file '" + excerpt(shard, 200) + "'");
    out.emplace_back(it.key(), shard);
  }
  return out;
}

float bf16_to_f32(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --exp;
      }
      u = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void convert_to_f32(DType t, const void* src, size_t n, float* dst) {
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::BF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::F8E4M3: {  // the raw values; Checkpoint's reads apply the block scales
      static const std::array<float, 256> table = [] {
        std::array<float, 256> t{};
        for (int i = 0; i < 256; ++i)
          t[static_cast<size_t>(i)] = e4m3_to_f32(static_cast<uint8_t>(i));
        return t;
      }();
      const auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = table[s[i]];
      return;
    }
    default:
      throw InputError("cannot convert dtype to float32");
  }
}

namespace {

constexpr size_t kConvertChunk = size_t{1} << 16;  // elements per OpenMP work item
constexpr size_t kParallelMin = size_t{1} << 18;   // below this one thread converts

int resolve_threads(int threads) { return threads > 0 ? threads : max_threads(); }

}  // namespace

void convert_to_f32_parallel(DType t, const void* src, size_t n, float* dst, int threads) {
  threads = resolve_threads(threads);
  if (threads == 1 || n < kParallelMin) return convert_to_f32(t, src, n, dst);
  if (t == DType::Other) throw InputError("cannot convert dtype to float32");
  const size_t es = dtype_size(t), chunks = (n + kConvertChunk - 1) / kConvertChunk;
  const char* s = static_cast<const char*>(src);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (size_t c = 0; c < chunks; ++c) {
    const size_t a = c * kConvertChunk, b = std::min(n, a + kConvertChunk);
    convert_to_f32(t, s + a * es, b - a, dst + a);
  }
}

size_t first_non_finite(DType t, const void* src, size_t n) {
  if (t == DType::F32) {
    const auto* p = static_cast<const uint32_t*>(src);
    for (size_t i = 0; i < n; ++i)
      if ((p[i] & 0x7f800000u) == 0x7f800000u) return i;
    return n;
  }
  if (t == DType::F8E4M3) {  // NaN is the only non-finite value: S.1111.111
    const auto* p = static_cast<const uint8_t*>(src);
    for (size_t i = 0; i < n; ++i)
      if ((p[i] & 0x7fu) == 0x7fu) return i;
    return n;
  }
  // bf16: 8 exponent bits at 7..14; f16: 5 exponent bits at 10..14.
  const uint16_t mask = t == DType::BF16 ? 0x7f80u : 0x7c00u;
  const auto* p = static_cast<const uint16_t*>(src);
  for (size_t i = 0; i < n; ++i)
    if ((p[i] & mask) == mask) return i;
  return n;
}

bool any_non_finite(DType t, const void* src, size_t n) {
  if (t == DType::F32) {
    const auto* p = static_cast<const uint32_t*>(src);
    uint32_t hit = 0;
    for (size_t i = 0; i < n; ++i)
      hit |= static_cast<uint32_t>((p[i] & 0x7f800000u) == 0x7f800000u);
    return hit != 0;
  }
  if (t == DType::F8E4M3) {
    const auto* p = static_cast<const uint8_t*>(src);
    uint32_t hit = 0;
    for (size_t i = 0; i < n; ++i) hit |= static_cast<uint32_t>((p[i] & 0x7fu) == 0x7fu);
    return hit != 0;
  }
  const uint16_t mask = t == DType::BF16 ? 0x7f80u : 0x7c00u;
  const auto* p = static_cast<const uint16_t*>(src);
  uint32_t hit = 0;
  for (size_t i = 0; i < n; ++i) hit |= static_cast<uint32_t>((p[i] & mask) == mask);
  return hit != 0;
}

SafetensorsFileWriter::SafetensorsFileWriter(std::string path, const std::vector<Tensor>& tensors,
                                             const std::map<std::string, std::string>& metadata)
    : path_(std::move(path)) {
  json header = json::object();
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    if (t.dtype != DType::F32 && t.dtype != DType::BF16)
      throw InputError("write_safetensors: only F32 and BF16 are written");
    uint64_t n = 1;
    for (auto d : t.shape) n *= static_cast<uint64_t>(d);
    const uint64_t nbytes = n * dtype_size(t.dtype);
    header[t.name] = {{"dtype", dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + nbytes}}};
    begin_.push_back(offset);
    end_.push_back(offset + nbytes);
    offset += nbytes;
  }
  json meta = {{"format", "pt"}};
  for (const auto& [key, value] : metadata) meta[key] = value;
  header["__metadata__"] = meta;
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');  // align the data section
  data_start_ = 8 + text.size();
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw InputError("cannot write " + path_ + " (" + std::strerror(errno) + ")");
  std::string head(8, '\0');
  const uint64_t len = text.size();
  std::memcpy(head.data(), &len, 8);
  head += text;
  try {
    write_at(head.data(), head.size(), 0);
  } catch (...) {
    ::close(fd_);
    ::unlink(path_.c_str());
    throw;
  }
}

SafetensorsFileWriter::~SafetensorsFileWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(path_.c_str());
  }
}

void SafetensorsFileWriter::write_at(const char* p, size_t n, uint64_t pos) const {
  while (n > 0) {
    const ssize_t w = ::pwrite(fd_, p, n, static_cast<off_t>(pos));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw InputError("cannot write " + path_ + " (" + std::strerror(errno) + ")");
    }
    if (w == 0) throw InputError("cannot write " + path_ + " (no progress)");
    p += w;
    pos += static_cast<uint64_t>(w);
    n -= static_cast<size_t>(w);
  }
}

void SafetensorsFileWriter::write(size_t i, uint64_t offset, const void* bytes, size_t n) const {
  if (i >= begin_.size() || offset > end_[i] - begin_[i] || n > end_[i] - begin_[i] - offset)
    throw InputError("write_safetensors: a write past the end of tensor " + std::to_string(i) +
                     " of " + path_);
  write_at(static_cast<const char*>(bytes), n, data_start_ + begin_[i] + offset);
  written_ += n;
}

void SafetensorsFileWriter::finish() {
  const uint64_t expected = end_.empty() ? 0 : end_.back();
  const int fd = fd_;
  fd_ = -1;
  const bool closed = ::close(fd) == 0;
  const int err = errno;
  if (!closed || written_ != expected) {
    ::unlink(path_.c_str());
    if (!closed) throw InputError("cannot write " + path_ + " (" + std::strerror(err) + ")");
    throw InputError("write_safetensors: " + path_ + " got " + std::to_string(written_.load()) +
                     " of " + std::to_string(expected) + " data bytes");
  }
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors) {
  std::vector<SafetensorsFileWriter::Tensor> layout;
  for (const auto& t : tensors) layout.push_back({t.name, t.dtype, t.shape});
  SafetensorsFileWriter file(path, layout);
  // Values go through one 64 MiB buffer: each piece is converted by every thread, then written
  // with one call (the page cache takes it at memory speed; the disk drains behind).
  constexpr size_t kBuffer = size_t{64} << 20;
  std::vector<char> buf(kBuffer);
  const int threads = resolve_threads(0);
  for (size_t ti = 0; ti < tensors.size(); ++ti) {
    const TensorToWrite& t = tensors[ti];
    const size_t es = dtype_size(t.dtype);
    const uint64_t n = file.tensor_bytes(ti) / es;
    for (uint64_t i = 0; i < n;) {
      const size_t k = std::min<uint64_t>(n - i, kBuffer / es);
      const float* src = t.data + i;
      if (t.dtype == DType::F32) {
        std::memcpy(buf.data(), src, k * 4);
      } else {
        auto* h = reinterpret_cast<uint16_t*>(buf.data());
        const size_t chunks = (k + kConvertChunk - 1) / kConvertChunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (k >= kParallelMin)
        for (size_t c = 0; c < chunks; ++c) {
          const size_t a = c * kConvertChunk, b = std::min<size_t>(k, a + kConvertChunk);
          for (size_t j = a; j < b; ++j) h[j] = f32_to_bf16(src[j]);
        }
      }
      file.write(ti, i * es, buf.data(), k * es);
      i += k;
    }
  }
  file.finish();
}

}  // namespace sinkscope
