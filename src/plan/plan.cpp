// The planner: coefficients (defaults, site file), layout enumeration, the printed plan
// (docs/planner.md).
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"
#include "sinkscope/plan.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {

PlanCoefficients default_coefficients(const std::string& device) {
  PlanCoefficients k;
  if (device == "cuda") {
    // One H200, measured by `sinkscope plan --calibrate --device cuda` in
    // bench/plan_validation_gpu.sh (2026-12-01, docs/results/2026-12-01-forward-h200.md, with
    // cuDNN's attention and the warp-specialised expert kernel): cuBLAS bf16 GEMM 734 TFLOP/s at
    // 32768 rows (half rate at 685), the fused attention 539 TFLOP/s, recording +19% and the
    // elementwise work 4.7 ns per token-layer-1024 dims of two Qwen3-30B-A3B layers; every pass of
    // the validation's six shapes within 0.84-1.42 of the measurement. The load rate is the earlier
    // calibration's warm load (3.4 GB/s; this one measured 2.3 on a freshly started machine): set
    // the filesystem's rate on a cluster. NVLink and InfiniBand bus bandwidths and per-step
    // latencies of NCCL collectives are not measured (one GPU).
    k.gemm_gflops = 734.0e3;
    k.gemm_half_m = 685.4;
    k.attention_gflops = 539.1e3;
    k.load_gbps = 3.41;
    k.intra_gbps = 150;
    k.intra_latency_us = 5;
    k.a2a_gbps = 150;
    k.a2a_latency_us = 5;
    k.inter_gbps = 20;
    k.inter_latency_us = 10;
    k.record_fraction = 0.19;
    k.elementwise_ns = 4.686;
    k.base_mib = 853;
    k.startup_s = 20;
    k.source = "H200 defaults (calibrated 2026-12-01)";
  } else {
    // The development VM of docs/benchmarks.md, one thread: OpenBLAS sgemm 98.8 GFLOP/s at
    // 512 x 1024 x 1024 and 67.2 at 64 rows (half rate at 30 rows); weights streamed from memory
    // at 21 GB/s (the calibration's 512 MB copy, idle, 2026-12-01); Open MPI 4.1's shared-memory
    // collectives between its 2 ranks as the CPU calibration measured them idle (2026-12-01):
    // all-reduce 3 GB/s + 7 us per step, all-to-all 5 GB/s + 2 us. Across nodes: not measured.
    k.gemm_gflops = 98.8;
    k.gemm_half_m = 30;
    k.attention_gflops = 25;
    k.load_gbps = 1.0;
    k.mem_gbps = 21;
    k.intra_gbps = 3.0;
    k.intra_latency_us = 7;
    k.a2a_gbps = 5.0;
    k.a2a_latency_us = 2;
    k.inter_gbps = 1;
    k.inter_latency_us = 20;
    k.record_fraction = 0.15;
    k.base_mib = 60;
    k.startup_s = 0.3;
    k.source = "documented CPU defaults (not calibrated)";
  }
  return k;
}

namespace {
struct Key {
  const char* name;
  double PlanCoefficients::*field;
};
const Key kKeys[] = {{"GEMM_GFLOPS", &PlanCoefficients::gemm_gflops},
                     {"GEMM_HALF_M", &PlanCoefficients::gemm_half_m},
                     {"ATTENTION_GFLOPS", &PlanCoefficients::attention_gflops},
                     {"LOAD_GBPS", &PlanCoefficients::load_gbps},
                     {"MEM_GBPS", &PlanCoefficients::mem_gbps},
                     {"INTRA_GBPS", &PlanCoefficients::intra_gbps},
                     {"INTRA_LATENCY_US", &PlanCoefficients::intra_latency_us},
                     {"A2A_GBPS", &PlanCoefficients::a2a_gbps},
                     {"A2A_LATENCY_US", &PlanCoefficients::a2a_latency_us},
                     {"INTER_GBPS", &PlanCoefficients::inter_gbps},
                     {"INTER_LATENCY_US", &PlanCoefficients::inter_latency_us},
                     {"CORES", &PlanCoefficients::cores},
                     {"RECORD_FRACTION", &PlanCoefficients::record_fraction},
                     {"ELEMENTWISE_NS", &PlanCoefficients::elementwise_ns},
                     {"BASE_MIB", &PlanCoefficients::base_mib},
                     {"STARTUP_S", &PlanCoefficients::startup_s}};
// Coefficients that divide (a zero would make every time infinite).
bool is_rate(double PlanCoefficients::*field) {
  return field == &PlanCoefficients::gemm_gflops || field == &PlanCoefficients::attention_gflops ||
         field == &PlanCoefficients::load_gbps || field == &PlanCoefficients::intra_gbps ||
         field == &PlanCoefficients::a2a_gbps || field == &PlanCoefficients::inter_gbps;
}
std::string prefix(const std::string& device) {
  return device == "cuda" ? "SINKSCOPE_PLAN_CUDA_" : "SINKSCOPE_PLAN_";
}
std::string trim(std::string s) {
  const auto b = s.find_first_not_of(" \t\r"), e = s.find_last_not_of(" \t\r");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}
}  // namespace

