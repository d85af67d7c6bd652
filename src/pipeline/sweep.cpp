#include "sinkscope/sweep.hpp"

#include <fcntl.h>
#include <glob.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string_view>
#include <thread>

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
    // Ordering by name would put "best" before "final" whatever their training steps were.
    if (c.step < 0 && steps.empty())
      throw InputError("checkpoint folder " + dirs[i] +
                       " has no step in its name (step<N>, iter_<N>, checkpoint-<N>): give every "
                       "checkpoint's step with --steps");
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
// quantities docs/metrics.md bounds must lie in their ranges, and the tokens must be the ones the
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
      {&a.sink_score, "attention/sink_score"},
      {&a.sink_rate, "attention/sink_rate"},
      {&a.p0_per_query, "attention/p0_per_query"},
      {&a.p0_topk_freq, "routing/p0_topk_freq"},
      {&a.rest_topk_freq, "routing/rest_topk_freq"},
      {&a.layer_share, "profile/layer_share"},
      {&a.norm_gain_share, "profile/norm_gain_share"},
      {&a.learned_sink_mass, "attention/learned_sink_mass"}};
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

namespace {

double tv_distance(const float* a, const float* b, size_t n) {
  double d = 0;
  for (size_t i = 0; i < n; ++i) d += std::fabs(static_cast<double>(a[i]) - b[i]);
  return 0.5 * d;
}

// Positive parts normalised to sum 1 (all zero when nothing is positive): docs/metrics.md section
// 5's normalisation, shared by both profiles.
void positive_shares(const std::vector<double>& v, float* out) {
  double total = 0;
  for (double x : v) total += std::max(0.0, x);
  for (size_t i = 0; i < v.size(); ++i)
    out[i] = total > 0 ? static_cast<float>(std::max(0.0, v[i]) / total) : 0.f;
}

// Linear-interpolated quantile of `v` (numpy's default), q in [0, 1].
double quantile(std::vector<double> v, double q) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos)), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

// One per-checkpoint quantity of the sweep: its point values [C, ...] and, per replicate, the
// same quantity recomputed on resampled probes.
struct Resampled {
  std::string name;
  std::vector<size_t> shape;               // [C, ...]
  std::vector<std::vector<float>> values;  // [B][C * inner]; NaN where a file lacks the inputs
};

// Mean over the probes `idx` of rows of a per-probe array [N, inner].
std::vector<double> resampled_mean(const FloatArray& per_probe, const std::vector<size_t>& idx) {
  const size_t inner = per_probe.data.size() / per_probe.shape.at(0);
  std::vector<double> mean(inner, 0);
  for (size_t n : idx)
    for (size_t i = 0; i < inner; ++i) mean[i] += per_probe.data[n * inner + i];
  for (double& m : mean) m /= static_cast<double>(idx.size());
  return mean;
}

}  // namespace

ConvergenceResult assess_convergence(const ConvergenceInput& in) {
  ConvergenceResult r;
  const size_t C = in.profiles.size();
  bool steps_usable = true;
  for (size_t c = 0; c < C; ++c)
    if (in.steps[c] < 0 || (c > 0 && in.steps[c] <= in.steps[c - 1])) steps_usable = false;
  for (size_t c = 1; c < C; ++c) {
    const double tv =
        tv_distance(in.profiles[c].data(), in.profiles[c - 1].data(), in.profiles[c].size());
    // The gap in doublings of the step (step + 1, so step 0 counts); 1 per pair when the steps
    // are unknown or not increasing.
    const double gap = steps_usable ? std::log2(static_cast<double>(in.steps[c] + 1) /
                                                static_cast<double>(in.steps[c - 1] + 1))
                                    : 1.0;
    const double noise = std::max(in.noise_floor[c - 1], in.noise_floor[c]);
    const double threshold = std::max(in.tau * gap, noise);
    r.distance.push_back(static_cast<float>(tv));
    r.distance_per_doubling.push_back(static_cast<float>(tv / gap));
    r.threshold.push_back(static_cast<float>(threshold));
    r.still.push_back(tv <= threshold ? 1 : 0);
  }
  if (C == 0 || !in.has_sink[C - 1]) {
    r.outcome = C == 0 ? "too few checkpoints" : "no sink";
    return r;
  }
  // One pair to see the profile change, two to see it stop.
  if (C < 4) {
    r.outcome = "too few checkpoints";
    return r;
  }
  // c0: the first checkpoint of the longest tail that has a sink everywhere and whose pairs are
  // all still (pair j compares checkpoints j - 1 and j, still[j - 1]).
  size_t c0 = C - 1;
  while (c0 > 0 && in.has_sink[c0 - 1] && r.still[c0 - 1]) --c0;
  bool moved_before = false;
  for (size_t j = 1; j <= c0; ++j) moved_before |= r.still[j - 1] == 0;
  if (C - 1 - c0 >= 2 && moved_before) {
    r.step = in.steps[c0];
    r.outcome = "converged at step " + std::to_string(r.step);
  } else {
    r.outcome = "not converged";
  }
  return r;
}

