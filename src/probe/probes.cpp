// Probe sources: .npy / .h5 token files, random and repeated probes, a prepended BOS column.
#include "sinkscope/probes.hpp"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <string_view>
#include <utility>
#include <vector>

#include "io/bounded_text.hpp"
#include "io/json_bounded.hpp"
#include "io/small_file.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/io.hpp"
#include "sinkscope/limits.hpp"

namespace sinkscope {
namespace {

[[noreturn]] void fail(const std::string& file, const std::string& what) {
  throw InputError(file + ": " + what);
}

// Largest .npy file: magic, version and length fields, the header, and kMaxTokens int64 ids.
constexpr uint64_t kMaxNpyBytes = 12 + kMaxNpyHeaderBytes + kMaxTokens * 8;

// The .npy header: a Python dict literal such as
//   {'descr': '<i4', 'fortran_order': False, 'shape': (3, 4), }
// read in one pass by hand (no regex: std::regex recurses per character and a 40 KB field
// overflowed the stack). Exactly the three keys numpy writes are accepted, as numpy does.
struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<uint64_t> shape;
};

class NpyHeaderParser {
 public:
  NpyHeaderParser(std::string_view text, const std::string& path) : text_(text), path_(path) {}

  NpyHeader parse() {
    NpyHeader h;
    bool has_descr = false, has_order = false, has_shape = false;
    skip_space();
    expect('{');
    while (true) {
      skip_space();
      if (peek() == '}') break;
      const std::string_view key = string_literal("a key");
      skip_space();
      expect(':');
      skip_space();
      if (key == "descr" && !has_descr) {
        if (peek() != '\'' && peek() != '"')
          bad("'descr' is not a simple dtype string (structured arrays are not token files)");
        h.descr = std::string(string_literal("'descr'"));
        has_descr = true;
      } else if (key == "fortran_order" && !has_order) {
        h.fortran_order = boolean();
        has_order = true;
      } else if (key == "shape" && !has_shape) {
        h.shape = tuple();
        has_shape = true;
      } else {
        bad("unexpected or repeated key '" + excerpt(key) + "'");
      }
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      skip_space();
      if (peek() != '}') bad("expected ',' or '}'");
    }
    ++pos_;
    skip_space();
    if (pos_ != text_.size()) bad("text after the closing '}'");
    if (!has_descr) fail(path_, ".npy header has no descr");
    if (!has_shape) fail(path_, ".npy header has no shape");
    return h;
  }

 private:
  [[noreturn]] void bad(const std::string& what) const {
    fail(path_, "bad .npy header at byte " + std::to_string(pos_) + ": " + what);
  }
  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r'))
      ++pos_;
  }
  void expect(char c) {
    if (peek() != c) bad(std::string("expected '") + c + "'");
    ++pos_;
  }
  // '...' or "..." without escapes (numpy's keys and dtype strings have none).
  std::string_view string_literal(const char* what) {
    const char quote = peek();
    if (quote != '\'' && quote != '"') bad(std::string("expected a quoted string as ") + what);
    const size_t begin = ++pos_;
    const size_t end = text_.find(quote, begin);
    if (end == std::string_view::npos) bad(std::string("unterminated string in ") + what);
    pos_ = end + 1;
    return text_.substr(begin, end - begin);
  }
  bool boolean() {
    for (const auto& [word, value] :
         {std::pair{std::string_view("True"), true}, std::pair{std::string_view("False"), false}}) {
      if (text_.substr(pos_, word.size()) == word) {
        pos_ += word.size();
        return value;
      }
    }
    bad("'fortran_order' is not True or False");
  }
  // (d0, d1, ...) with an optional trailing comma; every entry checked as it is read.
  std::vector<uint64_t> tuple() {
    expect('(');
    std::vector<uint64_t> shape;
    while (true) {
      skip_space();
      if (peek() == ')') break;
      const size_t begin = pos_;
      while (pos_ < text_.size() && text_[pos_] != ',' && text_[pos_] != ')' && text_[pos_] != ' ')
        ++pos_;
      const std::string_view entry = text_.substr(begin, pos_ - begin);
      uint64_t extent = 0;
      if (entry.find_first_not_of("0123456789") != std::string_view::npos || entry.empty())
        fail(path_, "bad shape entry '" + excerpt(entry) + "'");
      if (!parse_decimal(entry, kMaxTokens, &extent))
        fail(path_, "shape entry " + excerpt(entry) + " exceeds the limit of " +
                        std::to_string(kMaxTokens) + " tokens");
      if (shape.size() == 64) bad("more than 64 dimensions");
      shape.push_back(extent);
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      skip_space();
      if (peek() != ')') bad("expected ',' or ')' in 'shape'");
    }
    ++pos_;
    return shape;
  }

  std::string_view text_;
  const std::string& path_;
  size_t pos_ = 0;
};