std::map<std::string, std::string> read_site_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError("--cluster " + path + ": cannot read");
  std::map<std::string, std::string> kv;
  std::string line;
  while (std::getline(in, line)) {
    line = trim(line);
    if (line.empty() || line[0] == '#') continue;
    if (line.rfind("export ", 0) == 0) line = trim(line.substr(7));
    const auto eq = line.find('=');
    if (eq == std::string::npos) continue;
    std::string key = line.substr(0, eq), value = line.substr(eq + 1);
    if (!value.empty() && (value[0] == '"' || value[0] == '\'')) {
      const auto close = value.find(value[0], 1);
      value = value.substr(1, close == std::string::npos ? std::string::npos : close - 1);
    } else {
      const auto hash = value.find(" #");
      value = trim(hash == std::string::npos ? value : value.substr(0, hash));
    }
    kv[key] = value;
  }
  return kv;
}

PlanCoefficients coefficients_from(const std::map<std::string, std::string>& kv,
                                   const std::string& device) {
  PlanCoefficients k = default_coefficients(device);
  int found = 0;
  for (const Key& key : kKeys) {
    const auto it = kv.find(prefix(device) + key.name);
    if (it == kv.end() || it->second.empty()) continue;
    char* end = nullptr;
    const double v = std::strtod(it->second.c_str(), &end);
    if (end == it->second.c_str() || *end != '\0' || !(v >= 0) || !std::isfinite(v))
      throw InputError(it->first + "=" + it->second + ": not a non-negative number");
    if (v == 0 && is_rate(key.field))
      throw InputError(it->first + "=" + it->second + ": a rate must be positive");
    k.*key.field = v;
    ++found;
  }
  if (found > 0)
    k.source = std::to_string(found) + " of " + std::to_string(std::size(kKeys)) +
               " coefficients from the site file (" + prefix(device) + "*), the rest " +
               (device == "cuda" ? "H200" : "CPU") + " defaults";
  return k;
}

std::vector<std::pair<std::string, std::string>> coefficient_keys(const PlanCoefficients& k,
                                                                  const std::string& device) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const Key& key : kKeys) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.4g", k.*key.field);
    out.emplace_back(prefix(device) + key.name, buf);
  }
  return out;
}

void write_coefficients(const std::string& site_file, const PlanCoefficients& k,
                        const std::string& device) {
  std::vector<std::string> lines;
  {
    std::ifstream in(site_file);
    std::string line;
    while (std::getline(in, line)) lines.push_back(line);
  }
  for (const auto& [key, value] : coefficient_keys(k, device)) {
    bool replaced = false;
    for (auto& line : lines)
      if (line.rfind(key + "=", 0) == 0) {
        line = key + "=" + value;
        replaced = true;
      }
    if (!replaced) {
      if (std::none_of(lines.begin(), lines.end(), [](const std::string& l) {
            return l.find("measured by `sinkscope plan --calibrate`") != std::string::npos;
          }))
        lines.push_back(
            "# Planner coefficients measured by `sinkscope plan --calibrate` (docs/planner.md).");
      lines.push_back(key + "=" + value);
    }
  }
  std::ofstream out(site_file + ".tmp");
  for (const auto& l : lines) out << l << "\n";
  if (!out.flush()) throw RuntimeFailure("cannot write " + site_file + ".tmp");
  out.close();
  if (std::rename((site_file + ".tmp").c_str(), site_file.c_str()) != 0)
    throw RuntimeFailure("cannot replace " + site_file);
}