Sweep assemble_sweep(const std::vector<SweepCheckpoint>& cps, const std::string& outdir,
                     const SweepOptions& opt) {
  const double tau = opt.tau;
  Sweep s;
  s.tau = tau;
  std::vector<Analysis> ok;
  for (const auto& c : cps) {
    const std::string path = (fs::path(outdir) / "checkpoints" / (c.name + ".h5")).string();
    // Read first in a child: a file HDF5 would crash or run away on, or one that fails its
    // checksum or range checks, is listed as failed; the parent then reads only files that read
    // back cleanly there.
    const IsolatedResult probe =
        read_in_child(path, [](const Analysis& a) { return out_of_range(a); });
    if (!probe.completed || !probe.answer.empty()) {
      s.failed.push_back(c.name);
      continue;
    }
    try {
      ok.push_back(read_analysis(path));
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
    if (a.meta.eps != m0.eps)
      throw InputError(outdir + ": checkpoints were analysed with different --eps");
    if (a.meta.num_layers != m0.num_layers || a.meta.num_heads != m0.num_heads)
      throw InputError(outdir + ": checkpoints have different model shapes");
  }
  s.tokens_sha256 = m0.tokens_sha256;
  s.eps = m0.eps;
  for (const auto& a : ok) {
    s.checkpoint_paths.push_back(a.meta.checkpoint);
    s.checkpoint_headers_sha256.push_back(a.meta.checkpoint_headers_sha256);
  }
  const size_t C = ok.size(), L = static_cast<size_t>(m0.num_layers),
               H = static_cast<size_t>(m0.num_heads), N = static_cast<size_t>(m0.num_probes);
  s.sink_rate = FloatArray({C, L}, "checkpoint,layer");
  s.sink_score = FloatArray({C, L, H}, "checkpoint,layer,head");
  s.h_ratio = FloatArray({C, L + 1}, "checkpoint,layer");
  s.layer_share = FloatArray({C, L + 1}, "checkpoint,layer_index");
  s.first2_share = FloatArray({C}, "checkpoint");
  s.norm_gain_share = FloatArray({C, L}, "checkpoint,layer");
  s.max_sink_score = FloatArray({C}, "checkpoint");
  bool all_causal = true;
  for (const auto& a : ok) all_causal &= a.has_causal_profile();
  if (all_causal) {
    s.causal_layer_share = FloatArray({C, L + 1}, "checkpoint,embedding_or_layer");
    s.causal_first2_share = FloatArray({C}, "checkpoint");
  }
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
    s.max_sink_score.data[c] =
        *std::max_element(a.sink_score.data.begin(), a.sink_score.data.end());
    if (all_causal) {
      std::copy(a.causal_layer_share.data.begin(), a.causal_layer_share.data.end(),
                s.causal_layer_share.data.begin() + c * (L + 1));
      s.causal_first2_share.data[c] = a.causal_first2_share;
    }
    shares.push_back(a.layer_share.data);
  }
  std::vector<float> tv;
  convergence(shares, s.steps, tau, &tv, &s.convergence_step);
  s.convergence_tv = FloatArray({tv.size()}, "checkpoint_pair");
  s.convergence_tv.data = tv;

  // ---- bootstrap over probes (contract 1.2): replicate b draws N probe indices with
  // replacement, the same draws for every checkpoint, and recomputes every quantity from the
  // per-probe records of the analysis files.
  const size_t B = static_cast<size_t>(std::max<int64_t>(opt.bootstrap, 0));
  s.bootstrap_replicates = static_cast<int64_t>(B);
  s.bootstrap_seed = opt.bootstrap_seed;
  std::vector<std::vector<size_t>> draws(B, std::vector<size_t>(N));
  {
    std::mt19937_64 rng(static_cast<uint64_t>(opt.bootstrap_seed));
    std::uniform_int_distribution<size_t> pick(0, N - 1);
    for (auto& d : draws)
      for (auto& n : d) n = pick(rng);
  }
  std::vector<Resampled> q = {
      {"sink_score", {C, L, H}, {}},    {"max_sink_score", {C}, {}},
      {"sink_rate", {C, L}, {}},        {"h_ratio", {C, L + 1}, {}},
      {"norm_gain_share", {C, L}, {}},  {"layer_share", {C, L + 1}, {}},
      {"first2_share", {C}, {}},        {"causal_layer_share", {C, L + 1}, {}},
      {"causal_first2_share", {C}, {}},
  };
  if (!all_causal) q.resize(q.size() - 2);
  auto get = [&](const char* name) -> Resampled& {
    for (auto& r : q)
      if (r.name == name) return r;
    throw RuntimeFailure(std::string("no bootstrap quantity ") + name);
  };
  for (auto& r : q) {
    const size_t inner = FloatArray::count(r.shape) / C;
    r.values.assign(B, std::vector<float>(C * inner, std::nanf("")));
  }
  for (size_t c = 0; c < C; ++c) {
    const Analysis& a = ok[c];
    if (a.sink_score_per_probe.empty() || a.attr_layer_per_probe.empty()) continue;  // pre-1.2
    FloatArray ratio({N, L + 1}, "probe,layer_input");
    for (size_t i = 0; i < ratio.data.size(); ++i)
      ratio.data[i] = a.norm_p0.data[i] / a.norm_rest_median.data[i];
    for (size_t b = 0; b < B; ++b) {
      const std::vector<size_t>& idx = draws[b];
      const std::vector<double> alpha = resampled_mean(a.sink_score_per_probe, idx);
      double top = 0;
      for (size_t l = 0; l < L; ++l) {
        size_t over = 0;
        for (size_t h = 0; h < H; ++h) {
          const double v = alpha[l * H + h];
          get("sink_score").values[b][c * L * H + l * H + h] = static_cast<float>(v);
          top = std::max(top, v);
          if (v > a.meta.eps) ++over;
        }
        get("sink_rate").values[b][c * L + l] =
            static_cast<float>(static_cast<double>(over) / static_cast<double>(H));
      }
      get("max_sink_score").values[b][c] = static_cast<float>(top);
      const std::vector<double> h = resampled_mean(ratio, idx);
      std::vector<double> gain(L);
      for (size_t l = 0; l <= L; ++l)
        get("h_ratio").values[b][c * (L + 1) + l] = static_cast<float>(h[l]);
      for (size_t l = 0; l < L; ++l) {
        gain[l] = std::max(0.0, std::log(h[l + 1]) - std::log(h[l]));
        if (!std::isfinite(gain[l])) gain[l] = 0;
      }
      positive_shares(gain, get("norm_gain_share").values[b].data() + c * L);
      float* ls = get("layer_share").values[b].data() + c * (L + 1);
      positive_shares(resampled_mean(a.attr_layer_per_probe, idx), ls);
      get("first2_share").values[b][c] = (L >= 1 ? ls[1] : 0.f) + (L >= 2 ? ls[2] : 0.f);
      if (all_causal && !a.causal_drop_per_probe.empty()) {
        float* cs = get("causal_layer_share").values[b].data() + c * (L + 1);
        positive_shares(resampled_mean(a.causal_drop_per_probe, idx), cs);
        get("causal_first2_share").values[b][c] = (L >= 1 ? cs[1] : 0.f) + (L >= 2 ? cs[2] : 0.f);
      }
    }
  }
  for (const auto& r : q) {
    Sweep::Interval iv;
    iv.name = r.name;
    iv.se = FloatArray(r.shape, "");
    std::vector<size_t> ci_shape = r.shape;
    ci_shape.push_back(2);
    iv.ci95 = FloatArray(ci_shape, "");
    for (size_t i = 0; i < iv.se.data.size(); ++i) {
      std::vector<double> v;
      for (size_t b = 0; b < B; ++b)
        if (std::isfinite(r.values[b][i])) v.push_back(r.values[b][i]);
      double mean = 0, var = 0;
      for (double x : v) mean += x;
      mean /= std::max<size_t>(v.size(), 1);
      for (double x : v) var += (x - mean) * (x - mean);
      iv.se.data[i] = v.size() < 2
                          ? std::nanf("")
                          : static_cast<float>(std::sqrt(var / static_cast<double>(v.size() - 1)));
      iv.ci95.data[2 * i] = static_cast<float>(quantile(v, 0.025));
      iv.ci95.data[2 * i + 1] = static_cast<float>(quantile(v, 0.975));
    }
    s.bootstrap.push_back(iv);
  }

  // ---- convergence (contract 1.2) on the chosen profile.
  if (opt.convergence_profile != "causal" && opt.convergence_profile != "attribution")
    throw InputError("--convergence-profile '" + opt.convergence_profile +
                     "': expected causal or attribution");
  s.convergence_profile =
      opt.convergence_profile == "causal" && all_causal ? "causal" : "attribution";
  const bool causal = s.convergence_profile == "causal";
  const Resampled& profile_reps = get(causal ? "causal_layer_share" : "layer_share");
  ConvergenceInput in;
  in.tau = tau;
  in.steps = s.steps;
  s.noise_floor = FloatArray({C}, "checkpoint");
  for (size_t c = 0; c < C; ++c) {
    const FloatArray& p = causal ? ok[c].causal_layer_share : ok[c].layer_share;
    in.profiles.push_back(p.data);
    in.has_sink.push_back(s.max_sink_score.data[c] > ok[c].meta.eps);
    // The distance between two independent replicates of the same checkpoint, 95th percentile.
    std::vector<double> d;
    for (size_t b = 0; b + 1 < B; b += 2) {
      const float* x = profile_reps.values[b].data() + c * (L + 1);
      const float* y = profile_reps.values[b + 1].data() + c * (L + 1);
      if (std::isfinite(x[0]) && std::isfinite(y[0])) d.push_back(tv_distance(x, y, L + 1));
    }
    const double floor = d.empty() ? 0.0 : quantile(d, 0.95);
    s.noise_floor.data[c] = static_cast<float>(floor);
    in.noise_floor.push_back(floor);
  }
  const ConvergenceResult r = assess_convergence(in);
  const size_t P = r.distance.size();
  s.convergence_distance = FloatArray({P}, "checkpoint_pair");
  s.convergence_distance.data = r.distance;
  s.convergence_distance_per_doubling = FloatArray({P}, "checkpoint_pair");
  s.convergence_distance_per_doubling.data = r.distance_per_doubling;
  s.convergence_threshold = FloatArray({P}, "checkpoint_pair");
  s.convergence_threshold.data = r.threshold;
  s.convergence_still = IntArray({P}, "checkpoint_pair");
  s.convergence_still.data = r.still;
  s.convergence_outcome = r.outcome;
  s.converged_step = r.step;
  return s;
}

