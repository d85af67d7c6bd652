#include "sinkscope/sweep.hpp"

#include <glob.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>

#include "io/bounded_text.hpp"
#include "io/isolated.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/limits.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/recorder.hpp"

namespace sinkscope {
namespace fs = std::filesystem;

int64_t step_from_name(const std::string& folder) {
  const std::string base =
      fs::path(folder).lexically_normal().filename().string().empty()
          ? fs::path(folder).lexically_normal().parent_path().filename().string()
          : fs::path(folder).lexically_normal().filename().string();
  // The leftmost "step", "iter" or "checkpoint" (any case), an optional '-' or '_', then digits:
  // scanned by hand, the number checked without overflow.
  const auto lower = [](char c) {
    return static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  };
  for (size_t i = 0; i < base.size(); ++i) {
    for (const std::string_view word : {"step", "iter", "checkpoint"}) {
      if (base.size() - i < word.size()) continue;
      bool same = true;
      for (size_t k = 0; k < word.size() && same; ++k) same = lower(base[i + k]) == word[k];
      if (!same) continue;
      size_t begin = i + word.size();
      if (begin < base.size() && (base[begin] == '-' || base[begin] == '_') &&
          begin + 1 < base.size() && std::isdigit(static_cast<unsigned char>(base[begin + 1])))
        ++begin;
      size_t end = begin;
      while (end < base.size() && std::isdigit(static_cast<unsigned char>(base[end]))) ++end;
      if (end == begin) continue;
      uint64_t step = 0;
      if (!parse_decimal(std::string_view(base).substr(begin, end - begin),
                         static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), &step))
        throw InputError(folder +
                         ": the step in the folder name does not fit int64 (give the "
                         "step with --step or --steps)");
      return static_cast<int64_t>(step);
    }
  }
  return -1;
}

std::vector<SweepCheckpoint> list_checkpoints(const std::vector<std::string>& models,
                                              const std::string& pattern,
                                              const std::vector<int64_t>& steps) {
  std::vector<std::string> dirs = models;
  if (!pattern.empty()) {
    glob_t g{};
    if (::glob(pattern.c_str(), 0, nullptr, &g) == 0)
      for (size_t i = 0; i < g.gl_pathc; ++i)
        if (fs::is_directory(g.gl_pathv[i])) dirs.push_back(g.gl_pathv[i]);
    globfree(&g);
    if (dirs.empty()) throw InputError("--models-glob '" + pattern + "' matches no folder");
  }
  if (dirs.empty()) throw InputError("no checkpoints given (--models or --models-glob)");
  if (!steps.empty() && steps.size() != dirs.size())
    throw InputError("--steps has " + std::to_string(steps.size()) + " entries for " +
                     std::to_string(dirs.size()) + " checkpoints");
  std::vector<SweepCheckpoint> out;
  for (size_t i = 0; i < dirs.size(); ++i) {
    SweepCheckpoint c;
    c.dir = dirs[i];
    c.name = fs::path(dirs[i]).lexically_normal().filename().string();
    if (c.name.empty())
      c.name = fs::path(dirs[i]).lexically_normal().parent_path().filename().string();
    c.step = steps.empty() ? step_from_name(dirs[i]) : steps[i];
    out.push_back(c);
  }
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return a.step != b.step ? a.step < b.step : a.name < b.name;
  });
  for (size_t i = 1; i < out.size(); ++i)
    if (out[i].name == out[i - 1].name)
      throw InputError("two checkpoints are named '" + out[i].name + "'");
  return out;
}

