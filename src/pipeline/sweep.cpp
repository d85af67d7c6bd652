#include "sinkscope/sweep.hpp"

#include <glob.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <regex>

#include "sinkscope/checkpoint.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/recorder.hpp"

namespace sinkscope {
namespace fs = std::filesystem;

int64_t step_from_name(const std::string& folder) {
  const std::string base =
      fs::path(folder).lexically_normal().filename().string().empty()
          ? fs::path(folder).lexically_normal().parent_path().filename().string()
          : fs::path(folder).lexically_normal().filename().string();
  std::smatch m;
  if (std::regex_search(base, m,
                        std::regex("(?:step|iter|checkpoint)[-_]?(\\d+)", std::regex::icase)))
    return std::stoll(m[1]);
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

bool analysis_file_matches(const std::string& path, const std::string& sha, const ModelConfig& c,
                           std::string* why) {
  if (!fs::exists(path)) {
    if (why) *why = "missing";
    return false;
  }
  try {
    const Analysis a = read_analysis(path);
    const AnalysisMeta& m = a.meta;
    if (m.tokens_sha256 != sha) {
      if (why) *why = "made with other probes";
      return false;
    }
    if (m.num_layers != c.num_layers || m.num_heads != c.num_heads ||
        m.num_experts != c.num_experts || m.hidden_size != c.hidden_size ||
        m.num_kv_heads != c.num_kv_heads || m.head_dim != c.head_dim) {
      if (why) *why = "made for another model shape";
      return false;
    }
    return true;
  } catch (const std::exception& e) {
    if (why) *why = std::string("damaged (") + e.what() + ")";
    return false;
  }
}

Sweep assemble_sweep(const std::vector<SweepCheckpoint>& cps, const std::string& outdir,
                     double tau) {
  Sweep s;
  s.tau = tau;
  std::vector<Analysis> ok;
  for (const auto& c : cps) {
    const std::string path = (fs::path(outdir) / "checkpoints" / (c.name + ".h5")).string();
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
