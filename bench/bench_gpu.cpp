// bench_gpu: throughput and memory of the CUDA backend's forward pass on random bf16 weights of a
// given config.json shape (make_cuda_backend_synthetic: nothing is read from disk), over N probes
// of length T in micro-batches, in three modes:
//   plain      recording off: the forward pass only (no recording kernels, copies or hooks)
//   record     recording on, a no-op observer: the device-side recording and the tap copies
//   recorder   recording on, the real Recorder: what `sinkscope analyze` pays per probe
// Times are host wall-clock over whole forwards (each ends with a stream synchronisation), after
// warm-up runs; the median of --iters is reported. Per-layer attention / MoE times come from CUDA
// events of the last timed run. Memory: the backend's own device bytes (weights, weights + scratch)
// and the whole device's use from cudaMemGetInfo.
//
//   bench_gpu --config bench/qwen3_30b_a3b.json --probes 4 --seq 4096 --batch 4 --iters 3
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "cuda/attention.cuh"
#include "cuda/backend.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/model.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/recorder.hpp"
#include "sinkscope/shard_plan.hpp"

namespace {

using namespace sinkscope;

struct NoopObserver final : ForwardObserver {};

struct Timing {
  double median_ms = 0, min_ms = 0;
  cuda::RunProfile profile;  // summed over the micro-batches of the last timed forward
};

// FLOPs of one forward over N x T tokens (matrix products and attention; 2 per multiply-add).
double forward_flops(const ModelConfig& c, int64_t N, int64_t T) {
  const double D = static_cast<double>(c.hidden_size), d = static_cast<double>(c.head_dim);
  const double H = static_cast<double>(c.num_heads), KV = static_cast<double>(c.num_kv_heads);
  double per_token = 0;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    per_token += 2 * D * (H * d + 2 * KV * d) + 2 * H * d * D;  // qkv, o_proj
    per_token +=
        2 * 2 * H * d * (static_cast<double>(T + 1) / 2);  // causal QK^T and PV, mean key count
    if (c.is_moe_layer(l))
      per_token +=
          2 * D * static_cast<double>(c.num_experts) +
          static_cast<double>(c.top_k) * 3 * 2 * D * static_cast<double>(c.moe_intermediate_size);
    else
      per_token += 3 * 2 * D * static_cast<double>(c.intermediate_size);
  }
  return per_token * static_cast<double>(N * T);
}

Timing time_mode(Backend& be, const IntArray& tokens, int64_t batch, ForwardObserver& obs,
                 int warmup, int iters) {
  const int64_t N = static_cast<int64_t>(tokens.shape[0]),
                T = static_cast<int64_t>(tokens.shape[1]);
  std::vector<IntArray> parts;
  for (int64_t b0 = 0; b0 < N; b0 += batch) {
    const int64_t b1 = std::min(N, b0 + batch);
    IntArray p({static_cast<size_t>(b1 - b0), static_cast<size_t>(T)}, "probe,position");
    std::copy(tokens.data.begin() + b0 * T, tokens.data.begin() + b1 * T, p.data.begin());
    parts.push_back(std::move(p));
  }
  Timing t;
  auto forward = [&](bool keep_profile) {
    cuda::RunProfile sum;
    for (size_t i = 0; i < parts.size(); ++i) {
      be.run(parts[i], static_cast<int64_t>(i) * batch, obs);
      if (keep_profile) {
        sum += cuda::last_run_profile(be);
      }
    }
    return sum;
  };
  for (int i = 0; i < warmup; ++i) forward(false);
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    cuda::RunProfile p = forward(i + 1 == iters);
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    if (i + 1 == iters) t.profile = p;
  }
  std::sort(ms.begin(), ms.end());
  t.median_ms = ms[ms.size() / 2];
  t.min_ms = ms.front();
  return t;
}