namespace {

// Range checks of a file that read back whole and matched its checksum (or had none): the
// quantities METRICS.md bounds must lie in their ranges, and the tokens must be the ones the
// attribute names. Returns what is wrong, empty when nothing is.
std::string out_of_range(const Analysis& a) {
  const AnalysisMeta& m = a.meta;
  // float32 rounding of means and shares of values in [0, 1].
  constexpr float kSlack = 1e-4f;
  const auto fraction = [&](const FloatArray& values, const char* name) -> std::string {
    for (const float v : values.data)
      if (!(v >= -kSlack && v <= 1 + kSlack))
        return std::string(name) + " holds " + std::to_string(v) + ", outside [0, 1]";
    return "";
  };
  const std::pair<const FloatArray*, const char*> fractions[] = {
      {&a.sink_score, "attention/sink_score"},        {&a.sink_rate, "attention/sink_rate"},
      {&a.p0_per_query, "attention/p0_per_query"},    {&a.p0_topk_freq, "routing/p0_topk_freq"},
      {&a.rest_topk_freq, "routing/rest_topk_freq"},  {&a.layer_share, "profile/layer_share"},
      {&a.norm_gain_share, "profile/norm_gain_share"}};
  for (const auto& [values, name] : fractions)
    if (std::string why = fraction(*values, name); !why.empty()) return why;
  if (!(a.first2_share >= -kSlack && a.first2_share <= 1 + kSlack))
    return "profile/first2_share " + std::to_string(a.first2_share) + " is outside [0, 1]";
  if (a.peak_layer < 0 || (m.num_layers > 0 && a.peak_layer >= m.num_layers))
    return "profile/peak_layer " + std::to_string(a.peak_layer) + " is not a layer";
  if (!(a.entropy >= -kSlack && std::isfinite(a.entropy)))
    return "profile/entropy " + std::to_string(a.entropy) + " is not a finite entropy";
  for (const int32_t count : a.massive_p0.data)
    if (count < 0 || count > m.hidden_size)
      return "residual/massive_p0 holds " + std::to_string(count) + ", outside [0, hidden_size]";
  for (const int32_t id : a.tokens.data)
    if (id < 0) return "tokens holds the negative id " + std::to_string(id);
  if (tokens_sha256(a.tokens) != m.tokens_sha256)
    return "the tokens do not match the tokens_sha256 attribute";
  return "";
}

// Resources of one file's read in a child (limits.hpp): HDF5 given a damaged file can allocate
// tens of GB or loop without end. A valid file needs about its uncompressed size, and deflate on
// our float datasets gains far less than 16x; reading runs at far more than 1 MiB/s.
uint64_t read_memory_budget(const std::string& path) {
  std::error_code error;
  const uint64_t size = fs::file_size(path, error);
  return (uint64_t{1} << 30) + 16 * (error ? 0 : size);
}
int read_seconds(const std::string& path) {
  std::error_code error;
  const uint64_t size = fs::file_size(path, error);
  return kIsolatedReadSeconds + static_cast<int>(std::min<uint64_t>(error ? 0 : size >> 20, 86400));
}

// read_analysis in a child process: HDF5 crashes, aborts or runs away on some damaged files (one
// flipped byte can make it segfault reading a string attribute), and a sweep must survive them.
// `check` runs in the child on what was read; returns {true, its answer} or {false, the reason
// the file cannot be used}.
IsolatedResult read_in_child(const std::string& path,
                             const std::function<std::string(const Analysis&)>& check) {
  IsolatedResult result = run_isolated(
      [&]() -> std::string {
        try {
          return "+" + check(read_analysis(path));
        } catch (const std::exception& e) {
          return std::string("-damaged (") + e.what() + ")";
        }
      },
      read_seconds(path), read_memory_budget(path));
  if (!result.completed) return {false, "damaged (" + result.answer + ")"};
  const bool ok = !result.answer.empty() && result.answer[0] == '+';
  return {ok, result.answer.empty() ? "damaged (no answer)" : result.answer.substr(1)};
}

// What assemble_sweep needs of one analysis, sent from the child that read the file (the parent
// never opens a file HDF5 might misbehave on). Same binary on both ends: raw bytes suffice.
class Packer {
 public:
  template <typename T>
  void put(const T& value) {
    bytes_.append(reinterpret_cast<const char*>(&value), sizeof(T));
  }
  void put(const std::string& text) {
    put<uint64_t>(text.size());
    bytes_ += text;
  }
  void put(const FloatArray& array) {
    put<uint64_t>(array.shape.size());
    for (const size_t extent : array.shape) put<uint64_t>(extent);
    put(array.dims);
    put<uint64_t>(array.data.size());
    bytes_.append(reinterpret_cast<const char*>(array.data.data()), array.data.size() * 4);
  }
  std::string take() { return std::move(bytes_); }

 private:
  std::string bytes_;
};

class Unpacker {
 public:
  explicit Unpacker(const std::string& bytes) : bytes_(bytes) {}
  template <typename T>
  T get() {
    T value;
    std::memcpy(&value, take(sizeof(T)), sizeof(T));
    return value;
  }
  std::string get_text() {
    const uint64_t n = get<uint64_t>();
    return std::string(take(n), n);
  }
  FloatArray get_array() {
    FloatArray array;
    const uint64_t rank = get<uint64_t>();
    if (rank > 8) throw RuntimeFailure("unpacking an analysis: bad rank");
    for (uint64_t i = 0; i < rank; ++i) array.shape.push_back(get<uint64_t>());
    array.dims = get_text();
    const uint64_t count = get<uint64_t>();
    if (count > (bytes_.size() - pos_) / 4) throw RuntimeFailure("unpacking an analysis: short");
    array.data.resize(count);
    std::memcpy(array.data.data(), take(count * 4), count * 4);
    return array;
  }

 private:
  const char* take(uint64_t n) {
    if (n > bytes_.size() - pos_) throw RuntimeFailure("unpacking an analysis: short");
    const char* at = bytes_.data() + pos_;
    pos_ += n;
    return at;
  }
  const std::string& bytes_;
  size_t pos_ = 0;
};

std::string pack_for_sweep(const Analysis& a) {
  Packer p;
  p.put(a.meta.step);
  p.put(a.meta.seq_len);
  p.put(a.meta.num_layers);
  p.put(a.meta.num_heads);
  p.put(a.meta.tokens_sha256);
  p.put(a.first2_share);
  for (const FloatArray* array :
       {&a.sink_rate, &a.sink_score, &a.h_ratio, &a.layer_share, &a.norm_gain_share})
    p.put(*array);
  return p.take();
}

Analysis unpack_for_sweep(const std::string& bytes) {
  Unpacker u(bytes);
  Analysis a;
  a.meta.step = u.get<int64_t>();
  a.meta.seq_len = u.get<int64_t>();
  a.meta.num_layers = u.get<int64_t>();
  a.meta.num_heads = u.get<int64_t>();
  a.meta.tokens_sha256 = u.get_text();
  a.first2_share = u.get<float>();
  for (FloatArray* array :
       {&a.sink_rate, &a.sink_score, &a.h_ratio, &a.layer_share, &a.norm_gain_share})
    *array = u.get_array();
  return a;
}

}  // namespace

