// analyze_checkpoint: the per-checkpoint pipeline shared by `analyze`, `sweep` and the tests.
#include "sinkscope/analyze.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <future>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <string_view>

#include "io/bounded_text.hpp"
#include "sinkscope/build_config.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"
#include "sinkscope/limits.hpp"
#include "sinkscope/model.hpp"
#include "sinkscope/parallel.hpp"
#include "sinkscope/placement.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/recorder.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {

std::string utc_now_iso8601() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

AblateSpec parse_ablate(const std::string& spec, int64_t num_layers) {
  AblateSpec s;
  if (spec.empty()) return s;
  // layers=A, layers=A-B, top=K, search or search:K, parsed by hand (no regex on untrusted text);
  // every number is checked without overflow and named in the error.
  const std::string option = "--ablate '" + excerpt(spec) + "'";
  const auto number = [&](std::string_view text, int64_t* value) {
    uint64_t parsed = 0;
    if (!parse_decimal(text, static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), &parsed))
      throw InputError(option + ": '" + excerpt(text) + "' is not a whole number below 2^63");
    *value = static_cast<int64_t>(parsed);
  };
  const std::string_view text(spec);
  if (text.substr(0, 7) == "layers=" && text.size() > 7) {
    const std::string_view range = text.substr(7);
    const size_t dash = range.find('-');
    s.kind = AblateSpec::kLayers;
    number(range.substr(0, dash), &s.first);
    s.last = s.first;
    if (dash != std::string_view::npos) number(range.substr(dash + 1), &s.last);
    if (s.first > s.last || s.last >= num_layers)
      throw InputError(option + ": layers must lie in 0-" + std::to_string(num_layers - 1));
    return s;
  }
  if (text.substr(0, 4) == "top=" && text.size() > 4) {
    s.kind = AblateSpec::kTop;
    number(text.substr(4), &s.top);
    if (s.top <= 0) throw InputError(option + ": K must be positive");
    return s;
  }
  if (text == "search" || (text.substr(0, 7) == "search:" && text.size() > 7)) {
    s.kind = AblateSpec::kSearch;
    s.top = 0;
    if (text.size() > 6) {
      number(text.substr(7), &s.top);
      if (s.top <= 0) throw InputError(option + ": K must be positive");
    }
    return s;
  }
  throw InputError(option + ": expected layers=A-B, top=K or search[:K]");
}

void run_agreed(const Comm& world, const std::function<void()>& fn) {
  std::string message;
  int kind = 0;  // 1 input, 2 runtime
  try {
    fn();
  } catch (const InputError& e) {
    message = e.what();
    kind = 1;
  } catch (const std::exception& e) {
    message = e.what();
    kind = 2;
  }
  const int first = world.first_failed_rank(kind == 0);
  if (first < 0) return;
  std::string payload = std::to_string(kind) + message;
  world.broadcast_bytes(&payload, first);
  if (payload.empty() || payload[0] == '1') {
    InputError e(payload.substr(1));
    e.agreed = true;
    throw e;
  }
  throw RuntimeFailure(payload.substr(1));
}