double gib(uint64_t b) { return static_cast<double>(b) / (1024.0 * 1024.0 * 1024.0); }

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"sinkscope CUDA backend benchmark (synthetic weights)"};
  std::string config;
  int64_t probes = 4, seq = 2048, batch = 4, layers = 0;
  int iters = 3, warmup = 1;
  uint64_t seed = 1;
  std::string modes = "plain,record,recorder";
  bool phases = true;
  app.add_option("--config", config, "config.json of the shape (Hugging Face Qwen3-MoE keys)")
      ->required();
  app.add_option("--probes", probes, "N probes per forward");
  app.add_option("--seq", seq, "T tokens per probe");
  app.add_option("--batch", batch, "probes per micro-batch");
  app.add_option("--layers", layers, "override num_hidden_layers (0: the config's)");
  app.add_option("--iters", iters, "timed forwards per mode (median reported)");
  app.add_option("--warmup", warmup, "untimed forwards per mode first");
  app.add_option("--seed", seed, "weight and token seed");
  app.add_option("--modes", modes, "comma-separated: plain, record, recorder");
  app.add_option("--phase-timing", phases, "per-layer CUDA-event timing (true/false)");
  CLI11_PARSE(app, argc, argv);

  try {
    ModelConfig cfg = parse_model_config(config);
    if (layers > 0) {
      cfg.num_layers = layers;
      std::erase_if(cfg.mlp_only_layers, [&](int64_t l) { return l >= layers; });
      if (!cfg.sliding_layers.empty()) cfg.sliding_layers.resize(static_cast<size_t>(layers));
    }
    if (cuda::visible_device_count() == 0) throw RuntimeFailure("no CUDA device visible");
    auto world = make_single_comm();
    auto tp = world->split(0, 0), ep = world->split(0, 0);
    const ShardPlan plan = ShardPlan::make(1, 0, 1, 1, cfg);
    const auto t_load = std::chrono::steady_clock::now();
    auto be = make_cuda_backend_synthetic(cfg, plan, {world.get(), tp.get(), ep.get()},
                                          ForwardOptions{}, seed);
    const double load_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
    const IntArray tokens = make_probes(
        "random:" + std::to_string(probes) + ":" + std::to_string(seq) + ":" + std::to_string(seed),
        cfg.vocab_size);
    cuda::set_phase_timing(*be, phases);
    const cuda::MemoryReport m0 = cuda::memory_report(*be);
    std::printf(
        "shape: %s | layers %lld, hidden %lld, heads %lld/%lld kv, head_dim %lld, experts %lld "
        "top-%lld, "
        "moe_inter %lld, vocab %lld\n",
        config.c_str(), static_cast<long long>(cfg.num_layers),
        static_cast<long long>(cfg.hidden_size), static_cast<long long>(cfg.num_heads),
        static_cast<long long>(cfg.num_kv_heads), static_cast<long long>(cfg.head_dim),
        static_cast<long long>(cfg.num_experts), static_cast<long long>(cfg.top_k),
        static_cast<long long>(cfg.moe_intermediate_size), static_cast<long long>(cfg.vocab_size));
    std::printf(
        "run: N=%lld probes x T=%lld, micro-batch %lld, %d warm-up + %d timed forwards per mode; "
        "weights made in %.1f s (%.2f GiB on the device)\n\n",
        static_cast<long long>(probes), static_cast<long long>(seq), static_cast<long long>(batch),
        warmup, iters, load_s, gib(m0.weight_bytes));

    const double flops = forward_flops(cfg, probes, seq);
    const double tokens_n = static_cast<double>(probes * seq);
    std::printf("%-10s %12s %12s %9s %14s %14s %14s\n", "mode", "ms/forward", "tokens/s", "TFLOP/s",
                "attn ms/layer", "moe ms/layer", "taps ms/layer");
    std::vector<std::pair<std::string, cuda::RunProfile>> profiles;
    std::string rest = modes + ",";
    while (!rest.empty()) {
      const std::string mode = rest.substr(0, rest.find(','));
      rest.erase(0, rest.find(',') + 1);
      if (mode.empty()) continue;
      NoopObserver noop;
      Recorder recorder(cfg, plan, seq, false);
      ForwardObserver* obs = &noop;
      if (mode == "plain") {
        cuda::set_recording(*be, false);
      } else if (mode == "record") {
        cuda::set_recording(*be, true);
      } else if (mode == "recorder") {
        cuda::set_recording(*be, true);
        obs = &recorder;
      } else {
        throw InputError("--modes: unknown mode '" + mode + "' (plain, record, recorder)");
      }
      const Timing t = time_mode(*be, tokens, batch, *obs, warmup, iters);
      const double L = static_cast<double>(std::max<int64_t>(t.profile.layers, 1));
      std::printf("%-10s %12.1f %12.0f %9.1f %14.3f %14.3f %14.3f\n", mode.c_str(), t.median_ms,
                  tokens_n / (t.median_ms / 1e3), flops / (t.median_ms / 1e3) / 1e12,
                  t.profile.attention_ms() / L, t.profile.moe_ms() / L, t.profile.taps_ms() / L);
      profiles.push_back({mode, t.profile});
    }
    if (phases && !profiles.empty()) {
      std::printf(
          "\nms per layer by phase (device time between CUDA events, last timed forward):\n%-10s",
          "mode");
      for (const auto& ph : cuda::RunProfile::phases()) std::printf(" %9s", ph.name);
      std::printf("\n");
      for (const auto& [mode, p] : profiles) {
        const double L = static_cast<double>(std::max<int64_t>(p.layers, 1));
        std::printf("%-10s", mode.c_str());
        for (const auto& ph : cuda::RunProfile::phases()) std::printf(" %9.3f", p.*ph.ms / L);
        std::printf("\n");
      }
    }
    const cuda::MemoryReport m = cuda::memory_report(*be);
    std::printf(
        "\nmemory: weights %.2f GiB, backend total (weights + scratch) %.2f GiB, device in use "
        "%.2f of %.2f GiB "
        "(cudaMemGetInfo, all allocations)\n",
        gib(m.weight_bytes), gib(m.held_bytes), gib(m.device_used), gib(m.device_total));
    std::printf("expert products: %s\n", cuda::expert_gemm_strategy(*be).c_str());
    std::printf("attention: %s\n", cuda::k::attention_kernels_used().c_str());
    std::printf(
        "per-layer times are CUDA-event device time summed over micro-batches / layers; 'attn' "
        "includes the\n"
        "circuit attribution when recording; 'moe' includes the routing (with a wait for the\n"
        "host only on the cuBLAS expert routes or ep > 1).\n");
  } catch (const InputError& e) {
    std::fprintf(stderr, "bench_gpu: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu: %s\n", e.what());
    return 2;
  }
  return 0;
}
