// Probe sources: .npy / .h5 token files, random and repeated probes, a prepended BOS column.
#include "sinkscope/probes.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <sstream>

#include "sinkscope/error.hpp"
#include "sinkscope/io.hpp"

namespace sinkscope {
namespace {

[[noreturn]] void fail(const std::string& file, const std::string& what) {
  throw InputError(file + ": " + what);
}

// Parses a .npy file (format versions 1-3) holding int32 or int64, little-endian, C order, 2-D.
IntArray load_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open token file");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
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
  if (header_len > bytes.size() - pos) fail(path, "truncated .npy header");
  const std::string header = bytes.substr(pos, header_len);
  pos += header_len;
  std::smatch m;
  if (!std::regex_search(header, m, std::regex("'descr'\\s*:\\s*'([^']*)'")))
    fail(path, ".npy header has no descr");
  const std::string descr = m[1];
  size_t width = 0;
  if (descr == "<i4" || descr == "|i4" || descr == "=i4")
    width = 4;
  else if (descr == "<i8" || descr == "=i8")
    width = 8;
  else
    fail(path, "token dtype '" + descr + "' is not int32 or int64 (little-endian)");
  if (std::regex_search(header, m, std::regex("'fortran_order'\\s*:\\s*True")))
    fail(path, "tokens are in Fortran order; C order needed");
  if (!std::regex_search(header, m, std::regex("'shape'\\s*:\\s*\\(([^)]*)\\)")))
    fail(path, ".npy header has no shape");
  std::vector<size_t> shape;
  std::stringstream ss(m[1].str());
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty()) continue;
    if (item.find_first_not_of("0123456789") != std::string::npos)
      fail(path, "bad shape entry '" + item + "'");
    shape.push_back(std::stoull(item));
  }
  if (shape.size() != 2)
    fail(path,
         "tokens must be a 2-D array [N, T], got " + std::to_string(shape.size()) + " dimensions");
  if (shape[0] == 0 || shape[1] == 0) fail(path, "token array is empty");
  if (shape[1] > (size_t{1} << 31) || shape[0] > (size_t{1} << 31))
    fail(path, "token array is too large");
  const size_t count = shape[0] * shape[1];
  if (bytes.size() - pos != count * width)
    fail(path, "token data has " + std::to_string(bytes.size() - pos) + " bytes, shape needs " +
                   std::to_string(count * width));
  IntArray t(shape, "probe,position");
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

IntArray make_probes(const std::string& spec, int64_t vocab, const std::vector<int32_t>& excluded) {
  std::smatch m;
  const std::regex re("(random|repeat):(\\d+):(\\d+):(\\d+)");
  if (!std::regex_match(spec, m, re))
    throw InputError("--probes '" + spec + "': expected random:N:T:SEED or repeat:N:T:TOKEN");
  const uint64_t n = std::stoull(m[2]), T = std::stoull(m[3]), arg = std::stoull(m[4]);
  if (n == 0 || T == 0 || n > (1u << 20) || T > (1u << 22))
    throw InputError("--probes '" + spec + "': N and T must be positive and sane");
  IntArray t({n, T}, "probe,position");
  if (m[1] == "random") {
    // Ids in [0, vocab - |excluded in range|) mapped onto the allowed ids in order: with nothing
    // excluded, the draws are those of sinkscope 1.1.
    std::vector<int32_t> skip;
    for (int32_t id : excluded)
      if (id >= 0 && id < vocab) skip.push_back(id);
    std::sort(skip.begin(), skip.end());
    skip.erase(std::unique(skip.begin(), skip.end()), skip.end());
    const int64_t allowed = vocab - static_cast<int64_t>(skip.size());
    if (allowed <= 0)
      throw InputError("--probes '" + spec + "': every id of the vocabulary is a special token");
    std::mt19937_64 rng(arg);
    std::uniform_int_distribution<int64_t> dist(0, allowed - 1);
    for (auto& v : t.data) {
      int64_t id = dist(rng);
      for (int32_t s : skip)  // ascending: shift past every excluded id at or below it
        if (s <= id) ++id;
      v = static_cast<int32_t>(id);
    }
  } else {
    if (static_cast<int64_t>(arg) >= vocab)
      throw InputError("--probes '" + spec + "': token " + std::to_string(arg) + " >= vocab_size " +
                       std::to_string(vocab));
    std::fill(t.data.begin(), t.data.end(), static_cast<int32_t>(arg));
  }
  return t;
}

std::vector<int32_t> special_token_ids(const std::string& model_dir) {
  std::vector<int32_t> ids;
  for (const char* name : {"config.json", "generation_config.json"}) {
    const std::string path = model_dir + "/" + name;
    std::ifstream in(path);
    if (!in) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const std::exception& e) {
      fail(path, std::string("not valid JSON (") + e.what() + ")");
    }
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
