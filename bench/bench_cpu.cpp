// CPU benchmark: analyze tokens/s on a mid-size synthetic MoE, next to the OpenBLAS sgemm rate
// measured in the same run, so the result reads as a fraction of the GEMM-bound limit.
// Prints a table; see docs/benchmarks.md for the recorded numbers and the command.
//
// usage: sinkscope_bench_cpu [--threads N] [--probes N] [--seq T] [--layers L] [--hidden D]
//                            [--experts E] [--top-k K] [--moe-inter I] [--heads H] [--kv-heads G]
#include <cblas.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "sinkscope/analyze.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/synth.hpp"

using namespace sinkscope;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Single-precision GEMM rate on shapes like the model's (tokens x hidden x hidden).
double sgemm_gflops(int64_t m, int64_t n, int64_t k) {
  std::vector<float> a(static_cast<size_t>(m * k), 0.5f), b(static_cast<size_t>(n * k), 0.25f),
      c(static_cast<size_t>(m * n));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.f, a.data(), k, b.data(), k, 0.f,
              c.data(), n);
  int reps = 0;
  const auto t = Clock::now();
  while (seconds_since(t) < 1.5 || reps < 3) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.f, a.data(), k, b.data(), k,
                0.f, c.data(), n);
    ++reps;
  }
  return 2.0 * m * n * k * reps / seconds_since(t) / 1e9;
}

long peak_rss_mb() {
  FILE* f = std::fopen("/proc/self/status", "r");
  char line[256];
  long kb = 0;
  while (f && std::fgets(line, sizeof(line), f))
    if (std::strncmp(line, "VmHWM:", 6) == 0) kb = std::atol(line + 6);
  if (f) std::fclose(f);
  return kb / 1024;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1;
  int64_t probes = 4, seq = 512;
  ModelConfig c;
  c.model_type = "qwen3_moe";
  c.vocab_size = 32000;
  c.num_layers = 8;
  c.hidden_size = 1024;
  c.num_heads = 16;
  c.num_kv_heads = 4;
  c.head_dim = 64;
  c.num_experts = 32;
  c.top_k = 4;
  c.moe_intermediate_size = 256;
  c.intermediate_size = 2048;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const long v = std::atol(argv[i + 1]);
    if (k == "--threads")
      threads = static_cast<int>(v);
    else if (k == "--probes")
      probes = v;
    else if (k == "--seq")
      seq = v;
    else if (k == "--layers")
      c.num_layers = v;
    else if (k == "--hidden")
      c.hidden_size = v;
    else if (k == "--experts")
      c.num_experts = v;
    else if (k == "--top-k")
      c.top_k = v;
    else if (k == "--moe-inter")
      c.moe_intermediate_size = v;
    else if (k == "--heads")
      c.num_heads = v;
    else if (k == "--kv-heads")
      c.num_kv_heads = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 1;
    }
  }
  const std::string dir =
      (std::filesystem::temp_directory_path() / "sinkscope-bench-model").string();
  std::filesystem::remove_all(dir);
  auto t0 = Clock::now();
  synthesize(c, dir, false, 1);
  const double synth_s = seconds_since(t0);
  openblas_set_num_threads(threads);
  const double gemm = sgemm_gflops(seq, c.hidden_size, c.hidden_size);
  const double gemm_expert =
      sgemm_gflops(seq * c.top_k / c.num_experts, c.moe_intermediate_size, c.hidden_size);

  // Model FLOPs per token (multiply-add = 2), what an ideal implementation must do:
  const double D = c.hidden_size, d = c.head_dim, H = c.num_heads, G = c.num_kv_heads,
               L = c.num_layers;
  const double proj = 2 * D * (H * d + 2 * G * d) + 2 * H * d * D;  // q, k, v, o
  const double attn = 2 * 2 * H * d * (seq + 1) / 2.0;              // QK^T and AV, causal
  const double moe = 2 * D * c.num_experts + c.top_k * 3 * 2 * D * c.moe_intermediate_size;
  const double flops_token = L * (proj + attn + moe);

  auto world = make_single_comm();
  AnalyzeOptions o;
  o.model = dir;
  o.threads = threads;
  o.batch = probes;
  const IntArray tokens = make_probes(
      "random:" + std::to_string(probes) + ":" + std::to_string(seq) + ":1", c.vocab_size);
  t0 = Clock::now();
  Analysis warm = analyze_checkpoint(o, tokens, *world);  // includes loading the shard
  const double first_s = seconds_since(t0);
  t0 = Clock::now();
  Analysis a = analyze_checkpoint(o, tokens, *world);
  const double run_s = seconds_since(t0);
  const double tokens_s = static_cast<double>(probes * seq) / run_s;
  const double achieved = tokens_s * flops_token / 1e9;

  std::printf(
      "sinkscope CPU benchmark: %lld layers, hidden %lld, %lld heads (%lld KV, dim %lld), %lld "
      "experts top-%lld "
      "(inter %lld), probes %lld x %lld, %d thread(s)\n",
      (long long)c.num_layers, (long long)c.hidden_size, (long long)c.num_heads,
      (long long)c.num_kv_heads, (long long)c.head_dim, (long long)c.num_experts,
      (long long)c.top_k, (long long)c.moe_intermediate_size, (long long)probes, (long long)seq,
      threads);
  std::printf("| quantity | value |\n|---|---|\n");
  std::printf("| synthesise checkpoint (s) | %.2f |\n", synth_s);
  std::printf("| first analyze incl. load (s) | %.2f |\n", first_s);
  std::printf("| analyze (s) | %.2f |\n", run_s);
  std::printf("| tokens/s (recording on) | %.1f |\n", tokens_s);
  std::printf("| model GFLOP per token | %.4f |\n", flops_token / 1e9);
  std::printf("| achieved GFLOP/s | %.2f |\n", achieved);
  std::printf("| OpenBLAS sgemm GFLOP/s (%lld x %lld x %lld) | %.2f |\n", (long long)seq,
              (long long)c.hidden_size, (long long)c.hidden_size, gemm);
  std::printf("| OpenBLAS sgemm GFLOP/s (expert-sized, %lld x %lld x %lld) | %.2f |\n",
              (long long)(seq * c.top_k / c.num_experts), (long long)c.moe_intermediate_size,
              (long long)c.hidden_size, gemm_expert);
  std::printf("| fraction of the sgemm rate | %.1f%% |\n", 100.0 * achieved / gemm);
  std::printf("| peak RSS (MB) | %ld |\n", peak_rss_mb());
  std::printf("| sink_rate (sanity) | %.3f |\n", a.meta.sink_rate);
  std::filesystem::remove_all(dir);
  return warm.meta.num_probes == a.meta.num_probes ? 0 : 1;
}