// ---- prefetching the next checkpoint of a sweep

std::vector<std::string> safetensors_files(const std::string& dir) {
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  std::vector<std::string> out;
  if (fs::exists(index)) {
    try {
      std::ifstream in(index);
      const nlohmann::json j = nlohmann::json::parse(in);
      std::set<std::string> shards;
      for (const auto& [tensor, shard] : j.at("weight_map").items())
        shards.insert(shard.get<std::string>());
      for (const auto& shard : shards) out.push_back((fs::path(dir) / shard).string());
    } catch (const std::exception&) {
      // A bad index is reported when the checkpoint is opened; there is nothing to read ahead.
    }
  } else if (fs::exists(fs::path(dir) / "model.safetensors")) {
    out.push_back((fs::path(dir) / "model.safetensors").string());
  }
  return out;
}

uint64_t default_prefetch_bytes() {
  uint64_t available_kb = 0;
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t value = 0;
  std::string unit;
  while (in >> key >> value >> unit)
    if (key == "MemAvailable:") available_kb = value;
  const uint64_t cap = uint64_t{16} << 30;
  return available_kb == 0 ? cap : std::min(cap, available_kb * 1024 / 4);
}

namespace {
double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
int env_int(std::initializer_list<const char*> names, int fallback) {
  for (const char* n : names)
    if (const char* v = std::getenv(n)) {
      char* end = nullptr;
      const long x = std::strtol(v, &end, 10);
      if (end != v && x >= 0) return static_cast<int>(x);
    }
  return fallback;
}
}  // namespace

