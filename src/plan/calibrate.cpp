// `sinkscope plan --calibrate`: the CPU coefficients of the cost model measured on this machine
// (docs/planner.md "Calibration").
#include <omp.h>

#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "cpu/kernels.hpp"
#include "plan/scratch_model.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/model.hpp"
#include "sinkscope/plan.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/shard_plan.hpp"
#include "sinkscope/synth.hpp"

namespace sinkscope {

namespace {
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Repeats `f` (doing `flops` each) for at least `seconds`; returns GFLOP/s of the best third.
template <class F>
double rate(F&& f, double flops, double seconds) {
  f();  // warm up (OpenBLAS buffers, page faults)
  std::vector<double> times;
  const auto start = Clock::now();
  while (since(start) < seconds || times.size() < 3) {
    const auto t = Clock::now();
    f();
    times.push_back(since(t));
  }
  std::sort(times.begin(), times.end());
  double sum = 0;
  const size_t n = std::max<size_t>(1, times.size() / 3);
  for (size_t i = 0; i < n; ++i) sum += times[i];
  return flops / (sum / static_cast<double>(n)) / 1e9;
}

double gemm_rate(int64_t M, int64_t N, int64_t K) {
  std::vector<float> A(static_cast<size_t>(M * K), 0.5f), B(static_cast<size_t>(N * K), 0.25f),
      C(static_cast<size_t>(M * N));
  return rate([&] { cpu::gemm_nt(M, N, K, A.data(), K, B.data(), K, C.data(), N); },
              2.0 * static_cast<double>(M * N * K), 0.4);
}

// The CPU backend's causal attention: per head, query blocks of 64 against keys [0, i1), a causal
// softmax of the block, then the block times V; heads in parallel over the threads.
double attention_rate(int threads) {
  const int64_t T = 512, d = 128, heads = std::max(4, 2 * threads), blk = 64;
  std::vector<float> q(static_cast<size_t>(heads * T * d), 0.01f), kk(q.size(), 0.02f),
      v(q.size(), 0.03f), out(q.size());
  std::vector<std::vector<float>> scores(static_cast<size_t>(threads),
                                         std::vector<float>(static_cast<size_t>(blk * T)));
  auto run = [&] {
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t h = 0; h < heads; ++h) {
      float* s = scores[static_cast<size_t>(omp_get_thread_num())].data();
      const float* Q = q.data() + h * T * d;
      const float* Kh = kk.data() + h * T * d;
      const float* V = v.data() + h * T * d;
      float* O = out.data() + h * T * d;
      for (int64_t i0 = 0; i0 < T; i0 += blk) {
        const int64_t i1 = std::min(T, i0 + blk), rows = i1 - i0;
        cpu::gemm_nt(rows, i1, d, Q + i0 * d, d, Kh, d, s, T);
        cpu::causal_softmax_rows(s, rows, T, i0);
        cpu::gemm_nn(rows, d, i1, s, T, V, d, O + i0 * d, d);
      }
    }
  };
  const double flops = static_cast<double>(heads) * 4.0 * static_cast<double>(d) *
                       static_cast<double>(T) * (static_cast<double>(T) + 1) / 2;
  return rate(run, flops, 0.4);
}

// Reads a bf16 file and converts it to fp32, as the CPU loader does; GB/s of the file.
double load_rate(const std::string& dir) {
  const size_t bytes = size_t{256} << 20;
  const std::string path = dir + "/sinkscope-plan-calibrate-" + std::to_string(::getpid()) + ".bin";
  {
    std::vector<uint16_t> data(bytes / 2);
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint16_t>(0x3f80 + (i & 0x7f));
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(bytes));
    if (!out.flush()) throw InputError("plan --calibrate: cannot write " + path);
  }
  std::vector<uint16_t> chunk(size_t{8} << 20);
  std::vector<float> conv(chunk.size());
  double best = 0;
  for (int rep = 0; rep < 2; ++rep) {
    const auto t = Clock::now();
    std::ifstream in(path, std::ios::binary);
    size_t done = 0;
    while (done < bytes) {
      in.read(reinterpret_cast<char*>(chunk.data()),
              static_cast<std::streamsize>(chunk.size() * 2));
      const size_t got = static_cast<size_t>(in.gcount()) / 2;
      if (got == 0) break;
      for (size_t i = 0; i < got; ++i) {
        const uint32_t bits = static_cast<uint32_t>(chunk[i]) << 16;
        std::memcpy(&conv[i], &bits, 4);
      }
      done += got * 2;
    }
    best = std::max(best, static_cast<double>(bytes) / since(t) / 1e9);
  }
  std::filesystem::remove(path);
  return best;
}

