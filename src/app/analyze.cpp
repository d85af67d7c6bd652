// analyze_checkpoint: the per-checkpoint pipeline shared by `analyze`, `sweep` and the tests.
#include "sinkscope/analyze.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
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
#include "sinkscope/limits.hpp"
#include "sinkscope/model.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/recorder.hpp"
#include "sinkscope/shard_plan.hpp"

#if SINKSCOPE_HAVE_CUDA
#include "cuda/backend.hpp"
#endif

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
  // layers=A, layers=A-B or top=K, parsed by hand (no regex on untrusted text); every number is
  // checked without overflow and named in the error.
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
  throw InputError(option + ": expected layers=A-B or top=K");
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

std::vector<Ablation> components_of_layers(const ModelConfig& c, int64_t first, int64_t last) {
  std::vector<Ablation> out;
  for (int64_t l = first; l <= last; ++l) {
    for (int64_t h = 0; h < c.num_heads; ++h)
      out.push_back({static_cast<int32_t>(l), Ablation::kHead, static_cast<int32_t>(h)});
    if (c.is_moe_layer(l))
      for (int64_t e = 0; e < c.num_experts; ++e)
        out.push_back({static_cast<int32_t>(l), Ablation::kExpert, static_cast<int32_t>(e)});
    else
      out.push_back({static_cast<int32_t>(l), Ablation::kMlp, 0});
  }
  return out;
}

// The K components with the largest sink-weighted positive attribution (the layer_share weights
// of METRICS.md section 5, per component).
std::vector<Ablation> top_components(const Analysis& a, const ModelConfig& c, int64_t K) {
  const size_t L = a.sink_score.shape[0], H = a.sink_score.shape[1],
               E = static_cast<size_t>(c.num_experts);
  std::vector<std::pair<double, Ablation>> scored;
  auto score = [&](auto attr_of) {
    double s = 0;
    for (size_t t = 0; t < L; ++t)
      for (size_t h = 0; h < H; ++h) s += a.sink_score.at(t, h) * std::max(0.f, attr_of(t, h));
    return s;
  };
  scored.push_back({score([&](size_t t, size_t h) { return a.attr_embed.at(t, h); }),
                    {0, Ablation::kEmbedding, 0}});
  for (size_t l = 0; l < L; ++l) {
    for (size_t j = 0; j < H; ++j)
      scored.push_back({score([&](size_t t, size_t h) { return a.attr_head.at(t, h, l, j); }),
                        {static_cast<int32_t>(l), Ablation::kHead, static_cast<int32_t>(j)}});
    if (c.is_moe_layer(static_cast<int64_t>(l))) {
      for (size_t e = 0; e < E; ++e)
        scored.push_back({score([&](size_t t, size_t h) { return a.attr_expert.at(t, h, l, e); }),
                          {static_cast<int32_t>(l), Ablation::kExpert, static_cast<int32_t>(e)}});
    } else {
      scored.push_back({score([&](size_t t, size_t h) { return a.attr_mlp.at(t, h, l); }),
                        {static_cast<int32_t>(l), Ablation::kMlp, 0}});
    }
  }
  std::stable_sort(scored.begin(), scored.end(),
                   [](const auto& x, const auto& y) { return x.first > y.first; });
  std::vector<Ablation> out;
  for (size_t i = 0; i < scored.size() && static_cast<int64_t>(i) < K; ++i)
    out.push_back(scored[i].second);
  return out;
}

}  // namespace