namespace {

// VmHWM of this process (peak resident set), 0 where /proc is not available.
uint64_t peak_rss_bytes() {
  std::ifstream in("/proc/self/status");
  std::string key;
  uint64_t kb = 0;
  while (in >> key) {
    if (key == "VmHWM:") {
      in >> kb;
      break;
    }
    std::getline(in, key);
  }
  return kb << 10;
}

// The K components with the largest sink-weighted positive attribution (the layer_share weights
// of docs/metrics.md section 5, per component).
std::vector<Ablation> top_components(const Analysis& a, const ModelConfig& c, int64_t K) {
  const size_t L = a.sink_score.shape[0], H = a.sink_score.shape[1];
  std::vector<std::pair<double, Ablation>> scored;
  for (const ComponentKindInfo& kind : component_kinds()) {
    const FloatArray& attr = a.attr_of(kind.kind);
    const size_t width = kind.indexed ? attr.shape.at(3) : 1;
    for (size_t l = 0; l < (kind.per_layer ? L : 1); ++l)
      for (int64_t i = 0; i < component_count(c, kind.kind, static_cast<int64_t>(l)); ++i) {
        double s = 0;
        for (size_t t = 0; t < L; ++t)
          for (size_t h = 0; h < H; ++h) {
            const size_t at = !kind.per_layer ? t * H + h
                              : kind.indexed
                                  ? ((t * H + h) * L + l) * width + static_cast<size_t>(i)
                                  : (t * H + h) * L + l;
            s += a.sink_score.at(t, h) * std::max(0.f, attr.data[at]);
          }
        scored.push_back({s, {static_cast<int32_t>(l), kind.kind, static_cast<int32_t>(i)}});
      }
  }
  std::stable_sort(scored.begin(), scored.end(),
                   [](const auto& x, const auto& y) { return x.first > y.first; });
  std::vector<Ablation> out;
  for (size_t i = 0; i < scored.size() && static_cast<int64_t>(i) < K; ++i)
    out.push_back(scored[i].second);
  return out;
}

std::string encode_components(const std::vector<Ablation>& comps) {
  std::string list;
  for (const auto& c : comps)
    list += std::to_string(c.layer) + " " + std::to_string(static_cast<int>(c.kind)) + " " +
            std::to_string(c.index) + " ";
  return list;
}

std::vector<Ablation> decode_components(const std::string& list) {
  std::vector<Ablation> comps;
  std::istringstream is(list);
  int32_t l, k, i;
  while (is >> l >> k >> i) comps.push_back({l, static_cast<ComponentKind>(k), i});
  return comps;
}

// The components mean-ablated for source index `index` of the profiles (0: the embedding,
// 1 + l: every component of layer l), restricted to heads (part 0), to the rest (part 1) or not
// (part 2).
std::vector<Ablation> index_components(const ModelConfig& c, int64_t index, int part) {
  if (index == 0) return {{0, ComponentKind::kEmbedding, 0}};
  std::vector<Ablation> out;
  for (const Ablation& a : components_of_layers(c, index - 1, index - 1))
    if (part == 2 || (part == 0) == (a.kind == ComponentKind::kHead)) out.push_back(a);
  return out;
}

// The smallest number of leading entries of `values` (sorted descending) whose positive parts
// reach `share` of the sum of all positive parts; 0 when nothing is positive.
int64_t smallest_leading_set(const std::vector<double>& values, double share) {
  double total = 0;
  for (double v : values) total += std::max(0.0, v);
  if (total <= 0) return 0;
  double sum = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    sum += std::max(0.0, values[i]);
    if (sum >= share * total * (1 - 1e-12)) return static_cast<int64_t>(i) + 1;
  }
  return static_cast<int64_t>(values.size());
}

// Starts the setup of backend `device` that needs no model (BackendEntry::prepare) for this rank;
// an invalid future where the backend has none or `device` is unknown (reported later).
std::future<void> prepare_backend(const std::string& device, const NodeMap& nodes, int rank) {
  const std::vector<std::string> names = backend_names();
  if (std::find(names.begin(), names.end(), device) == names.end()) return {};
  const BackendEntry& entry = find_backend(device);
  if (!entry.prepare || rank >= static_cast<int>(nodes.node_of_rank.size())) return {};
  return entry.prepare(nodes.local_rank(rank));  // as the placement numbers the node's ranks
}

}  // namespace