void apply_site_defaults(const std::map<std::string, std::string>& site, PlanRequest* r) {
  auto num = [&](const char* key) -> double {
    const auto it = site.find(key);
    if (it == site.end() || it->second.empty()) return 0;
    char* end = nullptr;
    const double v = std::strtod(it->second.c_str(), &end);
    return end != it->second.c_str() && *end == '\0' && v > 0 ? v : 0;
  };
  if (r->nodes <= 0) r->nodes = std::max(1, static_cast<int>(num("SITE_NODES")));
  if (r->ranks_per_node <= 0) {
    int g = static_cast<int>(num("SITE_GPUS_PER_NODE"));
    if (g <= 0 && num("SITE_RANKS") > 0) g = static_cast<int>(num("SITE_RANKS")) / r->nodes;
    r->ranks_per_node = std::max(1, g);
  }
  if (r->device_mem_gib <= 0) r->device_mem_gib = num("SINKSCOPE_PLAN_GPU_MEM_GIB");
  if (r->device_mem_gib <= 0) r->device_mem_gib = 139;
  if (r->node_mem_gib <= 0) r->node_mem_gib = num("SINKSCOPE_PLAN_NODE_MEM_GIB");
  if (r->node_mem_gib <= 0) {
    std::ifstream in("/proc/meminfo");
    std::string key;
    double kb = 0;
    while (in >> key) {
      if (key == "MemTotal:") {
        in >> kb;
        break;
      }
      std::getline(in, key);
    }
    r->node_mem_gib = kb / 1024.0 / 1024.0;
  }
}

double this_machine_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<double>(n) : 1.0;
}

Plan make_plan(const PlanRequest& r, const PlanCoefficients& k) {
  Plan p;
  p.req = r;
  p.coef = k;
  p.flops = forward_flops(r.cfg, r.seq_len);
  p.ablation_passes = r.ablation_passes >= 0 ? r.ablation_passes : 1 + 3 * r.cfg.num_layers;
  if (r.probes < 1 || r.seq_len < 2) throw InputError("plan: the probes need N >= 1 and T >= 2");
  if (r.ranks_per_node < 1 || r.nodes < 1) throw InputError("plan: ranks per node and nodes >= 1");
  const int total = r.ranks_per_node * r.nodes;
  std::vector<int> worlds;
  for (int w = 1; w < r.ranks_per_node; w *= 2) worlds.push_back(w);
  for (int m = 1; m <= r.nodes; ++m) worlds.push_back(m * r.ranks_per_node);
  for (int w : worlds) {
    for (int tp = 1; tp <= w; ++tp) {
      if (w % tp || (r.tp > 0 && tp != r.tp)) continue;
      for (int ep = 1; ep <= w; ++ep) {
        if (w % ep || (r.ep > 0 && ep != r.ep)) continue;
        if (r.cfg.num_experts == 0 && ep > 1) continue;
        try {
          ShardPlan::make(w, 0, tp, ep, r.cfg, r.device == "cuda" ? 1 : 0);
        } catch (const InputError&) {
          continue;
        }
        p.layouts.push_back(predict_layout(r, k, w, tp, ep));
      }
    }
  }
  for (int i = 0; i < static_cast<int>(p.layouts.size()); ++i) {
    const LayoutPlan& l = p.layouts[static_cast<size_t>(i)];
    if (!l.fits) continue;
    if (p.smallest_fitting < 0 ||
        l.world < p.layouts[static_cast<size_t>(p.smallest_fitting)].world ||
        (l.world == p.layouts[static_cast<size_t>(p.smallest_fitting)].world &&
         l.checkpoint_s < p.layouts[static_cast<size_t>(p.smallest_fitting)].checkpoint_s))
      p.smallest_fitting = i;
    if (l.world != total) continue;
    if (p.recommended < 0 ||
        l.checkpoint_s < p.layouts[static_cast<size_t>(p.recommended)].checkpoint_s)
      p.recommended = i;
  }
  if (p.recommended < 0 && p.smallest_fitting >= 0) {
    // Nothing of the whole allocation is accepted (e.g. heads do not split that far): the fastest
    // of the largest world that has a fitting layout.
    for (int i = 0; i < static_cast<int>(p.layouts.size()); ++i) {
      const LayoutPlan& l = p.layouts[static_cast<size_t>(i)];
      if (!l.fits) continue;
      if (p.recommended < 0 || l.world > p.layouts[static_cast<size_t>(p.recommended)].world ||
          (l.world == p.layouts[static_cast<size_t>(p.recommended)].world &&
           l.checkpoint_s < p.layouts[static_cast<size_t>(p.recommended)].checkpoint_s))
        p.recommended = i;
    }
  }
  if (p.recommended >= 0) {
    const LayoutPlan& b = p.layouts[static_cast<size_t>(p.recommended)];
    const double mem = r.device == "cuda" ? b.device_gib : b.host_gib;
    char buf[400];
    int n_fit = 0;
    for (const auto& l : p.layouts) n_fit += l.fits && l.world == b.world;
    const char* dominant = b.exchange_s > b.forward_s ? "exchange"
                           : b.load_s > b.forward_s * (1 + static_cast<double>(p.ablation_passes))
                               ? "checkpoint load"
                               : "forward";
    std::snprintf(buf, sizeof(buf),
                  "fastest of the %d layouts on %d rank(s) that fit: %.3g GiB per rank of %.3g "
                  "(%s), time per checkpoint dominated by the %s",
                  n_fit, b.world, mem, r.device == "cuda" ? r.device_mem_gib : r.node_mem_gib,
                  r.device == "cuda" ? "per GPU" : "per node", dominant);
    p.why = buf;
  }
  return p;
}