double resident_mib() {
  std::ifstream in("/proc/self/status");
  std::string key;
  double kb = 0;
  while (in >> key) {
    if (key == "VmRSS:") {
      in >> kb;
      break;
    }
    std::getline(in, key);
  }
  return kb / 1024.0;
}
// The CPU backend's forward of a small MoE model written by synth into `dir` (2 x 256 tokens),
// recording included as always on the CPU: what it costs beyond the products and attention
// (elementwise_ns_from, the recording share taken out with k.record_fraction).
double elementwise_rate(int threads, const std::string& dir, const PlanCoefficients& k) {
  const ScratchModel model(dir, moe_config_json({512, 256, 2, 4, 2, 64, 8, 2, 128}), 5);
  const Checkpoint& ck = model.checkpoint();
  const ModelConfig& c = ck.config();
  ForwardOptions fo;
  fo.threads = threads;
  auto be = make_cpu_backend(ck, ShardPlan::make(1, 0, 1, 1, ck.config()), model.comms(), fo);
  const int64_t N = 2, T = 256;
  const IntArray tokens = make_probes("random:2:256:1", c.vocab_size);
  ForwardObserver none;
  be->run(tokens, 0, none);  // warm-up
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const auto t = Clock::now();
    be->run(tokens, 0, none);
    best = std::min(best, since(t));
  }
  return elementwise_ns_from(c, "cpu", N, T, best / (1.0 + k.record_fraction), k);
}

}  // namespace

PlanCoefficients calibrate_cpu(int threads, const std::string& scratch_dir, const Comm& world) {
  PlanCoefficients k = default_coefficients("cpu");
  cpu::set_threads(threads);
  k.gemm_gflops = gemm_rate(512, 1024, 1024);
  const double small = gemm_rate(64, 256, 1024);
  // rate(M) = r M / (M + h): h from the 64-row rate.
  k.gemm_half_m = small < k.gemm_gflops ? 64.0 * (k.gemm_gflops / small - 1.0) : 0.0;
  k.attention_gflops = attention_rate(threads);
  k.load_gbps = load_rate(scratch_dir);
  if (world.size() > 1) {
    const size_t n = size_t{8} << 20;  // 32 MB, a layer's activations of a few probes
    std::vector<float> buf(n, 1.f);
    world.allreduce_sum(buf.data(), n);
    world.barrier();
    const auto t = Clock::now();
    const int reps = 5;
    for (int i = 0; i < reps; ++i) world.allreduce_sum(buf.data(), n);
    const double s = since(t) / reps;
    const double P = world.size();
    k.intra_gbps = 2.0 * (P - 1) / P * static_cast<double>(n * 4) / s / 1e9;
    double v = k.intra_gbps;
    world.allreduce_sum(&v, 1);
    k.intra_gbps = v / P;
  }
  k.base_mib = resident_mib();
  k.elementwise_ns = elementwise_rate(threads, scratch_dir, k);
  k.source =
      "calibrated on " + host_name() + " with " + std::to_string(threads) + " thread(s)" +
      (world.size() > 1 ? ", allreduce over " + std::to_string(world.size()) + " ranks" : "");
  return k;
}

}  // namespace sinkscope
