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
#include <memory>
#include <utility>
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

double gemm_rate(int64_t M, int64_t N, int64_t K, double seconds) {
  std::vector<float> A(static_cast<size_t>(M * K), 0.5f), B(static_cast<size_t>(N * K), 0.25f),
      C(static_cast<size_t>(M * N));
  return rate([&] { cpu::gemm_nt(M, N, K, A.data(), K, B.data(), K, C.data(), N); },
              2.0 * static_cast<double>(M * N * K), seconds);
}

// The CPU backend's causal attention: per head, query blocks of 64 against keys [0, i1), a causal
// softmax of the block, then the block times V; heads in parallel over the threads.
double attention_rate(int threads, double seconds) {
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
  return rate(run, flops, seconds);
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

// The rate a rank streams its weights from memory: a 512 MB array (beyond the caches) copied
// through a 1 MB buffer, as OpenBLAS packs each product's weights before computing on them (the
// forward reads the whole shard once per micro-batch; the GEMM rates above reuse one cached
// matrix). GB/s of the array, the best of 3.
double weights_rate() {
  const size_t n = size_t{128} << 20, chunk = size_t{256} << 10;  // floats: 512 MB, 1 MB
  std::vector<float> src(n), dst(chunk);
  for (size_t i = 0; i < n; ++i) src[i] = static_cast<float>(i & 0xff);
  double best = 0, sum = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t = Clock::now();
    for (size_t i = 0; i < n; i += chunk) {
      std::memcpy(dst.data(), src.data() + i, chunk * sizeof(float));
      sum += static_cast<double>(dst[i % chunk]);
    }
    best = std::max(best, static_cast<double>(n * sizeof(float)) / since(t) / 1e9);
  }
  return sum >= 0 ? best : 0.0;  // the sum keeps the copies
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
// The CPU backend's forward of a small MoE model written by synth into `dir` (4 layers, 4 x 256
// tokens, about 40 ms on one core), recording included as always on the CPU: what it costs beyond
// the products and attention (elementwise_ns_from, the recording share taken out with
// k.record_fraction). The median of 7 forwards: a single one is short enough for a time slice
// lost to another process to move it by a quarter.
double elementwise_rate(int threads, const std::string& dir, const PlanCoefficients& k) {
  const ScratchModel model(dir, moe_config_json({512, 256, 4, 4, 2, 64, 8, 2, 128}), 5);
  const Checkpoint& ck = model.checkpoint();
  const ModelConfig& c = ck.config();
  ForwardOptions fo;
  fo.threads = threads;
  auto be = make_cpu_backend(ck, ShardPlan::make(1, 0, 1, 1, ck.config()), model.comms(), fo);
  const int64_t N = 4, T = 256;
  const IntArray tokens = make_probes("random:4:256:1", c.vocab_size);
  ForwardObserver none;
  be->run(tokens, 0, none);  // warm-up
  std::vector<double> times;
  for (int i = 0; i < 7; ++i) {
    const auto t = Clock::now();
    be->run(tokens, 0, none);
    times.push_back(since(t));
  }
  std::nth_element(times.begin(), times.begin() + 3, times.end());
  return elementwise_ns_from(c, "cpu", N, T, times[3] / (1.0 + k.record_fraction), k);
}

// GFLOP/s of back-to-back 512 x 1024 x 1024 products over `seconds` (an average: what a rank gets
// of its cores, time slices lost to other processes included).
double gemm_throughput(double seconds) {
  const int64_t M = 512, N = 1024, K = 1024;
  std::vector<float> A(static_cast<size_t>(M * K), 0.5f), B(static_cast<size_t>(N * K), 0.25f),
      C(static_cast<size_t>(M * N));
  cpu::gemm_nt(M, N, K, A.data(), K, B.data(), K, C.data(), N);
  int64_t n = 0;
  const auto start = Clock::now();
  do {
    cpu::gemm_nt(M, N, K, A.data(), K, B.data(), K, C.data(), N);
    ++n;
  } while (since(start) < seconds);
  return 2.0 * static_cast<double>(M * N * K * n) / since(start) / 1e9;
}

// The mean of the fastest 80% of `reps` timed calls of `f` (after one untimed call), in seconds:
// a rare outlier is dropped, while the waits on a descheduled partner that an oversubscribed
// node adds to many calls (as to the forward's collectives) stay in.
template <class F>
double trimmed_mean_seconds(F&& f, int reps) {
  f();
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    const auto t = Clock::now();
    f();
    times.push_back(since(t));
  }
  std::sort(times.begin(), times.end());
  const size_t keep = std::max<size_t>(1, times.size() * 4 / 5);
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += times[i];
  return sum / static_cast<double>(keep);
}

// The mean over the ranks of `comm` of each rank's value.
double mean_over(const Comm& comm, double v) {
  comm.allreduce_sum(&v, 1);
  return v / comm.size();
}

// alpha (s per step) and beta (bytes/s) of t = steps alpha + moved / beta: alpha from a message
// too small for its bytes to count (t_small / steps), beta from the large one's time beyond
// that latency. Waits on a descheduled partner (more ranks than free cores) inflate both times
// alike; at least a tenth of the large time is taken as transfer so that noise in the difference
// cannot make beta unbounded.
std::pair<double, double> fit_collective(double t_small, double moved_large, double t_large,
                                         double steps) {
  const double alpha = t_small / steps;
  return {alpha, moved_large / std::max(t_large - steps * alpha, 0.1 * t_large)};
}