bool analysis_file_matches(const std::string& path, const std::string& sha, const ModelConfig& c,
                           std::string* why) {
  if (!fs::exists(path)) {
    if (why) *why = "missing";
    return false;
  }
  const IsolatedResult result = read_in_child(path, [&](const Analysis& a) -> std::string {
    const AnalysisMeta& m = a.meta;
    // A file without a checksum (an older sinkscope, another writer) cannot show it is undamaged.
    if (m.content_sha256.empty()) return "no content checksum (content_sha256): redone to be safe";
    if (std::string range = out_of_range(a); !range.empty()) return "damaged (" + range + ")";
    if (m.tokens_sha256 != sha) return "made with other probes";
    if (m.num_layers != c.num_layers || m.num_heads != c.num_heads ||
        m.num_experts != c.num_experts || m.hidden_size != c.hidden_size ||
        m.num_kv_heads != c.num_kv_heads || m.head_dim != c.head_dim)
      return "made for another model shape";
    return "";
  });
  const bool matches = result.completed && result.answer.empty();
  if (why) *why = result.answer;
  return matches;
}

Sweep assemble_sweep(const std::vector<SweepCheckpoint>& cps, const std::string& outdir,
                     double tau) {
  Sweep s;
  s.tau = tau;
  std::vector<Analysis> ok;
  for (const auto& c : cps) {
    const std::string path = (fs::path(outdir) / "checkpoints" / (c.name + ".h5")).string();
    // Read in a child: a file HDF5 would crash on is listed as failed, not fatal.
    const IsolatedResult read = read_in_child(path, pack_for_sweep);
    if (!read.completed) {
      s.failed.push_back(c.name);
      continue;
    }
    try {
      ok.push_back(unpack_for_sweep(read.answer));
      s.steps.push_back(c.step >= 0 ? c.step : ok.back().meta.step);
      s.names.push_back(c.name);
    } catch (const std::exception&) {
      s.failed.push_back(c.name);
    }
  }
  if (ok.empty()) throw InputError(outdir + ": no valid analysis file to assemble");
  const AnalysisMeta& m0 = ok.front().meta;
  for (const auto& a : ok) {
    if (a.meta.seq_len != m0.seq_len)
      throw InputError(outdir + ": checkpoints were analysed with probes of different lengths (" +
                       std::to_string(m0.seq_len) + " and " + std::to_string(a.meta.seq_len) + ")");
    if (a.meta.tokens_sha256 != m0.tokens_sha256)
      throw InputError(outdir + ": checkpoints were analysed with different probes");
    if (a.meta.num_layers != m0.num_layers || a.meta.num_heads != m0.num_heads)
      throw InputError(outdir + ": checkpoints have different model shapes");
  }
  const size_t C = ok.size(), L = static_cast<size_t>(m0.num_layers),
               H = static_cast<size_t>(m0.num_heads);
  s.sink_rate = FloatArray({C, L}, "checkpoint,layer");
  s.sink_score = FloatArray({C, L, H}, "checkpoint,layer,head");
  s.h_ratio = FloatArray({C, L + 1}, "checkpoint,layer");
  s.layer_share = FloatArray({C, L + 1}, "checkpoint,layer_index");
  s.first2_share = FloatArray({C}, "checkpoint");
  s.norm_gain_share = FloatArray({C, L}, "checkpoint,layer");
  std::vector<std::vector<float>> shares;
  for (size_t c = 0; c < C; ++c) {
    const Analysis& a = ok[c];
    std::copy(a.sink_rate.data.begin(), a.sink_rate.data.end(), s.sink_rate.data.begin() + c * L);
    std::copy(a.sink_score.data.begin(), a.sink_score.data.end(),
              s.sink_score.data.begin() + c * L * H);
    std::copy(a.h_ratio.data.begin(), a.h_ratio.data.end(), s.h_ratio.data.begin() + c * (L + 1));
    std::copy(a.layer_share.data.begin(), a.layer_share.data.end(),
              s.layer_share.data.begin() + c * (L + 1));
    std::copy(a.norm_gain_share.data.begin(), a.norm_gain_share.data.end(),
              s.norm_gain_share.data.begin() + c * L);
    s.first2_share.data[c] = a.first2_share;
    shares.push_back(a.layer_share.data);
  }
  std::vector<float> tv;
  convergence(shares, s.steps, tau, &tv, &s.convergence_step);
  s.convergence_tv = FloatArray({tv.size()}, "checkpoint_pair");
  s.convergence_tv.data = tv;
  return s;
}

}  // namespace sinkscope