std::string slurm_time(double seconds) {
  const long s = static_cast<long>(std::ceil(std::max(seconds, 60.0)));
  char buf[32];
  if (s >= 86400)
    std::snprintf(buf, sizeof(buf), "%ld-%02ld:%02ld:%02ld", s / 86400, s % 86400 / 3600,
                  s % 3600 / 60, s % 60);
  else
    std::snprintf(buf, sizeof(buf), "%02ld:%02ld:%02ld", s / 3600, s % 3600 / 60, s % 60);
  return buf;
}

namespace {
std::string human_s(double s) {
  char buf[32];
  if (s < 120)
    std::snprintf(buf, sizeof(buf), "%.3g s", s);
  else if (s < 7200)
    std::snprintf(buf, sizeof(buf), "%.1f min", s / 60);
  else
    std::snprintf(buf, sizeof(buf), "%.1f h", s / 3600);
  return buf;
}
std::string row(const LayoutPlan& l, bool cuda) {
  char buf[400];
  std::snprintf(
      buf, sizeof(buf),
      "| %d | %d | %d | %d | %d | %d | %.2f | %.2f | %.2f | %s | %.3g | %.3g | %.3g | %.3g | "
      "%.3g | %s | %s |",
      l.world, l.nodes, l.tp, l.ep, l.etp, l.dp, l.weight_gib, l.scratch_gib,
      cuda ? l.device_gib : l.host_gib, l.fits ? "yes" : ("**no**: " + l.why_not).c_str(), l.load_s,
      l.forward_s, l.record_s, l.ablation_s, l.exchange_s, human_s(l.checkpoint_s).c_str(),
      human_s(l.sweep_s).c_str());
  return buf;
}
}  // namespace