struct Prefetcher::Impl {
  uint64_t budget = 0;
  std::thread worker;
  std::atomic<bool> stop{false};
  std::mutex m;
  Stats stats;
  int local_rank = 0, local_size = 1;

  void run(const std::string& dir) {
    constexpr size_t kChunk = size_t{8} << 20;
    std::vector<char> buf(kChunk);
    const double t0 = steady_seconds();
    uint64_t read = 0, planned = 0;  // planned: bytes of the host's budget handed out so far
    uint64_t chunk_index = 0;
    for (const std::string& path : safetensors_files(dir)) {
      if (stop || planned >= budget) break;
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) continue;
      const off_t size = ::lseek(fd, 0, SEEK_END);
      const uint64_t take =
          std::min<uint64_t>(static_cast<uint64_t>(std::max<off_t>(size, 0)), budget - planned);
      ::posix_fadvise(fd, 0, static_cast<off_t>(take), POSIX_FADV_SEQUENTIAL);
      for (uint64_t off = 0; off < take && !stop; off += kChunk, ++chunk_index) {
        if (static_cast<int>(chunk_index % static_cast<uint64_t>(local_size)) != local_rank)
          continue;
        const size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, take - off));
        // Ask for the next chunk of this rank's share while this one is read.
        ::posix_fadvise(fd, static_cast<off_t>(off + kChunk * local_size),
                        static_cast<off_t>(kChunk), POSIX_FADV_WILLNEED);
        size_t got = 0;
        while (got < n) {
          const ssize_t r = ::pread(fd, buf.data(), n - got, static_cast<off_t>(off + got));
          if (r <= 0) break;
          got += static_cast<size_t>(r);
        }
        read += got;
        if (got < n) break;
      }
      planned += take;
      ::close(fd);
    }
    std::lock_guard<std::mutex> lock(m);
    stats.bytes = read;
    stats.started = t0;
    stats.ended = steady_seconds();
    stats.seconds = stats.ended - t0;
  }
};

Prefetcher::Prefetcher(uint64_t budget_bytes) : impl_(std::make_unique<Impl>()) {
  impl_->budget = budget_bytes;
  impl_->local_size = std::max(
      1, env_int({"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"}, 1));
  impl_->local_rank =
      env_int({"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}, 0) %
      impl_->local_size;
}

Prefetcher::~Prefetcher() {
  impl_->stop = true;
  wait();
}

void Prefetcher::start(const std::string& dir) {
  impl_->stop = true;
  wait();
  impl_->stop = false;
  {
    std::lock_guard<std::mutex> lock(impl_->m);
    impl_->stats = Stats{};
  }
  if (impl_->budget == 0) return;
  impl_->worker = std::thread([this, dir] { impl_->run(dir); });
}

void Prefetcher::wait() {
  if (impl_->worker.joinable()) impl_->worker.join();
}

Prefetcher::Stats Prefetcher::last() {
  std::lock_guard<std::mutex> lock(impl_->m);
  return impl_->stats;
}

}  // namespace sinkscope