// Parses a .npy file (format versions 1-3) holding int32 or int64, little-endian, C order, 2-D.
IntArray load_npy(const std::string& path) {
  const std::string bytes = read_regular_file(path, kMaxNpyBytes, "token file");
  if (bytes.size() < 10 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0)
    fail(path, "not a .npy file (bad magic)");
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, pos = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    pos = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) fail(path, "truncated .npy header");
    uint32_t len = 0;
    std::memcpy(&len, bytes.data() + 8, 4);
    header_len = len;
    pos = 12;
  } else {
    fail(path, "unsupported .npy format version " + std::to_string(major));
  }
  if (header_len > kMaxNpyHeaderBytes)
    fail(path, ".npy header has " + std::to_string(header_len) + " bytes, more than the limit of " +
                   std::to_string(kMaxNpyHeaderBytes));
  if (header_len > bytes.size() - pos) fail(path, "truncated .npy header");
  const NpyHeader header =
      NpyHeaderParser(std::string_view(bytes).substr(pos, header_len), path).parse();
  pos += header_len;
  const std::string& descr = header.descr;
  size_t width = 0;
  if (descr == "<i4" || descr == "|i4" || descr == "=i4")
    width = 4;
  else if (descr == "<i8" || descr == "=i8")
    width = 8;
  else
    fail(path, "token dtype '" + excerpt(descr) + "' is not int32 or int64 (little-endian)");
  if (header.fortran_order) fail(path, "tokens are in Fortran order; C order needed");
  const std::vector<uint64_t>& shape = header.shape;
  if (shape.size() != 2)
    fail(path,
         "tokens must be a 2-D array [N, T], got " + std::to_string(shape.size()) + " dimensions");
  if (shape[0] == 0 || shape[1] == 0) fail(path, "token array is empty");
  uint64_t count = 0;
  if (__builtin_mul_overflow(shape[0], shape[1], &count) || count > kMaxTokens)
    fail(path, "token array [" + std::to_string(shape[0]) + ", " + std::to_string(shape[1]) +
                   "] exceeds the limit of " + std::to_string(kMaxTokens) + " tokens");
  // count <= 2^28 and width <= 8: the byte count cannot overflow.
  if (bytes.size() - pos != count * width)
    fail(path, "token data has " + std::to_string(bytes.size() - pos) + " bytes, shape needs " +
                   std::to_string(count * width));
  IntArray t({static_cast<size_t>(shape[0]), static_cast<size_t>(shape[1])}, "probe,position");
  for (size_t i = 0; i < count; ++i) {
    if (width == 4) {
      int32_t v;
      std::memcpy(&v, bytes.data() + pos + 4 * i, 4);
      t.data[i] = v;
    } else {
      int64_t v;
      std::memcpy(&v, bytes.data() + pos + 8 * i, 8);
      if (v < INT32_MIN || v > INT32_MAX)
        fail(path, "token id " + std::to_string(v) + " at (row " + std::to_string(i / shape[1]) +
                       ", column " + std::to_string(i % shape[1]) + ") does not fit int32");
      t.data[i] = static_cast<int32_t>(v);
    }
  }
  return t;
}

}  // namespace

IntArray load_tokens(const std::string& path) {
  const auto dot = path.rfind('.');
  const std::string ext = dot == std::string::npos ? "" : path.substr(dot);
  if (ext == ".npy") return load_npy(path);
  if (ext == ".h5" || ext == ".hdf5") return read_tokens_h5(path);
  fail(path, "token file must be .npy or .h5");
}

void check_token_count(uint64_t n, uint64_t t, const std::string& source) {
  uint64_t count = 0;
  if (__builtin_mul_overflow(n, t, &count) || count > kMaxTokens)
    throw InputError(source + ": " + std::to_string(n) + " probes x " + std::to_string(t) +
                     " positions exceed the limit of " + std::to_string(kMaxTokens) + " tokens");
}