std::string format_plan(const Plan& p) {
  const PlanRequest& r = p.req;
  const ModelConfig& c = r.cfg;
  const bool cuda = r.device == "cuda";
  std::ostringstream os;
  char buf[1000];
  const ShardParams all = shard_params(c, 1, 1, 1);
  std::snprintf(
      buf, sizeof(buf),
      "plan: %s, %lld layers, hidden %lld, heads %lld/%lld (dim %lld), experts %lld top-%lld "
      "(width %lld), vocab %lld: %.3g B parameters\n",
      c.model_type.c_str(), static_cast<long long>(c.num_layers),
      static_cast<long long>(c.hidden_size), static_cast<long long>(c.num_heads),
      static_cast<long long>(c.num_kv_heads), static_cast<long long>(c.head_dim),
      static_cast<long long>(c.num_experts), static_cast<long long>(c.top_k),
      static_cast<long long>(c.moe_intermediate_size), static_cast<long long>(c.vocab_size),
      static_cast<double>(all.total_model) / 1e9);
  os << buf;
  std::snprintf(
      buf, sizeof(buf),
      "probes %lld x %lld, micro-batch %lld, %lld checkpoint(s)%s, device %s, %d x %d %s; "
      "%lld ablated passes per checkpoint%s\n",
      static_cast<long long>(r.probes), static_cast<long long>(r.seq_len),
      static_cast<long long>(r.batch), static_cast<long long>(r.checkpoints),
      r.max_parallel > 0 ? (", at most " + std::to_string(r.max_parallel) + " at once").c_str()
                         : " all at once",
      r.device.c_str(), r.nodes, r.ranks_per_node, cuda ? "GPUs" : "ranks",
      static_cast<long long>(p.ablation_passes),
      r.ablation_passes < 0 ? " (the causal profile of a sweep: 1 + 3 x layers)" : "");
  os << buf;
  const ForwardFlops& f = p.flops;
  std::snprintf(
      buf, sizeof(buf),
      "forward GFLOP per token: %.4g (projections %.4g, attention %.4g at T=%lld, experts "
      "%.4g, shared experts %.4g, dense MLP %.4g, router %.4g)\n",
      f.total() / 1e9, f.projections / 1e9, f.attention / 1e9, static_cast<long long>(r.seq_len),
      f.experts / 1e9, f.shared_experts / 1e9, f.dense_mlp / 1e9, f.router / 1e9);
  os << buf;
  const PlanCoefficients& k = p.coef;
  std::snprintf(buf, sizeof(buf),
                "coefficients: GEMM %.4g GFLOP/s (half rate at %.3g rows), attention %.4g GFLOP/s, "
                "elementwise %.3g ns per token-layer-1024 dims, load %.3g GB/s, all-reduce %.3g "
                "GB/s + %.3g us per step and all-to-all %.3g GB/s + %.3g us in a node, %.3g GB/s + "
                "%.3g us across, recording +%.0f%%, base %.0f MiB, startup %.3g s",
                k.gemm_gflops, k.gemm_half_m, k.attention_gflops, k.elementwise_ns, k.load_gbps,
                k.intra_gbps, k.intra_latency_us, k.a2a_gbps, k.a2a_latency_us, k.inter_gbps,
                k.inter_latency_us, 100 * k.record_fraction, k.base_mib, k.startup_s);
  os << buf;
  if (k.mem_gbps > 0) {
    std::snprintf(buf, sizeof(buf), ", weights streamed at %.3g GB/s", k.mem_gbps);
    os << buf;
  }
  if (!cuda && k.cores > 0) {
    std::snprintf(buf, sizeof(buf), ", %.3g cores per node", k.cores);
    os << buf;
  }
  os << "; " << k.source << "\n";
  if (cuda && (c.mla() || c.family->gpt_oss_layout))
    os << "note: the CUDA backend holds " << c.model_type
       << "'s weights in bf16 on the device, dequantised on load from "
       << (c.mla() ? "FP8" : "MXFP4") << "\n";
  std::snprintf(
      buf, sizeof(buf), "limits: %s%.4g GiB host memory per node\n\n",
      cuda ? (std::to_string(r.device_mem_gib).substr(0, 5) + " GiB per GPU, ").c_str() : "",
      r.node_mem_gib);
  os << buf;
  os << "| ranks | nodes | tp | ep | etp | dp | weights GiB/rank | scratch GiB/rank | "
     << (cuda ? "device" : "host") << " GiB/rank | fits | load s | forward s | recording s | "
     << "ablations s | exchange s | per checkpoint | sweep |\n"
     << "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  const int total = r.ranks_per_node * r.nodes;
  // Every layout of the whole allocation; of smaller worlds the fastest fitting one (or, when
  // none fits, the one with the least memory).
  std::vector<int> shown;
  for (int i = 0; i < static_cast<int>(p.layouts.size()); ++i)
    if (p.layouts[static_cast<size_t>(i)].world == total) shown.push_back(i);
  std::vector<int> worlds;
  for (const auto& l : p.layouts)
    if (l.world != total && std::find(worlds.begin(), worlds.end(), l.world) == worlds.end())
      worlds.push_back(l.world);
  for (int w : worlds) {
    int best = -1;
    for (int i = 0; i < static_cast<int>(p.layouts.size()); ++i) {
      const LayoutPlan& l = p.layouts[static_cast<size_t>(i)];
      if (l.world != w) continue;
      if (best < 0) {
        best = i;
        continue;
      }
      const LayoutPlan& b = p.layouts[static_cast<size_t>(best)];
      const double lm = cuda ? l.device_gib : l.host_gib, bm = cuda ? b.device_gib : b.host_gib;
      if ((l.fits && !b.fits) || (l.fits && b.fits && l.checkpoint_s < b.checkpoint_s) ||
          (!l.fits && !b.fits && lm < bm))
        best = i;
    }
    shown.push_back(best);
  }
  for (int i : shown) {
    os << row(p.layouts[static_cast<size_t>(i)], cuda);
    if (i == p.recommended) os << " <- recommended";
    os << "\n";
  }
  if (p.layouts.empty()) os << "(no layout of these ranks is accepted by the shard plan)\n";
  os << "\n";
  if (std::any_of(shown.begin(), shown.end(),
                  [&](int i) { return p.layouts[static_cast<size_t>(i)].cpu_share < 1; })) {
    std::snprintf(
        buf, sizeof(buf),
        "oversubscribed: where a node's ranks x %d thread(s) exceed its %.3g cores, every "
        "rank computes at cores / (ranks x threads) of the calibrated rates\n",
        r.threads, k.cores);
    os << buf;
  }
  if (p.recommended >= 0) {
    const LayoutPlan& b = p.layouts[static_cast<size_t>(p.recommended)];
    std::snprintf(buf, sizeof(buf),
                  "recommended: %d rank(s) on %d node(s), --tp %d --ep %d (etp %d, dp %d): %s per "
                  "checkpoint, sweep of %lld in %s\n  why: %s\n",
                  b.world, b.nodes, b.tp, b.ep, b.etp, b.dp, human_s(b.checkpoint_s).c_str(),
                  static_cast<long long>(r.checkpoints), human_s(b.sweep_s).c_str(), p.why.c_str());
    os << buf;
  } else {
    os << "recommended: none: no layout of " << total << " rank(s) fits in memory\n";
  }
  if (p.smallest_fitting >= 0) {
    const LayoutPlan& s = p.layouts[static_cast<size_t>(p.smallest_fitting)];
    std::snprintf(buf, sizeof(buf),
                  "smallest layout that fits: %d rank(s), --tp %d --ep %d (%.3g GiB per rank; %s "
                  "per checkpoint)\n",
                  s.world, s.tp, s.ep, cuda ? s.device_gib : s.host_gib,
                  human_s(s.checkpoint_s).c_str());
    os << buf;
  } else {
    double least = 1e300;
    for (const auto& l : p.layouts) least = std::min(least, cuda ? l.device_gib : l.host_gib);
    std::snprintf(buf, sizeof(buf),
                  "smallest layout that fits: none within %d rank(s) (least memory per rank "
                  "%.3g GiB): more nodes or GPUs are needed\n",
                  total, least);
    os << buf;
  }
  return os.str();
}

std::string format_plan_shell(const Plan& p, double margin) {
  std::ostringstream os;
  const int i = p.recommended;
  os << "PLAN_FITS=" << (i >= 0 ? 1 : 0) << "\n";
  if (i < 0) return os.str();
  const LayoutPlan& b = p.layouts[static_cast<size_t>(i)];
  const int rpn = std::min(b.world, p.req.ranks_per_node);
  const double host_node_gib = b.host_gib * rpn;
  os << "PLAN_RANKS=" << b.world << "\nPLAN_NODES=" << b.nodes << "\nPLAN_TP=" << b.tp
     << "\nPLAN_EP=" << b.ep << "\nPLAN_TIME=" << slurm_time(b.checkpoint_s * margin + 300)
     << "\nPLAN_MEM=" << static_cast<long>(std::ceil(host_node_gib * 1.25 + 1)) << "G"
     << "\nPLAN_CHECKPOINT_S=" << b.checkpoint_s
     << "\nPLAN_PASS_S=" << b.forward_s + b.record_s + b.exchange_s << "\nPLAN_RANK_MIB="
     << static_cast<long>((p.req.device == "cuda" ? b.device_gib : b.host_gib) * 1024) << "\n";
  return os.str();
}

}  // namespace sinkscope