Analysis analyze_checkpoint(const AnalyzeOptions& opt, const IntArray& tokens, const Comm& world) {
  std::optional<Checkpoint> ck;
  ModelConfig synthetic_cfg;
  ShardPlan plan;
  AblateSpec ablate;
  run_agreed(world, [&] {
    if (opt.synthetic_seed >= 0) {
      // Benchmarks only: random weights of config.json's shape, made on the device.
      if (opt.device != "cuda")
        throw InputError(
            "--synthetic-weights needs --device cuda (for the CPU, write a checkpoint with "
            "`sinkscope synth`)");
      synthetic_cfg = parse_model_config(opt.model_config);
    } else {
      ck.emplace(Checkpoint::open(opt.model));
      ck->validate_for_model();
    }
    const ModelConfig& c = ck ? ck->config() : synthetic_cfg;
    check_token_ids(tokens, c.vocab_size, opt.tokens_source);
    if (tokens.shape.at(1) < 2)
      throw InputError(opt.tokens_source + ": probes need at least 2 positions");
    // The CUDA backend keeps whole experts (etp = 1) for now; the CPU default follows
    // Megatron-Core.
    const int etp = opt.etp > 0 ? opt.etp : (opt.device == "cuda" ? 1 : 0);
    if (opt.device == "cuda" && etp > 1)
      throw InputError("--etp " + std::to_string(etp) + ": the cuda backend supports etp=1 only");
    plan = ShardPlan::make(world.size(), world.rank(), opt.tp, opt.ep, c, etp);
    ablate = parse_ablate(opt.ablate, c.num_layers);
    if (opt.device != "cpu" && opt.device != "cuda")
      throw InputError("--device '" + opt.device + "': expected cpu or cuda");
    if (opt.device == "cuda" && !SINKSCOPE_HAVE_CUDA)
      throw InputError(
          "--device cuda: this sinkscope was built without CUDA (configure with "
          "-DSINKSCOPE_CUDA=ON)");
    if (opt.batch < 1 || opt.batch > kMaxBatch)
      throw InputError("--batch " + std::to_string(opt.batch) + ": must lie in 1-" +
                       std::to_string(kMaxBatch));
    if (opt.threads < 1 || opt.threads > kMaxThreads)
      throw InputError("--threads " + std::to_string(opt.threads) + ": must lie in 1-" +
                       std::to_string(kMaxThreads));
  });
  const ModelConfig& cfg = ck ? ck->config() : synthetic_cfg;
  const int64_t N = static_cast<int64_t>(tokens.shape[0]),
                T = static_cast<int64_t>(tokens.shape[1]);

  auto tp_group = world.split(plan.dp_rank, plan.tp_rank);
  auto ep_group = world.split(plan.ep_group, plan.ep_rank * plan.etp + plan.etp_rank);
  ForwardComms comms{&world, tp_group.get(), ep_group.get()};
  std::unique_ptr<Backend> backend;
  run_agreed(world, [&] {
    ForwardOptions fo;
    fo.threads = opt.threads;
#if SINKSCOPE_HAVE_CUDA
    if (opt.device == "cuda") {
      backend = ck ? make_cuda_backend(*ck, plan, comms, fo)
                   : make_cuda_backend_synthetic(cfg, plan, comms, fo,
                                                 static_cast<uint64_t>(opt.synthetic_seed));
      return;
    }
#endif
    backend = make_cpu_backend(*ck, plan, comms, fo);
  });
  if (opt.log_layout && world.rank() == 0)
    std::cerr << "sinkscope: layout " << plan.describe() << "\n";
  if (opt.verbose) {
    const std::string line =
        "rank " + std::to_string(world.rank()) + " (" + host_name() + "): " + plan.describe() +
        "; heads [" + std::to_string(plan.head_begin) + ", " + std::to_string(plan.head_end) +
        "), experts [" + std::to_string(plan.expert_begin) + ", " +
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
    std::string device_memory;
#if SINKSCOPE_HAVE_CUDA
    if (opt.device == "cuda") {
      const cuda::MemoryReport m = cuda::memory_report(*backend);
      device_memory = "; GPU memory: weights " + std::to_string(m.weight_bytes >> 20) +
                      " MiB, weights + scratch " + std::to_string(m.held_bytes >> 20) +
                      " MiB, device in use " + std::to_string(m.device_used >> 20) + " of " +
                      std::to_string(m.device_total >> 20) + " MiB";
    }
#endif
    const std::string line = "rank " + std::to_string(world.rank()) + " (" + host_name() +
                             "): peak resident memory " + std::to_string(peak_rss_bytes() >> 20) +
                             " MiB" + timing + device_memory;
    for (const auto& l : world.gather_bytes(line, 0)) std::cerr << "sinkscope: " << l << "\n";
  }

  if (ablate.kind != AblateSpec::kNone) {
    std::vector<Ablation> comps;
    if (ablate.kind == AblateSpec::kLayers) {
      comps = components_of_layers(cfg, ablate.first, ablate.last);
    } else {
      std::string list;
      if (world.rank() == 0)
        for (const auto& c : top_components(a, cfg, ablate.top))
          list += std::to_string(c.layer) + " " + std::to_string(c.kind) + " " +
                  std::to_string(c.index) + " ";
      world.broadcast_bytes(&list, 0);
      std::istringstream is(list);
      int32_t l, k, i;
      while (is >> l >> k >> i) comps.push_back({l, static_cast<Ablation::Kind>(k), i});
    }
    const size_t K = comps.size(), L = static_cast<size_t>(cfg.num_layers),
                 H = static_cast<size_t>(cfg.num_heads);
    a.ablation_components = IntArray({K, 3}, "component,field");
    a.ablation_delta_sink = FloatArray({K, L, H}, "component,layer,head");
    for (size_t k = 0; k < K; ++k) {
      backend->set_ablations({comps[k]});
      Recorder arec(cfg, plan, T, false);
      run_all(arec, false);
      std::vector<double> sink = arec.record().sink_sum;
      world.allreduce_sum(sink.data(), sink.size());
      a.ablation_components.at(k, 0) = comps[k].layer;
      a.ablation_components.at(k, 1) = comps[k].kind;
      a.ablation_components.at(k, 2) = comps[k].index;
      for (size_t i = 0; i < L * H; ++i)
        a.ablation_delta_sink.data[k * L * H + i] =
            world.rank() == 0
                ? static_cast<float>(sink[i] / static_cast<double>(N)) - a.sink_score.data[i]
                : 0.f;
    }
    backend->set_ablations({});
  }
  return a;
}

}  // namespace sinkscope