// The ranks of this node: a split of `world` by node key.
std::unique_ptr<Comm> node_comm(const Comm& world) {
  const std::vector<std::string> keys = world.allgather_bytes(world.node_key());
  const std::string& mine = keys[static_cast<size_t>(world.rank())];
  const int color = static_cast<int>(std::find(keys.begin(), keys.end(), mine) - keys.begin());
  return world.split(color, world.rank());
}

// The node's ranks together: the GEMM rate each gets when all compute at once (the cores they
// share), and the all-reduce and all-to-all the forward uses (fp32, the forward's waits) at a
// 4 KB and a 4 MB message per rank, each fitted to steps x latency + bus bytes / bandwidth (the
// forward's messages: a micro-batch's B x T x D floats, a few MB for a small model; Open MPI's
// shared-memory all-reduce on the development VM falls from about 1 GB/s to 0.13 GB/s above
// 16 MB, which this linear model does not follow).
void calibrate_node(const Comm& node, int threads, PlanCoefficients* k) {
  const double P = node.size();
  // The best of 3 rounds of 0.3 s alone then 0.3 s together: sharing the cores costs every round
  // alike, a slow spell of the machine only the round it falls in (on the development VM one
  // 1 s window gave 0.80 now and then while the forward of both ranks ran as fast as one core
  // each; an oversubscribed node stays far below 0.85 in every round).
  double share = 0;
  for (int round = 0; round < 3; ++round) {
    node.barrier();
    const double alone = mean_over(node, node.rank() == 0 ? gemm_throughput(0.3) * P : 0.0);
    node.barrier();
    share = std::max(share, mean_over(node, gemm_throughput(0.3)) / alone);
  }
  // Slower together: the ranks get share x ranks x threads cores' worth. As fast: at least that
  // many (the machine's count).
  k->cores = share < 0.85 ? share * P * threads : std::max(P * threads, this_machine_cores());
  const size_t small = size_t{1} << 10, large = size_t{1} << 20;  // floats: 4 KB, 4 MB
  std::vector<float> buf(large, 1.f);
  double t[2], u[2];
  for (int i = 0; i < 2; ++i) {
    const size_t n = i == 0 ? small : large;
    node.barrier();
    t[i] = mean_over(node, trimmed_mean_seconds([&] { node.allreduce_sum(buf.data(), n); }, 30));
    const std::vector<float> send(n, 1.f);
    const std::vector<size_t> counts(static_cast<size_t>(P), n / static_cast<size_t>(P));
    std::vector<float> recv;
    std::vector<size_t> recv_counts;
    node.barrier();
    u[i] = mean_over(
        node, trimmed_mean_seconds([&] { node.alltoallv(send, counts, &recv, &recv_counts); }, 30));
  }
  // Ring all-reduce: 2 (P - 1) steps moving 2 (P - 1) / P of the bytes; all-to-all: the counts,
  // then P - 1 steps moving the (P - 1) / P of the rows that leave the rank.
  const double steps = 2 * (P - 1), bytes = 4.0 * static_cast<double>(large);
  const auto [ar_alpha, ar_beta] = fit_collective(t[0], 2 * (P - 1) / P * bytes, t[1], steps);
  const auto [a2a_alpha, a2a_beta] = fit_collective(u[0], (P - 1) / P * bytes, u[1], steps);
  k->intra_gbps = ar_beta / 1e9;
  k->intra_latency_us = ar_alpha * 1e6;
  k->a2a_gbps = a2a_beta / 1e9;
  k->a2a_latency_us = a2a_alpha * 1e6;
}

}  // namespace

PlanCoefficients calibrate_cpu(int threads, const std::string& scratch_dir, const Comm& world) {
  PlanCoefficients k = default_coefficients("cpu");
  cpu::set_threads(threads);
  const std::unique_ptr<Comm> node = node_comm(world);
  // One rank per node measures the rates alone; the others wait.
  if (node->rank() == 0) {
    // The best of 4 rounds, each timing the three rates in turn for 0.1 s: a slow spell that
    // the machine's own counters do not show (the VM's host, a clock change) has to last a whole
    // round to lower a rate, where one 0.4 s window of each could lose a third of a rate to it.
    double small = 0;
    k.gemm_gflops = k.attention_gflops = 0;
    for (int round = 0; round < 4; ++round) {
      k.gemm_gflops = std::max(k.gemm_gflops, gemm_rate(512, 1024, 1024, 0.1));
      small = std::max(small, gemm_rate(64, 256, 1024, 0.1));
      k.attention_gflops = std::max(k.attention_gflops, attention_rate(threads, 0.1));
    }
    // rate(M) = r M / (M + h): h from the 64-row rate.
    k.gemm_half_m = small < k.gemm_gflops ? 64.0 * (k.gemm_gflops / small - 1.0) : 0.0;
    k.load_gbps = load_rate(scratch_dir);
    k.base_mib = resident_mib();
    k.mem_gbps = weights_rate();
    k.elementwise_ns = elementwise_rate(threads, scratch_dir, k);
  }
  if (node->size() > 1) {
    calibrate_node(*node, threads, &k);
  } else {
    k.cores = this_machine_cores();
  }
  k.source = "calibrated on " + host_name() + " with " + std::to_string(threads) + " thread(s)" +
             (node->size() > 1 ? ", collectives and cores of " + std::to_string(node->size()) +
                                     " ranks on the node"
                               : "");
  return k;
}

}  // namespace sinkscope