Analysis analyze_checkpoint(const AnalyzeOptions& opt, const IntArray& tokens, const Comm& world) {
  std::optional<Checkpoint> ck;
  ModelConfig synthetic_cfg;
  ShardPlan plan;
  AblateSpec ablate;
  const BackendEntry* backend_entry = nullptr;
  const bool synthetic = opt.synthetic_seed >= 0;
  const auto read_start = std::chrono::steady_clock::now();
  // Collective, so outside the checks below (a rank that failed one would not join it).
  std::optional<NodeMap> discovered;
  if (!opt.nodes) discovered = discover_nodes(world);
  const NodeMap& nodes = opt.nodes ? *opt.nodes : *discovered;
  // The CUDA context is created beside the checkpoint's open and the planning.
  std::future<void> prepared = prepare_backend(opt.device, nodes, world.rank());
  run_agreed(world, [&] {
    backend_entry = &find_backend(opt.device);
    if (synthetic) {
      // Benchmarks only: random weights of config.json's shape, made on the device.
      synthetic_cfg = parse_model_config(opt.model_config);
    } else {
      ck.emplace(Checkpoint::open(opt.model));
      validate_checkpoint(*ck);
    }
    const ModelConfig& c = ck ? ck->config() : synthetic_cfg;
    check_token_ids(tokens, c.vocab_size, opt.tokens_source);
    if (tokens.shape.at(1) < 2)
      throw InputError(opt.tokens_source + ": probes need at least 2 positions");
    // Per-layer windows (gpt-oss `layer_types`) are honoured (metrics 1.4); a window on every layer
    // (Mixtral, Qwen) keeps contract 1.1: probes must fit in it.
    if (c.sliding_window > 0 && c.sliding_layers.empty() &&
        static_cast<int64_t>(tokens.shape.at(1)) > c.sliding_window)
      throw InputError(opt.tokens_source + ": probes of " + std::to_string(tokens.shape.at(1)) +
                       " tokens are longer than the model's sliding_window (" +
                       std::to_string(c.sliding_window) +
                       "): position 0 would leave the window of later queries");
    // The CUDA backend keeps whole experts (etp = 1) for now; the CPU default follows
    // Megatron-Core.
    const int etp = opt.etp > 0 ? opt.etp : (opt.device == "cpu" ? 0 : 1);
    PlacementOptions placing;
    placing.ep = parse_ep_placement(opt.ep_placement);
    placing.allow_tp_across_nodes = opt.allow_tp_across_nodes;
    plan = make_placed_plan(nodes, world.rank(), opt.tp, opt.ep, c, etp, placing);
    ablate = parse_ablate(opt.ablate, c.num_layers);
    if (opt.batch < 1 || opt.batch > kMaxBatch)
      throw InputError("--batch " + std::to_string(opt.batch) + ": must lie in 1-" +
                       std::to_string(kMaxBatch));
    if (opt.threads < 1 || opt.threads > kMaxThreads)
      throw InputError("--threads " + std::to_string(opt.threads) + ": must lie in 1-" +
                       std::to_string(kMaxThreads));
    backend_entry->check(c, plan, synthetic);
  });
  const ModelConfig& cfg = ck ? ck->config() : synthetic_cfg;
  const int64_t N = static_cast<int64_t>(tokens.shape[0]),
                T = static_cast<int64_t>(tokens.shape[1]);

  const ParallelContext par(world, plan);
  std::unique_ptr<Backend> backend;
  run_agreed(world, [&] {
    BackendInputs in;
    in.ckpt = ck ? &*ck : nullptr;
    in.cfg = &cfg;
    in.plan = &par.plan();
    in.comms = par.comms();
    in.options.threads = opt.threads;
    in.options.load_progress = opt.load_progress;
    in.synthetic_seed = opt.synthetic_seed;
    if (prepared.valid()) prepared.wait();
    backend = backend_entry->make(in);
  });
  const auto compute_start = std::chrono::steady_clock::now();
  if (opt.timings) {
    opt.timings->read_seconds = std::chrono::duration<double>(compute_start - read_start).count();
    opt.timings->bytes_read = backend->weight_bytes_loaded();
    opt.timings->weight_load_seconds = backend->weight_load_seconds();
  }
  if (opt.on_loaded) opt.on_loaded();
  if (opt.log_layout && world.rank() == 0)
    std::cerr << "sinkscope: layout " << plan.describe() << "\n";
  if (opt.verbose) {
    const std::string line =
        "rank " + std::to_string(world.rank()) + " (" + host_name() + ", layout rank " +
        std::to_string(plan.rank) + ", local rank " + std::to_string(plan.local_rank) +
        "): " + plan.describe() + "; heads [" + std::to_string(plan.head_begin) + ", " +
        std::to_string(plan.head_end) + "), experts [" + std::to_string(plan.expert_begin) + ", " +
        std::to_string(plan.expert_end) + "); weight bytes read " +
        std::to_string(backend->weight_bytes_loaded());
    auto lines = world.gather_bytes(line, 0);
    for (const auto& l : lines) std::cerr << "sinkscope: " << l << "\n";
  }

  int64_t pb = 0, pe = 0;
  ShardPlan::probe_range(N, plan.dp, plan.dp_rank, &pb, &pe);
  int64_t iters = (pe - pb + opt.batch - 1) / opt.batch;
  world.allreduce_max(&iters, 1);

  // One pass over the probes with the backend's current ablations.
  // The first micro-batch pays for first use (scratch allocation, kernel loading, NCCL
  // connections); --verbose reports it apart from the rate after it.
  double first_seconds = 0, first_comm = 0;
  auto run_all = [&](Recorder& rec, bool report) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t it = 0; it < iters; ++it) {
      const int64_t b0 = std::min(pe, pb + it * opt.batch), b1 = std::min(pe, b0 + opt.batch);
      IntArray batch({static_cast<size_t>(b1 - b0), static_cast<size_t>(T)}, "probe,position");
      std::copy(tokens.data.begin() + b0 * T, tokens.data.begin() + b1 * T, batch.data.begin());
      backend->run(batch, b0, rec);
      rec.add_probes(b1 - b0);
      if (it == 0 && report) {
        first_seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        first_comm = backend->communication_seconds();
      }
      if (report && opt.progress && world.rank() == 0)
        opt.progress(std::min(N, (it + 1) * opt.batch * plan.dp), N);
    }
  };

  Analysis a;
  AnalysisMeta& m = a.meta;
  m.sinkscope_version = SINKSCOPE_VERSION;
  m.model_type = cfg.model_type;
  m.checkpoint =
      ck ? opt.model
         : "synthetic:" + opt.model_config + ":seed=" + std::to_string(opt.synthetic_seed);
  m.step = opt.step;
  m.num_layers = cfg.num_layers;
  m.num_heads = cfg.num_heads;
  m.num_kv_heads = cfg.num_kv_heads;
  m.head_dim = cfg.head_dim;
  m.num_experts = cfg.num_experts;
  m.top_k = cfg.top_k;
  m.hidden_size = cfg.hidden_size;
  m.num_probes = N;
  m.seq_len = T;
  m.eps = opt.eps;
  m.tp = plan.tp;
  m.ep = plan.ep;
  m.dp = plan.dp;
  m.world_size = plan.world_size;
  m.device = opt.device;
  m.layout = plan.describe();
  m.etp = plan.etp;
  m.tokens_sha256 = tokens_sha256(tokens);
  m.created_utc = utc_now_iso8601();
  m.format_version = kFormatVersion;
  m.git_commit = SINKSCOPE_GIT_COMMIT;
  m.command_line = opt.command_line;
  m.options = opt.options;
  m.probes = opt.tokens_source;
  m.prepend_bos = opt.prepend_bos;
  m.ablate = opt.ablate;
  m.batch = opt.batch;
  m.threads = opt.threads;
  m.per_query = opt.per_query ? 1 : 0;
  m.checkpoint_headers_sha256 = ck ? ck->headers_sha256() : "";

  Recorder rec(cfg, plan, T, opt.per_query);
  const auto forward_start = std::chrono::steady_clock::now();
  run_all(rec, true);
  const double forward_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - forward_start).count();
  auto blobs = world.gather_bytes(serialize_record(rec.record()), 0);
  if (world.rank() == 0) {
    std::vector<RankRecord> records;
    for (const auto& b : blobs) records.push_back(deserialize_record(b));
    double identity_err = 0;
    reduce_records(records, cfg, opt.eps, opt.per_query, a, &identity_err);
    a.meta.circuit_identity_max_rel_err = identity_err;
    compute_profile(a);
    a.tokens = tokens;
    // The decomposition x_t[0] = sum of component writes is exact up to fp32 rounding.
    if (identity_err > 1e-3)
      throw RuntimeFailure(
          "circuit identity violated: sum over components of K(c[0]) differs from k_0 by " +
          std::to_string(identity_err) + " (relative)");
  }

  if (opt.verbose) {
    const double comm = backend->communication_seconds();
    char timing[400];
    int len = std::snprintf(
        timing, sizeof(timing),
        "; forward %.3f s (%.0f tokens/s over the job), communication %.3f s (%.1f%%)",
        forward_seconds, static_cast<double>(N * T) / std::max(forward_seconds, 1e-9), comm,
        100.0 * comm / std::max(forward_seconds, 1e-9));
    if (iters > 1 && len > 0 && static_cast<size_t>(len) < sizeof(timing)) {
      // After the first micro-batch of every dp group (the probes are split evenly over them).
      const double rest = forward_seconds - first_seconds;
      const double tokens =
          static_cast<double>((N - std::min<int64_t>(N, opt.batch * plan.dp)) * T);
      std::snprintf(timing + len, sizeof(timing) - static_cast<size_t>(len),
                    "; first micro-batch %.3f s, then %.0f tokens/s with communication %.1f%%",
                    first_seconds, tokens / std::max(rest, 1e-9),
                    100.0 * (comm - first_comm) / std::max(rest, 1e-9));
    }
    const std::string device_memory = backend->memory_summary();
    const std::string line = "rank " + std::to_string(world.rank()) + " (" + host_name() +
                             "): peak resident memory " + std::to_string(peak_rss_bytes() >> 20) +
                             " MiB" + timing + device_memory + backend->kernel_summary();
    for (const auto& l : world.gather_bytes(line, 0)) std::cerr << "sinkscope: " << l << "\n";
  }

  // Per-probe sink scores [N, L, H] under a set of mean-ablations at position 0 (rank 0; empty
  // elsewhere): one more pass over the probes.
  const size_t L = static_cast<size_t>(cfg.num_layers), H = static_cast<size_t>(cfg.num_heads);
  auto run_ablated = [&](const std::vector<Ablation>& set) {
    backend->set_ablations(set);
    Recorder arec(cfg, plan, T, false);
    run_all(arec, false);
    backend->set_ablations({});
    RankRecord r = arec.record();
    r.attr_layer_rows.clear();  // not needed from an ablated pass
    const auto blobs = world.gather_bytes(serialize_record(r), 0);
    FloatArray per_probe;
    if (world.rank() == 0) {
      std::vector<RankRecord> records;
      for (const auto& b : blobs) records.push_back(deserialize_record(b));
      per_probe = per_probe_sink(records, N);
    }
    return per_probe;
  };
  // Mean over probes [L, H] of a per-probe array (double sums).
  auto probe_mean = [&](const FloatArray& per_probe) {
    std::vector<float> mean(L * H, 0.f);
    for (size_t i = 0; i < L * H; ++i) {
      double sum = 0;
      for (size_t n = 0; n < static_cast<size_t>(N); ++n) sum += per_probe.data[n * L * H + i];
      mean[i] = static_cast<float>(sum / static_cast<double>(N));
    }
    return mean;
  };

  // Contract 1.2: the causal layer profile (and the layer stage of --ablate search).
  if (opt.causal_profile || ablate.kind == AblateSpec::kSearch) {
    a.causal_drop = FloatArray({L + 1}, "embedding_or_layer");
    a.causal_drop_attention = FloatArray({L}, "layer");
    a.causal_drop_ffn = FloatArray({L}, "layer");
    a.causal_drop_per_probe =
        FloatArray({static_cast<size_t>(N), L + 1}, "probe,embedding_or_layer");
    for (size_t index = 0; index <= L; ++index)
      for (int part = 2; part >= (index == 0 ? 2 : 0); --part) {
        const std::vector<Ablation> set = index_components(cfg, static_cast<int64_t>(index), part);
        if (set.empty()) continue;
        const FloatArray per_probe = run_ablated(set);
        if (world.rank() != 0) continue;
        const std::vector<float> mean = probe_mean(per_probe);
        const float drop = static_cast<float>(sink_weighted_drop(a.sink_score, mean.data()));
        if (part == 0) a.causal_drop_attention.data[index - 1] = drop;
        if (part == 1) a.causal_drop_ffn.data[index - 1] = drop;
        if (part != 2) continue;
        a.causal_drop.data[index] = drop;
        // Per probe: the same weights, the probe's own clean and ablated scores.
        double weight = 0;
        for (float w : a.sink_score.data) weight += w;
        for (size_t n = 0; n < static_cast<size_t>(N); ++n) {
          double d = 0;
          for (size_t i = 0; i < L * H; ++i)
            d += static_cast<double>(a.sink_score.data[i]) *
                 (a.sink_score_per_probe.data[n * L * H + i] - per_probe.data[n * L * H + i]);
          a.causal_drop_per_probe.data[n * (L + 1) + index] =
              weight > 0 ? static_cast<float>(d / weight) : 0.f;
        }
      }
    if (world.rank() == 0) compute_causal_profile(a);
    if (ablate.kind == AblateSpec::kSearch) a.search_layer_drop = a.causal_drop;
    if (!opt.causal_profile)  // asked for by the search alone: not written as a profile
      for (FloatArray* f : {&a.causal_drop, &a.causal_drop_attention, &a.causal_drop_ffn,
                            &a.causal_drop_per_probe, &a.causal_layer_share})
        *f = FloatArray();
  }

  if (ablate.kind != AblateSpec::kNone) {
    std::vector<Ablation> comps;
    if (ablate.kind == AblateSpec::kLayers) {
      comps = components_of_layers(cfg, ablate.first, ablate.last);
    } else {
      std::string list;
      if (world.rank() == 0 && ablate.kind == AblateSpec::kTop)
        list = encode_components(top_components(a, cfg, ablate.top));
      if (world.rank() == 0 && ablate.kind == AblateSpec::kSearch) {
        // Layer stage: open the indices with the largest drops, fewest first, until they carry
        // search_share of the positive layer-level drop (at most `top` of them when given).
        std::vector<std::pair<double, int64_t>> order;
        for (size_t i = 0; i <= L; ++i) order.push_back({a.search_layer_drop.data[i], i});
        std::stable_sort(order.begin(), order.end(),
                         [](const auto& x, const auto& y) { return x.first > y.first; });
        std::vector<double> drops;
        for (const auto& o : order) drops.push_back(o.first);
        int64_t open = smallest_leading_set(drops, opt.search_share);
        if (ablate.top > 0) open = std::min(open, ablate.top);
        std::vector<Ablation> inside;
        for (int64_t j = 0; j < open; ++j)
          for (const Ablation& c : index_components(cfg, order[static_cast<size_t>(j)].second, 2))
            inside.push_back(c);
        list = encode_components(inside);
      }
      world.broadcast_bytes(&list, 0);
      comps = decode_components(list);
    }
    const size_t K = comps.size();
    std::vector<std::vector<float>> deltas(K);
    std::vector<double> effect(K, 0);
    for (size_t k = 0; k < K; ++k) {
      if (opt.ablation_progress && world.rank() == 0)
        opt.ablation_progress(static_cast<int64_t>(k + 1), static_cast<int64_t>(K),
                              describe(comps[k]));
      const FloatArray per_probe = run_ablated({comps[k]});
      if (world.rank() != 0) continue;
      deltas[k] = probe_mean(per_probe);
      effect[k] = sink_weighted_drop(a.sink_score, deltas[k].data());
      for (size_t i = 0; i < L * H; ++i) deltas[k][i] -= a.sink_score.data[i];
    }
    // search: components ranked by their causal effect, largest first.
    std::vector<size_t> rank(K);
    for (size_t k = 0; k < K; ++k) rank[k] = k;
    if (ablate.kind == AblateSpec::kSearch)
      std::stable_sort(rank.begin(), rank.end(),
                       [&](size_t x, size_t y) { return effect[x] > effect[y]; });
    a.ablation_components = IntArray({K, 3}, "component,field");
    a.ablation_delta_sink = FloatArray({K, L, H}, "component,layer,head");
    for (size_t j = 0; j < K; ++j) {
      const size_t k = rank[j];
      a.ablation_components.at(j, 0) = comps[k].layer;
      a.ablation_components.at(j, 1) = static_cast<int32_t>(comps[k].kind);
      a.ablation_components.at(j, 2) = comps[k].index;
      if (world.rank() == 0)
        std::copy(deltas[k].begin(), deltas[k].end(),
                  a.ablation_delta_sink.data.begin() + j * L * H);
    }
    if (ablate.kind == AblateSpec::kSearch && world.rank() == 0) {
      a.search_effect = FloatArray({K}, "component");
      std::vector<double> ranked;
      for (size_t j = 0; j < K; ++j) {
        a.search_effect.data[j] = static_cast<float>(effect[rank[j]]);
        ranked.push_back(effect[rank[j]]);
      }
      a.search_selected = static_cast<int32_t>(smallest_leading_set(ranked, opt.search_share));
      a.search_share = static_cast<float>(opt.search_share);
    }
  }
  if (opt.timings)
    opt.timings->compute_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - compute_start).count();
  return a;
}

}  // namespace sinkscope
