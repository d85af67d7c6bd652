// The sweep planner (docs/planner.md): memory per rank, time per checkpoint and the tp/ep/dp layout
// of a sweep before it is submitted. A cost model of the forward (FLOPs, bytes, exchange volumes)
// with coefficients measured by `sinkscope plan --calibrate` or read from the site file.
// No MPI, CUDA or HDF5 types here.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "sinkscope/config.hpp"

namespace sinkscope {

class Comm;

// FLOPs per token of one forward (multiply-add = 2), the whole model (not per rank).
struct ForwardFlops {
  double projections = 0;  // q/k/v/o (and fused qkv)
  double attention = 0;  // causal QK^T and AV: T-dependent ((T + 1) / 2 keys per query on average)
  double experts = 0;    // the top-k routed experts
  double shared_experts = 0;  // shared experts (and their sigmoid gate)
  double dense_mlp = 0;       // dense MLP layers
  double router = 0;
  double total() const {
    return projections + attention + experts + shared_experts + dense_mlp + router;
  }
};
// Family-aware: multi-head latent attention (DeepSeek-V3: q/kv down- and up-projections, query/key
// width nope + rope, value width v_head_dim), per-layer sliding windows (gpt-oss), dense first
// layers and shared experts.
ForwardFlops forward_flops(const ModelConfig& c, int64_t seq_len);
// Keys a query attends to on average in a layer with window `window` (0: causal, all earlier
// keys) over T positions: (T + 1) / 2 without a window or when T <= window, else
// (W (W + 1) / 2 + (T - W) W) / T.
double mean_keys(int64_t window, int64_t seq_len);

// Parameters (elements) a rank of layout (tp, ep, etp) holds, from the family's tensor table
// (required_tensors) and the slices of sinkscope/shard_plan.hpp. The embedding and lm_head are
// counted apart: the CPU backend reads embedding rows from the mapped file, the CUDA backend holds
// the embedding on the device.
struct ShardParams {
  int64_t held = 0;       // every tensor but embedding and lm_head, this rank's slices
  int64_t embedding = 0;  // vocab x hidden
  int64_t total_model = 0;
  // Bytes of `held` as the checkpoint stores them: 2 per bf16 parameter; MXFP4 experts (gpt-oss,
  // quantization_config mxfp4) 17 bytes per 32 weights (16 bytes of e2m1 pairs + one e8m0 scale);
  // FP8 projections (quantization_config fp8) 1 byte per weight + a float32 scale per block.
  double held_stored_bytes = 0;
};
ShardParams shard_params(const ModelConfig& c, int tp, int ep, int etp);

// Coefficients of the cost model. Keys in a site file: SINKSCOPE_PLAN_<NAME> (docs/planner.md).
struct PlanCoefficients {
  double gemm_gflops = 0;  // large GEMM rate per rank (GFLOP/s)
  double gemm_half_m = 0;  // rows M at which a GEMM runs at half that rate (rate(M) = r M/(M+h))
  double attention_gflops = 0;  // causal attention rate per rank (GFLOP/s)
  double load_gbps = 0;         // checkpoint read + conversion rate per rank (GB/s)
  // Rate at which a rank streams its weights from memory (GB/s): every micro-batch reads the whole
  // shard once (OpenBLAS packs each product's weights before computing; the GEMM rates above are
  // measured with them in cache). 0: not modelled (CUDA: a pass reads its weights in a few ms).
  double mem_gbps = 0;
  // Collectives cost alpha per step + bytes / beta: an all-reduce over n ranks is a ring of
  // 2 (n - 1) steps moving 2 (n - 1) / n of its bytes, an all-to-all exchanges its counts and then
  // its rows (2 (n - 1) steps) moving the (n - 1) / n of a rank's rows that leave it.
  double intra_gbps = 0;        // all-reduce bus bandwidth within a node (GB/s)
  double intra_latency_us = 0;  // all-reduce latency per step within a node
  double a2a_gbps = 0;          // all-to-all bus bandwidth within a node (GB/s)
  double a2a_latency_us = 0;    // all-to-all latency per step within a node
  double inter_gbps = 0;        // bus bandwidth of either collective across nodes (GB/s)
  double inter_latency_us = 0;  // latency per step across nodes
  // CPU: cores of a node that its ranks' threads share (ranks x threads above it slow every rank
  // by cores / (ranks x threads)); 0: not limited. `plan` fills 0 with this machine's online
  // CPUs; a calibration under mpirun measures the cores the ranks actually get.
  double cores = 0;
  double record_fraction = 0;  // recording's cost as a fraction of the forward
  // ns per token, layer and 1024 hidden dims of the forward's work between the products (norms,
  // RoPE, routing and its host round trip, combine, residual adds): the backend's measured forward
  // minus what the GEMM and attention rates predict for it (calibration), else a default.
  double elementwise_ns = 0;
  double base_mib = 0;   // resident memory of a rank before the model (libraries, buffers)
  double startup_s = 0;  // process start, MPI init, checkpoint open per checkpoint
  std::string source;    // where the values came from
};
// Documented defaults: "cpu" (the development VM, docs/benchmarks.md) or "cuda" (one H200).
PlanCoefficients default_coefficients(const std::string& device);
// Overrides from KEY=VALUE lines (a site file); `device` picks the key set: SINKSCOPE_PLAN_* for
// cpu, SINKSCOPE_PLAN_CUDA_* for cuda.
PlanCoefficients coefficients_from(const std::map<std::string, std::string>& kv,
                                   const std::string& device);
std::map<std::string, std::string> read_site_file(const std::string& path);
// KEY=VALUE lines of the coefficients (for a site file).
std::vector<std::pair<std::string, std::string>> coefficient_keys(const PlanCoefficients& k,
                                                                  const std::string& device);
// Updates (or appends) those keys in the site file, keeping every other line.
void write_coefficients(const std::string& site_file, const PlanCoefficients& k,
                        const std::string& device);

// Measures the CPU coefficients here: sgemm through src/cpu/kernels, an attention-sized loop, a
// file read + bf16 conversion in `scratch_dir`, the CPU backend's forward of a small model (rank 0
// alone), and with more than one rank on a node the all-reduce and the all-to-all at two sizes
// (alpha and beta) and the cores the node's ranks get when all compute at once.
PlanCoefficients calibrate_cpu(int threads, const std::string& scratch_dir, const Comm& world);
// The CUDA coefficients measured on this rank's GPU (src/cuda/calibrate.cpp; builds with
// -DSINKSCOPE_CUDA=ON): cuBLAS bf16 GEMM rates, the fused attention, the backend's checkpoint load
// of a small synth model in `scratch_dir`, recording's share of its forward, the context's memory.
PlanCoefficients calibrate_cuda(const std::string& scratch_dir, const Comm& world);
// The elementwise coefficient from one measured forward (seconds, recording off) of `cfg` on one
// rank with `probes` x `seq_len` tokens: (measured - predicted products and attention) per token,
// layer and 1024 hidden dims, in ns (0 when the products alone take longer).
double elementwise_ns_from(const ModelConfig& cfg, const std::string& device, int64_t probes,
                           int64_t seq_len, double measured_s, PlanCoefficients k);

struct PlanRequest {
  ModelConfig cfg;
  std::string device = "cpu";
  int64_t probes = 0, seq_len = 0, batch = 4;
  int64_t checkpoints = 1, max_parallel = 0;  // array size; 0: all tasks at once
  int ranks_per_node = 0, nodes = 0;          // GPUs (cuda) or ranks (cpu) per node; 0: site
  int threads = 1;                            // CPU threads per rank
  double device_mem_gib = 0;                  // per GPU (cuda)
  double node_mem_gib = 0;                    // host memory per node
  int64_t ablation_passes = -1;  // extra forward passes per checkpoint; -1: the causal profile's
  int tp = 0, ep = 0;            // > 0: only this split
};

// Fills what the caller left at 0 from the site file: ranks per node (SITE_GPUS_PER_NODE, else
// SITE_RANKS / SITE_NODES on the CPU), nodes (SITE_NODES), GPU memory (SINKSCOPE_PLAN_GPU_MEM_GIB,
// else 139 GiB of an H200), node memory (SINKSCOPE_PLAN_NODE_MEM_GIB, else this machine's
// MemTotal).
void apply_site_defaults(const std::map<std::string, std::string>& site, PlanRequest* r);
// The CPUs this process may run on (its affinity mask): the default of PlanCoefficients::cores.
double this_machine_cores();

struct LayoutPlan {
  int world = 1, tp = 1, ep = 1, etp = 1, dp = 1, nodes = 1;
  double weight_gib = 0, scratch_gib = 0, device_gib = 0, host_gib = 0;  // per rank
  double limit_gib = 0;  // what must hold device_gib (cuda) or host_gib x ranks per node (cpu)
  bool fits = false;
  std::string why_not;
  double load_s = 0, forward_s = 0, record_s = 0, ablation_s = 0, exchange_s = 0;
  double checkpoint_s = 0, sweep_s = 0;
  double gemm_s = 0, attention_s = 0, elementwise_s = 0, weights_s = 0;  // parts of forward_s
  double cpu_share = 1;  // CPU: cores / (ranks x threads) of the node when below 1
};

struct Plan {
  PlanRequest req;
  PlanCoefficients coef;
  ForwardFlops flops;
  std::vector<LayoutPlan> layouts;  // every accepted layout, fitting or not
  int recommended = -1;             // index into layouts; -1: none fits
  int smallest_fitting = -1;        // fewest ranks that fit
  std::string why;                  // one line on the recommendation
  int64_t ablation_passes = 0;
};

// Predicts one layout (no fit decision beyond memory).
LayoutPlan predict_layout(const PlanRequest& r, const PlanCoefficients& k, int world, int tp,
                          int ep);
// Every (world, tp, ep) of at most nodes x ranks_per_node ranks that ShardPlan::make accepts.
Plan make_plan(const PlanRequest& r, const PlanCoefficients& k);

std::string format_plan(const Plan& p);
// KEY=VALUE lines for jobs/submit_sweep.sh: PLAN_RANKS, PLAN_NODES, PLAN_TP, PLAN_EP, PLAN_TIME,
// PLAN_MEM, PLAN_FITS.
std::string format_plan_shell(const Plan& p, double time_margin);
std::string slurm_time(double seconds);

}  // namespace sinkscope