IntArray make_probes(const std::string& spec, int64_t vocab, const std::vector<int32_t>& excluded) {
  const std::string option = "--probes '" + excerpt(spec) + "'";
  // KIND:N:T:ARG, split by hand (no regex on untrusted text).
  std::vector<std::string_view> fields;
  std::string_view rest(spec);
  while (fields.size() < 5) {
    const size_t colon = rest.find(':');
    fields.push_back(rest.substr(0, colon));
    if (colon == std::string_view::npos) break;
    rest.remove_prefix(colon + 1);
  }
  if (fields.size() != 4 || (fields[0] != "random" && fields[0] != "repeat"))
    throw InputError(option + ": expected random:N:T:SEED or repeat:N:T:TOKEN");
  const bool random = fields[0] == "random";
  uint64_t n = 0, T = 0, arg = 0;
  const auto number = [&](std::string_view text, const char* name, uint64_t lo, uint64_t max,
                          uint64_t* value) {
    if (!parse_decimal(text, max, value) || *value < lo)
      throw InputError(option + ": " + name + " must be a whole number from " + std::to_string(lo) +
                       " to " + std::to_string(max));
  };
  number(fields[1], "N", 1, kMaxTokens, &n);
  number(fields[2], "T", 1, kMaxTokens, &T);
  number(fields[3], random ? "SEED" : "TOKEN", 0, std::numeric_limits<uint64_t>::max(), &arg);
  check_token_count(n, T, option);
  IntArray t({n, T}, "probe,position");
  if (random) {
    // Ids in [0, vocab - |excluded in range|) mapped onto the allowed ids in order: with nothing
    // excluded, the draws are those of sinkscope 1.1.
    std::vector<int32_t> skip;
    for (int32_t id : excluded)
      if (id >= 0 && id < vocab) skip.push_back(id);
    std::sort(skip.begin(), skip.end());
    skip.erase(std::unique(skip.begin(), skip.end()), skip.end());
    const int64_t allowed = vocab - static_cast<int64_t>(skip.size());
    if (allowed <= 0) throw InputError(option + ": every id of the vocabulary is a special token");
    std::mt19937_64 rng(arg);
    std::uniform_int_distribution<int64_t> dist(0, allowed - 1);
    for (auto& v : t.data) {
      int64_t id = dist(rng);
      for (int32_t s : skip)  // ascending: shift past every excluded id at or below it
        if (s <= id) ++id;
      v = static_cast<int32_t>(id);
    }
  } else {
    if (arg >= static_cast<uint64_t>(vocab))
      throw InputError(option + ": token " + std::to_string(arg) + " >= vocab_size " +
                       std::to_string(vocab));
    std::fill(t.data.begin(), t.data.end(), static_cast<int32_t>(arg));
  }
  return t;
}

std::vector<int32_t> special_token_ids(const std::string& model_dir) {
  std::vector<int32_t> ids;
  for (const char* name : {"config.json", "generation_config.json"}) {
    const std::string path = model_dir + "/" + name;
    std::error_code absent;
    if (!std::filesystem::exists(path, absent)) continue;
    // Bounded like config.json itself: a regular file, small, shallow.
    const std::string text = read_regular_file(path, kMaxConfigBytes, name);
    nlohmann::json j = parse_json_bounded(text, path, kMaxJsonDepth);
    if (!j.is_object()) continue;
    for (const char* key : {"bos_token_id", "eos_token_id", "pad_token_id"}) {
      if (!j.contains(key)) continue;
      const auto& v = j[key];
      for (const auto& id : v.is_array() ? v : nlohmann::json::array({v}))
        if (id.is_number_integer()) ids.push_back(id.get<int32_t>());
    }
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

IntArray prepend_bos(const IntArray& tokens, int32_t bos) {
  const size_t N = tokens.shape[0], T = tokens.shape[1];
  for (size_t n = 0; n < N; ++n)
    if (T > 0 && tokens.data[n * T] == bos)
      throw InputError("--prepend-bos " + std::to_string(bos) + ": probe " + std::to_string(n) +
                       " already starts with token " + std::to_string(bos) +
                       "; it would be doubled (drop --prepend-bos or the leading token)");
  IntArray out({N, T + 1}, tokens.dims);
  for (size_t n = 0; n < N; ++n) {
    out.data[n * (T + 1)] = bos;
    std::copy_n(tokens.data.begin() + n * T, T, out.data.begin() + n * (T + 1) + 1);
  }
  return out;
}

void check_token_ids(const IntArray& tokens, int64_t vocab, const std::string& source) {
  const size_t T = tokens.shape.at(1);
  for (size_t i = 0; i < tokens.data.size(); ++i)
    if (tokens.data[i] < 0 || tokens.data[i] >= vocab)
      throw InputError(source + ": token id " + std::to_string(tokens.data[i]) + " at (row " +
                       std::to_string(i / T) + ", column " + std::to_string(i % T) +
                       ") is outside the vocabulary [0, " + std::to_string(vocab) + ")");
}

std::string tokens_sha256(const IntArray& tokens) {
  return sha256_hex(tokens.data.data(), tokens.data.size() * 4);
}

void save_npy_int32(const std::string& path, const IntArray& t) {
  std::string header = "{'descr': '<i4', 'fortran_order': False, 'shape': (" +
                       std::to_string(t.shape.at(0)) + ", " + std::to_string(t.shape.at(1)) +
                       "), }";
  while ((10 + header.size() + 1) % 64 != 0) header.push_back(' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary);
  if (!out) throw InputError(path + ": cannot write");
  out.write("\x93NUMPY\x01\x00", 8);
  const uint16_t len = static_cast<uint16_t>(header.size());
  out.write(reinterpret_cast<const char*>(&len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(t.data.data()),
            static_cast<std::streamsize>(t.data.size() * 4));
}

}  // namespace sinkscope
