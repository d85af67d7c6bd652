// CUDA backend: the instrumented forward pass of the CPU backend (src/cpu/backend.cpp) on the
// device (docs/gpu-backend.md). Same hook points, same taps, same bookkeeping; what differs is
// where the work happens:
//   - the residual stream x stays on the device in fp32; every matrix product is bf16 x bf16 with
//     fp32 accumulation (cuBLAS), except the router (fp32, so routing matches the CPU reference
//     up to near-ties) and the circuit's G = delta W_K^T (TF32) and identity rows (fp32);
//   - attention is the fused kernel of attention.cu; it writes A[i, 0] for every head and query;
//   - the recording (head write norms via Gram matrices, position-0 deltas of every component,
//     attributions, k_0 checks, residual and MoE summaries) runs on the device; only the tap
//     arrays cross to the host, into pinned buffers, right before each observer call;
//   - routing bookkeeping (sorting the (token, expert) pairs by expert) runs on the device; with
//     several expert-parallel ranks the routed rows go device to device to their experts' owners
//     and the answers come back the same way (only the per-expert counts touch the host).
// Communication goes through DeviceCollectives (NCCL, or host staging with SINKSCOPE_NCCL=0).
#include "cuda/backend.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <optional>

#include "checkpoint/omp_threads.hpp"
#include "cpu/mla.hpp"
#include "cuda/check.hpp"
#include "cuda/collectives.hpp"
#include "cuda/device_buffer.hpp"
#include "cuda/gemm.hpp"
#include "cuda/kernels.cuh"
#include "cuda/weights.hpp"
#include "cuda/workspace.hpp"
#include "model/layer_plan.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"

namespace sinkscope {
namespace cuda {

int visible_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error state for later calls
    return 0;
  }
  return n;
}

namespace {

int local_rank_hint(const ShardPlan& plan) {
  // A placed plan knows the rank's index among its node's ranks (MPI's shared-memory split).
  if (!plan.placement.empty()) return plan.local_rank;
  for (const char* v :
       {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"})
    if (const char* s = std::getenv(v); s && *s) return std::atoi(s);
  return plan.rank;
}

// BackendEntry::prepare: creates the primary context of the device that select_device will pick
// for a placed plan (local rank modulo the visible devices) on a thread of its own. A failure is
// left for select_device and the backend's first checked call to report.
std::future<void> prepare_device(int local_rank) {
  return std::async(std::launch::async, [local_rank] {
    const int count = visible_device_count();
    if (count == 0) return;
    if (cudaSetDevice(local_rank % count) != cudaSuccess || cudaFree(nullptr) != cudaSuccess)
      (void)cudaGetLastError();  // this thread's error state only
  });
}

int select_device(const ShardPlan& plan) {
  const int count = visible_device_count();
  if (count == 0)
    throw RuntimeFailure("--device cuda: no CUDA device is visible to rank " +
                         std::to_string(plan.rank) + " on " + host_name());
  const int dev = local_rank_hint(plan) % count;
  CUDA_CHECK(cudaSetDevice(dev));
  return dev;
}

struct StreamHolder {
  cudaStream_t s = nullptr;
  StreamHolder() { CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~StreamHolder() {
    if (s) {
      cudaStreamSynchronize(s);
      cudaStreamDestroy(s);
    }
  }
  StreamHolder(const StreamHolder&) = delete;
  StreamHolder& operator=(const StreamHolder&) = delete;
};

struct EventHolder {
  cudaEvent_t e = nullptr;
  EventHolder() { CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming)); }
  ~EventHolder() {
    if (e) cudaEventDestroy(e);
  }
  EventHolder(const EventHolder&) = delete;
  EventHolder& operator=(const EventHolder&) = delete;
};

// Event marks per layer, in stream order; RunProfile's phases are the gaps between them.
enum Mark : int {
  kLayerStart,
  kQkvDone,
  kCircuitDone,
  kFlashDone,
  kHeadRecDone,
  kAttnDone,
  kAttnTapDone,
  kRouted,
  kExpertsDone,
  kCombineDone,
  kMoeRecDone,
  kMoeDone,
  kMlpTapDone,
  kResTapDone,
  kMarks
};

class CudaBackend final : public Backend, private LayerOps {
 public:
  CudaBackend(const Checkpoint* ck, const ModelConfig& cfg, const ShardPlan& plan,
              ForwardComms comms, ForwardOptions opt, std::optional<uint64_t> seed)
      : ck_(ck),
        c_(cfg),
        plan_(plan),
        comms_(comms),
        opt_(std::move(opt)),
        device_(select_device(plan)),
        blas_(stream_.s),
        coll_(comms, stream_.s) {
    set_error_context("rank " + std::to_string(plan.rank) + " on " + host_name());
    // The attention kernels take even head dims up to 128 and, for latent attention's query/key
    // (DeepSeek-V3: 128 + 64), padded widths of 192.
    const int64_t padded = (c_.head_dim + 15) / 16 * 16;
    if (c_.head_dim % 2 != 0 || c_.head_dim < 2 ||
        (c_.head_dim > 128 && !(c_.mla() && padded == 192)) || c_.value_dim() > 128)
      throw InputError("--device cuda: head_dim " + std::to_string(c_.head_dim) +
                       " is not supported (the CUDA attention takes even head dims up to 128, and "
                       "latent attention's query/key widths up to 192 with values up to 128)");
    if (c_.num_experts > 1024 || c_.top_k > 32)
      throw InputError("--device cuda: at most 1024 experts and top-32 routing are supported");
    if (plan_.etp != 1)
      throw InputError("--etp " + std::to_string(plan_.etp) +
                       ": the cuda backend keeps whole experts (etp=1)");
    D_ = c_.hidden_size;
    d_ = c_.head_dim;
    dv_ = c_.value_dim();
    mla_ = c_.mla();
    if (mla_) {
      mla_shape_.nope = static_cast<int>(c_.qk_nope_dim);
      mla_shape_.rope = static_cast<int>(c_.qk_rope_dim);
      mla_shape_.dv = static_cast<int>(c_.v_head_dim);
      mla_shape_.Rkv = static_cast<int>(c_.mla_kv_rank);
      mla_shape_.interleave = c_.rope.interleave;
    }
    dp_ = (d_ + 15) / 16 * 16;
    H_ = c_.num_heads;
    Hl_ = plan_.local_heads();
    mla_shape_.Hl = static_cast<int>(Hl_);
    KVl_ = plan_.local_kv_heads();
    qw_ = Hl_ * d_;
    kw_ = KVl_ * d_;
    qkv_ld_ = qw_ + 2 * kw_;
    E_ = c_.num_experts;
    K_ = c_.top_k;
    shared_ = c_.has_shared_expert();
    S_ = std::max<int64_t>(E_, 1) + (shared_ ? 1 : 0);
    group_ = c_.kv_group_size();
    L_ = c_.num_layers;
    ci_ = ComponentLayout(c_);
    qk_norm_ = c_.qk_norm == QkNormKind::kPerHead;
    full_width_ = c_.qk_norm == QkNormKind::kFullWidth;
    post_norm_ = c_.block == BlockKind::kPostNorm;
    parallel_ = c_.block == BlockKind::kParallel;
    norm_mode_ = post_norm_                    ? k::NormMode::kNone
                 : c_.norm == NormKind::kLayer ? k::NormMode::kLayer
                                               : k::NormMode::kRms;
    rot_ = c_.rope.rotated(c_.head_dim);
    renormalise_topk_ = c_.norm_topk_prob || c_.router == RouterKind::kTopKSoftmax;
    Ctot_ = ci_.count_before(L_);
    layers_ = make_layer_plan(c_, opt_.ablations, comms_.world->rank());
    eps_ = static_cast<float>(c_.rms_norm_eps);
    scale_ = static_cast<float>(c_.softmax_scale > 0 ? c_.softmax_scale
                                                     : 1.0 / std::sqrt(static_cast<double>(d_)));
    inv_freq_ = c_.rope.inv_freq(c_.head_dim);
    const uint64_t held_before = device_bytes_held();
    const auto load_start = std::chrono::steady_clock::now();
    w_ = ck_ ? load_device_model(*ck_, plan_, opt_.want_logits, blas_, stream_.s,
                                 load_threads(opt_.threads), opt_.load_progress)
             : synthesize_device_model(c_, plan_, opt_.want_logits, *seed, blas_, stream_.s);
    load_seconds_ =  // both return after a device synchronisation
        std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
    weight_device_bytes_ = device_bytes_held() - held_before;
    if (full_width_) {
      // A KV head held by several tp ranks (tp > num_kv_heads) enters the key's full-width RMS
      // once: on the rank that owns its first query head (as src/cpu/backend.cpp).
      std::vector<uint8_t> counts(static_cast<size_t>(KVl_));
      for (int64_t g = 0; g < KVl_; ++g)
        counts[static_cast<size_t>(g)] =
            ((plan_.kv_begin + g) * group_) / (H_ / plan_.tp) == coll_.tp_rank() ? 1 : 0;
      count_kv_.reserve(counts.size());
      CUDA_CHECK(cudaMemcpy(count_kv_.get(), counts.data(), counts.size(), cudaMemcpyHostToDevice));
    }
    if (post_norm_) {  // unit gains for the circuit's G (a post-norm block has no input norm)
      ones_.reserve(static_cast<size_t>(D_));
      k::fill(ones_.get(), D_, 1.f, s());
      CUDA_CHECK(cudaStreamSynchronize(s()));
    }
    near_ties_.assign(static_cast<size_t>(L_), 0);
    // The expert products: the Hopper kernel (grouped_gemm.cu) unless a cuBLAS route is asked for.
    const int I = static_cast<int>(c_.moe_intermediate_size), Dw = static_cast<int>(D_);
    // Experts with biases or another activation (gpt-oss) take the cuBLAS route with fp32
    // pre-activations: the Hopper kernel's epilogue is the plain SwiGLU.
    plain_experts_ = c_.act == Activation::kSilu && !c_.expert_bias;
    sm90_experts_ = blas_.allows_wgmma() && E_ > 0 && plain_experts_ &&
                    k::grouped_gemm_sm90_supported(Dw, I) && k::grouped_gemm_sm90_supported(I, Dw);
    if (blas_.requires_wgmma() && !sm90_experts_)
      throw InputError(
          "SINKSCOPE_CUDA_EXPERT_GEMM=wgmma: needs an sm_90a build on a compute capability 9.0 "
          "device, hidden and expert widths that are multiples of 8, and bias-free SwiGLU experts");
  }

  ~CudaBackend() override {
    cudaStreamSynchronize(copy_.s);  // copies may still fly into the pinned buffers after a throw
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    for (cudaEvent_t e : tap_events_) cudaEventDestroy(e);
  }

  std::string name() const override { return "cuda"; }
  uint64_t weight_bytes_loaded() const override { return w_.bytes_loaded; }
  double weight_load_seconds() const override { return load_seconds_; }
  std::string memory_summary() const override {
    const MemoryReport m = memory();
    return "; GPU memory: weights " + std::to_string(m.weight_bytes >> 20) +
           " MiB, weights + scratch " + std::to_string(m.held_bytes >> 20) +
           " MiB, device in use " + std::to_string(m.device_used >> 20) + " of " +
           std::to_string(m.device_total >> 20) + " MiB";
  }
  std::string kernel_summary() const override {
    return "; kernels: attention on " + k::attention_kernels_used() +
           "; expert products: " + expert_strategy();
  }
  double communication_seconds() const override { return coll_.seconds(); }
  void set_ablations(std::vector<Ablation> ablations) override {
    opt_.ablations = std::move(ablations);
    layers_ = make_layer_plan(c_, opt_.ablations, comms_.world->rank());
    ablations_dirty_ = true;
  }
  FloatArray run(const IntArray& tokens, int64_t probe0, ForwardObserver& obs) override;

  void set_record(bool r) { record_ = r; }
  void set_timing(bool t) { timing_ = t; }
  const RunProfile& profile() const { return profile_; }
  MemoryReport memory() const {
    MemoryReport r;
    r.weight_bytes = weight_device_bytes_;
    r.held_bytes = device_bytes_held();
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
      r.device_used = total_b - free_b;
      r.device_total = total_b;
    }
    return r;
  }
  const std::vector<int64_t>& near_ties() const { return near_ties_; }
  int64_t routed() const { return routed_; }
  std::string expert_strategy() const {
    return sm90_experts_ ? "one wgmma kernel per product for all experts (gather and SwiGLU fused)"
                         : blas_.expert_strategy();
  }

 private:
  cudaStream_t s() const { return stream_.s; }
  // The operations at the layer plan's hook points (model/layer_plan.hpp); the phase marks of
  // RunProfile sit between them.
  void embed(const IntArray& tokens) override;
  void residual(int64_t index) override {
    residual_tap(index);
    if (index > 0) mark(index - 1, kResTapDone);
  }
  void begin_layer(const PlannedLayer& layer) override {
    join_copies();
    mark(layer.layer, kLayerStart);
  }
  void attention(const PlannedLayer& layer) override {
    attention_block(layer);
    mark(layer.layer, kAttnTapDone);
  }
  void mlp(const PlannedLayer& layer) override {
    mlp_block(layer);
    mark(layer.layer, kMlpTapDone);
  }
  void residual_tap(int64_t index);
  void attention_block(const PlannedLayer& layer);
  void circuit(int64_t l, int64_t C);
  // Latent attention (DeepSeek-V3): the projections into Qa / Ka / Va and q (for qbar), and the key
  // attribution through the latent (docs/metrics.md, DeepSeek-V3).
  void mla_project(const DeviceLayer& Lw);
  void mla_circuit(int64_t l, int64_t C);
  void mlp_block(const PlannedLayer& layer);
  // The shared expert of an MoE layer (Qwen2-MoE) on the slice rows [s0, s1): its gated output is
  // added to m and, when recording, its position-0 write and rest sum go to slot E of p0 / rest.
  void shared_expert(const DeviceLayer& Lw, int64_t n, int64_t s0, int64_t s1, float* m, float* p0,
                     float* n0, float* rest);
  // Runs the experts on the slice's n * k (token, expert) pairs and returns their outputs (not yet
  // weighted) on the device, in source order: pairs sorted by expert, then by pair index.
  const bf16_bits* moe_experts(const DeviceLayer& Lw, int64_t n);
  // The expert FFN on `total` packed rows in groups: group g is rows[g] rows from offsets[g], all
  // routed to local expert expert[g]; bf16 outputs at the same rows of out. Packed row p is row p
  // of X, or row x_rows[p] / x_div of X when x_rows is given (the routed pairs' tokens).
  void expert_ffn(const DeviceLayer& Lw, const bf16_bits* X, const int32_t* x_rows, int x_div,
                  const std::vector<int>& rows, const std::vector<int64_t>& offsets,
                  const std::vector<int64_t>& expert, int64_t total, bf16_bits* out);
  void upload_ablations();
  void ensure_rope(int64_t T);
  void mark(int64_t l, int which);
  void collect_profile();
  void sync() { CUDA_CHECK(cudaStreamSynchronize(s())); }
  // The host side of a tap (reading its pinned copies, checks, the observer call) runs once the
  // device has reached this point of the stream, but only when flush_deferred() is called, so the
  // host does it while the device computes what was enqueued since.
  void defer(std::function<void()> work);
  // Runs deferred work, oldest first, until at most `keep` items are left.
  void flush_deferred(size_t keep);
  template <typename T>
  void to_host(T* dst, const T* src, size_t n) {
    if (n) CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToHost, s()));
  }
  // A tap's copy to the host: on the copy stream, after everything enqueued so far on the main one.
  template <typename T>
  void tap_to_host(T* dst, const T* src, size_t n) {
    if (!n) return;
    fork_copies();
    tap_copy(dst, src, n);
  }
  // The same without the fork, for the second and later copies of a group whose sources are all
  // written before one fork_copies().
  template <typename T>
  void tap_copy(T* dst, const T* src, size_t n) {
    if (n) CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToHost, copy_.s));
  }
  void fork_copies() {
    CUDA_CHECK(cudaEventRecord(fork_.e, s()));
    CUDA_CHECK(cudaStreamWaitEvent(copy_.s, fork_.e, 0));
  }
  void join_copies() {
    CUDA_CHECK(cudaEventRecord(join_.e, copy_.s));
    CUDA_CHECK(cudaStreamWaitEvent(s(), join_.e, 0));
  }
  template <typename T>
  void to_device(T* dst, const T* src, size_t n) {
    if (n) CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyHostToDevice, s()));
  }
  TapSource tap_source() const {
    return {B_, T_, D_, probe0_, ck_ ? ck_->dir() : "a synthetic model", " (cuda)"};
  }
  [[noreturn]] void non_finite(int64_t layer, const char* component, int64_t probe) const {
    throw RuntimeFailure(non_finite_message(layer, component, probe,
                                            ck_ ? ck_->dir() : "a synthetic model", " (cuda)"));
  }

  const Checkpoint* ck_;
  ModelConfig c_;
  ShardPlan plan_;
  ForwardComms comms_;
  ForwardOptions opt_;
  int device_;
  StreamHolder stream_;
  // The taps' copies to the host run here, behind the kernels that produce them (fork_), so the
  // main stream never waits for PCIe; the main stream waits for them (join_) at the start of the
  // next layer, before anything rewrites their device sources.
  StreamHolder copy_;
  EventHolder fork_, join_;
  Blas blas_;
  DeviceCollectives coll_;
  DeviceModel w_;
  uint64_t weight_device_bytes_ = 0;
  double load_seconds_ = 0;

  int64_t D_ = 0, d_ = 0, dv_ = 0, dp_ = 0, H_ = 0, Hl_ = 0, KVl_ = 0, qw_ = 0, kw_ = 0,
          qkv_ld_ = 0, E_ = 0, K_ = 0, S_ = 1;
  int64_t group_ = 1, L_ = 0, Ctot_ = 0;
  float eps_ = 1e-6f, scale_ = 1.f;
  ComponentLayout ci_;
  // Per-head q/k RMSNorm (Qwen3), full-width (OLMoE, OLMo-2) or none (Llama, Mixtral, ...).
  bool qk_norm_ = true, full_width_ = false;
  // The block wiring (docs/families.md): post-norm (OLMo-2), parallel residual (GPT-NeoX).
  bool post_norm_ = false, parallel_ = false, shared_ = false;
  k::NormMode norm_mode_ = k::NormMode::kRms;  // of the attention and MLP inputs
  int64_t rot_ = 0;                            // rotated dims per head (partial rotary)
  bool mla_ = false;                           // multi-head latent attention (DeepSeek-V3)
  k::MlaShape mla_shape_;
  // Top-k weights renormalised to sum 1: norm_topk_prob, or Mixtral's softmax over the selected
  // logits (the same weights).
  bool renormalise_topk_ = true;
  std::vector<double> inv_freq_;

  bool record_ = true, timing_ = false, ablations_dirty_ = true, ablate_embed_ = false;
  bool x_norms_ready_ = false;   // ws_.rnorms holds ||x|| per row (the MoE block's fused add)
  int64_t u_ready_for_ = -1;     // ws_.u and ws_.inv_rx hold this layer's attention input norm
  bool sm90_experts_ = false;    // the expert products run on grouped_gemm.cu's kernel
  bool plain_experts_ = true;    // SwiGLU experts without biases (else fp32 pre-activations)
  bool device_routing_ = false;  // this layer's expert tile lists were built on the device
  k::GroupedGemmPlan gemm_gu_, gemm_dn_;  // its tile lists for gate|up and down
  int64_t B_ = 0, T_ = 0, BT_ = 0, probe0_ = 0, rope_T_ = -1;
  LayerPlan layers_;
  ForwardObserver* obs_ = nullptr;  // of the current run
  RunProfile profile_;
  std::vector<cudaEvent_t> events_;
  struct Deferred {
    cudaEvent_t ready;
    std::function<void()> work;
  };
  std::deque<Deferred> deferred_;
  std::vector<cudaEvent_t> tap_events_;  // a ring; at most 3 taps are pending at once
  size_t next_tap_event_ = 0;
  std::vector<int64_t> near_ties_;
  int64_t routed_ = 0;

  // Device state: the RoPE tables, the ablation masks, the full-width norm's KV-head counts and the
  // post-norm blocks' unit gains.
  DeviceBuffer<float> cos_, sin_, ones_;
  DeviceBuffer<uint8_t> abl_heads_, abl_slots_;  // [L, H], [L, S]
  DeviceBuffer<uint8_t> count_kv_;
  // Every scratch buffer, planned per micro-batch shape (workspace.hpp).
  Workspace ws_;
  // Pinned host copies of the taps; each tap kind has its own, since up to three taps (MoE tap of
  // layer l, residual tap l + 1, attention tap l + 1) wait for their host side at once.
  PinnedBuffer<float> hx_, h_a0_, h_small_, h_attr_, h_mnorms_, h_rnorms_, h_x0_, h_mlp_;
  PinnedBuffer<int32_t> h_cnt_;
  // Routing of the current layer: pairs per expert and their offsets in source order.
  std::vector<int> counts_;
  std::vector<int64_t> offsets_;
};

void CudaBackend::mark(int64_t l, int which) {
  if (!timing_) return;
  const size_t i = static_cast<size_t>(l * kMarks + which);
  CUDA_CHECK(cudaEventRecord(events_[i], s()));
}

void CudaBackend::defer(std::function<void()> work) {
  constexpr size_t kRing = 8;
  if (deferred_.size() >= kRing) flush_deferred(kRing - 1);  // never with the flush points below
  while (tap_events_.size() < kRing) {
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    tap_events_.push_back(e);
  }
  cudaEvent_t e = tap_events_[next_tap_event_++ % kRing];
  fork_copies();  // ready = the main stream's work so far and the tap copies before it
  CUDA_CHECK(cudaEventRecord(e, copy_.s));
  deferred_.push_back(Deferred{e, std::move(work)});
}

void CudaBackend::flush_deferred(size_t keep) {
  while (deferred_.size() > keep) {
    Deferred d = std::move(deferred_.front());
    deferred_.pop_front();
    CUDA_CHECK(cudaEventSynchronize(d.ready));
    d.work();
  }
}

void CudaBackend::collect_profile() {
  profile_ = RunProfile{};
  profile_.layers = L_;
  if (!timing_) return;
  constexpr auto phases = RunProfile::phases();
  static_assert(phases.size() == kMarks - 1, "one phase between each two marks");
  for (int64_t l = 0; l < L_; ++l)
    for (int w = 0; w + 1 < kMarks; ++w) {
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, events_[static_cast<size_t>(l * kMarks + w)],
                                      events_[static_cast<size_t>(l * kMarks + w + 1)]));
      profile_.*phases[static_cast<size_t>(w)].ms += ms;
    }
}

void CudaBackend::ensure_rope(int64_t T) {
  if (T <= rope_T_) return;
  const int64_t half = rot_ / 2;
  // YaRN's attention factor scales cos and sin, as the CPU backend scales the rotated dims.
  const double af = c_.rope.attention_factor;
  std::vector<float> c(static_cast<size_t>(T * half)), sn(static_cast<size_t>(T * half));
  for (int64_t p = 0; p < T; ++p)
    for (int64_t j = 0; j < half; ++j) {  // double angles, as cpu::rope
      const double angle = static_cast<double>(p) * inv_freq_[static_cast<size_t>(j)];
      c[static_cast<size_t>(p * half + j)] = static_cast<float>(std::cos(angle) * af);
      sn[static_cast<size_t>(p * half + j)] = static_cast<float>(std::sin(angle) * af);
    }
  cos_.reserve(c.size());
  sin_.reserve(sn.size());
  to_device(cos_.get(), c.data(), c.size());
  to_device(sin_.get(), sn.data(), sn.size());
  sync();
  rope_T_ = T;
}

void CudaBackend::upload_ablations() {
  if (!ablations_dirty_) return;
  std::vector<uint8_t> heads, slots;
  for (const PlannedLayer& layer : layers_.layers) {
    heads.insert(heads.end(), layer.head_ablated.begin(), layer.head_ablated.end());
    slots.insert(slots.end(), layer.slot_ablated.begin(), layer.slot_ablated.end());
  }
  ablate_embed_ = layers_.embed_ablated;
  abl_heads_.reserve(heads.size());
  abl_slots_.reserve(slots.size());
  to_device(abl_heads_.get(), heads.data(), heads.size());
  to_device(abl_slots_.get(), slots.data(), slots.size());
  sync();
  ablations_dirty_ = false;
}

FloatArray CudaBackend::run(const IntArray& tokens, int64_t probe0, ForwardObserver& obs) {
  const int64_t B = static_cast<int64_t>(tokens.shape.at(0)),
                T = static_cast<int64_t>(tokens.shape.at(1));
  if (T < 2) throw InputError("probes need at least 2 positions (position 0 and the rest)");
  if (!record_ && !opt_.ablations.empty())
    throw RuntimeFailure("the CUDA backend applies ablations only with recording on");
  if (B * T * std::max<int64_t>(K_, 1) > INT32_MAX)
    throw InputError("--device cuda: micro-batch too large");
  CUDA_CHECK(cudaSetDevice(device_));
  B_ = B;
  T_ = T;
  BT_ = B * T;
  probe0_ = probe0;
  ensure_rope(T);
  upload_ablations();
  ws_.plan(c_, plan_, coll_.tp_size(), B, T, record_, opt_.want_logits);
  if (timing_ && events_.size() < static_cast<size_t>(L_ * kMarks)) {
    while (events_.size() < static_cast<size_t>(L_ * kMarks)) {
      cudaEvent_t e;
      CUDA_CHECK(cudaEventCreate(&e));
      events_.push_back(e);
    }
  }

  deferred_.clear();  // left over only when an earlier run threw
  obs_ = &obs;
  run_layers(layers_, *this, tokens);
  flush_deferred(0);
  FloatArray logits;
  if (opt_.want_logits) {
    const int64_t V = c_.vocab_size;
    k::norm_rows(c_.norm == NormKind::kLayer ? k::NormMode::kLayer : k::NormMode::kRms, ws_.x.get(),
                 BT_, static_cast<int>(D_), w_.final_norm.get(), w_.final_norm_bias.get(), eps_,
                 ws_.u.get(), nullptr, nullptr, nullptr, s());
    blas_.nt(BT_, V, D_, {ws_.u.get(), Dt::kBF16, D_}, {w_.lm_head.get(), Dt::kBF16, D_},
             {ws_.logits.get(), Dt::kF32, V});
    logits = FloatArray({static_cast<size_t>(B), static_cast<size_t>(T), static_cast<size_t>(V)},
                        "probe,position,vocab");
    to_host(logits.ptr(), ws_.logits.get(), logits.size());
  }
  sync();
  collect_profile();
  return logits;
}

void CudaBackend::embed(const IntArray& tokens) {
  const int64_t B = B_, T = T_, BT = BT_, D = D_;
  u_ready_for_ = -1;
  if (w_.embed.get()) {
    to_device(ws_.tokens.get(), tokens.data.data(), static_cast<size_t>(BT));
    k::embed_gather(w_.embed.get(), ws_.tokens.get(), BT, static_cast<int>(D), ws_.x.get(), s());
  } else {  // as the CPU backend: the checkpoint's rows in fp32, read on the host
    hx_.reserve(static_cast<size_t>(std::max<int64_t>(BT * D, 1)));
    const std::string embed = tensor_name(c_, Role::kEmbed);
    for (int64_t i = 0; i < BT; ++i)
      ck_->read_row(embed, tokens.data[static_cast<size_t>(i)], hx_.get() + i * D);
    to_device(ws_.x.get(), hx_.get(), static_cast<size_t>(BT * D));
  }
  if (!record_ || B == 0) return;
  CUDA_CHECK(
      cudaMemsetAsync(ws_.delta.get(), 0, static_cast<size_t>(B * Ctot_ * D) * sizeof(float), s()));
  k::column_mean_rest(ws_.x.get(), static_cast<int>(B), static_cast<int>(T), static_cast<int>(D), D,
                      ws_.partial.get(), ws_.colmean.get(), s());
  k::embed_p0(ws_.x.get(), static_cast<int>(B), static_cast<int>(T), static_cast<int>(D),
              ws_.colmean.get(), ablate_embed_, ws_.delta.get() + ci_.embed() * D, Ctot_ * D,
              ws_.p0_sum.get(), s());
}

void CudaBackend::residual_tap(int64_t index) {
  if (!record_) return;
  const int64_t B = B_, T = T_, BT = BT_, D = D_, probe0 = probe0_;
  h_rnorms_.reserve(static_cast<size_t>(std::max<int64_t>(BT, 1)));
  h_x0_.reserve(static_cast<size_t>(B * D + 1));
  if (!x_norms_ready_) k::row_norms(ws_.x.get(), BT, static_cast<int>(D), D, ws_.rnorms.get(), s());
  x_norms_ready_ = false;
  tap_to_host(h_rnorms_.get(), ws_.rnorms.get(), static_cast<size_t>(BT));
  if (B > 0) {
    fork_copies();
    CUDA_CHECK(cudaMemcpy2DAsync(h_x0_.get(), static_cast<size_t>(D) * sizeof(float), ws_.x.get(),
                                 static_cast<size_t>(T * D) * sizeof(float),
                                 static_cast<size_t>(D) * sizeof(float), static_cast<size_t>(B),
                                 cudaMemcpyDeviceToHost, copy_.s));
  }
  const bool median = probe0 == 0 && B > 0;  // Sun et al.'s |x| median: probe 0 only
  if (median) {
    k::abs_median(ws_.x.get(), T * D, ws_.median_scratch.get(), ws_.median.get(), s());
    tap_to_host(h_x0_.get() + B * D, ws_.median.get(), 1);
  }
  defer([this, index, B, D, median] {
    emit_residual_tap(*obs_, tap_source(), index, h_x0_.get(), h_rnorms_.get(),
                      median ? h_x0_[static_cast<size_t>(B * D)] : std::nanf(""));
  });
}

void CudaBackend::mla_project(const DeviceLayer& Lw) {
  const int64_t BT = BT_, D = D_, Rq = c_.mla_q_rank, Rkv = c_.mla_kv_rank,
                aw = Rq + Rkv + c_.qk_rope_dim, kvw = Hl_ * mla_shape_.dkv();
  const float eps = static_cast<float>(cpu::kMlaLatentEps);
  // [q_a | kv_a] in one product; the latent query's norm and up-projection; the latent's norm
  // (its 1 / rms per row: position 0's is the attribution's r_l) and kv_b.
  blas_.nt(BT, aw, D, {ws_.u.get(), Dt::kBF16, D}, {Lw.mla_a.get(), Dt::kBF16, D},
           {ws_.mla_a32.get(), Dt::kF32, aw});
  if (Rq > 0) {
    k::rms_norm(ws_.mla_a32.get(), BT, static_cast<int>(Rq), Lw.mla_q_a_norm.get(), eps,
                ws_.mla_q16.get(), nullptr, nullptr, s(), aw);
    blas_.nt(BT, qw_, Rq, {ws_.mla_q16.get(), Dt::kBF16, Rq}, {Lw.mla_q.get(), Dt::kBF16, Rq},
             {ws_.qkv.get(), Dt::kF32, qkv_ld_});
  } else {
    blas_.nt(BT, qw_, D, {ws_.u.get(), Dt::kBF16, D}, {Lw.mla_q.get(), Dt::kBF16, D},
             {ws_.qkv.get(), Dt::kF32, qkv_ld_});
  }
  k::rms_norm(ws_.mla_a32.get() + Rq, BT, static_cast<int>(Rkv), Lw.mla_kv_a_norm.get(), eps,
              ws_.mla_lat16.get(), nullptr, ws_.inv_rl.get(), s(), aw);
  blas_.nt(BT, kvw, Rkv, {ws_.mla_lat16.get(), Dt::kBF16, Rkv}, {Lw.mla_kv_b.get(), Dt::kBF16, Rkv},
           {ws_.mla_kv.get(), Dt::kF32, kvw});
  k::mla_pack(ws_.qkv.get(), qkv_ld_, ws_.mla_kv.get(), ws_.mla_a32.get(), aw,
              static_cast<int>(Rq + Rkv), BT, static_cast<int>(T_), mla_shape_,
              static_cast<int>(dp_), cos_.get(), sin_.get(), ws_.Qa.get(), ws_.Ka.get(),
              ws_.Va.get(), s());
}

void CudaBackend::mla_circuit(int64_t l, int64_t C) {
  const DeviceLayer& Lw = w_.layers[static_cast<size_t>(l)];
  const int64_t B = B_, T = T_, D = D_, ra = c_.mla_kv_rank + c_.qk_rope_dim;
  const bf16_bits* Wkva = Lw.mla_a.get() + c_.mla_q_rank * D;  // [Rkv + rope, D]
  // G = (delta (.) gamma_in) W_kva^T for the C upstream slots (TF32), as circuit() does with W_K.
  k::scale_columns(Wkva, ra, static_cast<int>(D), Lw.input_norm.get(), ws_.wkg.get(), s());
  blas_.nt(C, ra, D, {ws_.delta.get(), Dt::kF32, D, Ctot_ * D}, {ws_.wkg.get(), Dt::kF32, D, 0},
           {ws_.G.get(), Dt::kF32, ra, Ctot_ * ra}, 1.f, 0.f, static_cast<int>(B), Math::kTF32);
  k::identity_rows(ws_.p0_sum.get(), ws_.x.get(), static_cast<int>(B), static_cast<int>(T),
                   static_cast<int>(D), Lw.input_norm.get(), false, ws_.idrows.get(), s());
  k::rows_times_wt(ws_.idrows.get(), static_cast<int>(2 * B), static_cast<int>(D), Wkva,
                   static_cast<int>(ra), D, ws_.kid.get(), s());
  k::mla_circuit_finish(ws_.kid.get(), ws_.inv_rx.get(), ws_.inv_rl.get(), static_cast<int>(B),
                        static_cast<int>(T), ws_.qbar.get(), Lw.mla_kv_b.get(),
                        Lw.mla_kv_a_norm.get(), mla_shape_,
                        static_cast<float>(c_.rope.attention_factor), scale_, ws_.k0m.get(),
                        ws_.k0s.get(), ws_.qk.get(), s());
  // Every local head contracts the same latent-and-rope rows: one "KV head" of width ra.
  k::attr_contract(ws_.G.get(), Ctot_ * ra, ws_.qk.get(), static_cast<int>(B), static_cast<int>(C),
                   static_cast<int>(Hl_), 1, static_cast<int>(ra),
                   static_cast<int>(plan_.head_begin), static_cast<int>(H_), 0, ws_.attr.get(),
                   s());
}

void CudaBackend::circuit(int64_t l, int64_t C) {
  if (mla_) return mla_circuit(l, C);
  const DeviceLayer& Lw = w_.layers[static_cast<size_t>(l)];
  const int64_t B = B_, T = T_, D = D_;
  const bf16_bits* Wk = Lw.wqkv.get() + qw_ * D;
  // The identity check's two rows in plain fp32: sum of position-0 writes, and the residual itself,
  // times W_K (LayerNorm's centring first; else in one pass from the rows' sources).
  const float* gamma = post_norm_ ? nullptr : Lw.input_norm.get();
  if (norm_mode_ == k::NormMode::kLayer ||
      !k::identity_keys(ws_.p0_sum.get(), ws_.x.get(), static_cast<int>(B), static_cast<int>(T),
                        static_cast<int>(D), gamma, Wk, static_cast<int>(kw_), D, ws_.kid.get(),
                        s())) {
    k::identity_rows(ws_.p0_sum.get(), ws_.x.get(), static_cast<int>(B), static_cast<int>(T),
                     static_cast<int>(D), gamma, norm_mode_ == k::NormMode::kLayer,
                     ws_.idrows.get(), s());
    k::rows_times_wt(ws_.idrows.get(), static_cast<int>(2 * B), static_cast<int>(D), Wk,
                     static_cast<int>(kw_), D, ws_.kid.get(), s());
  }
  k::KeyNorm kn;
  kn.gain = qk_norm_ || full_width_ ? Lw.k_norm.get() : nullptr;
  kn.gain_stride = full_width_ ? d_ : 0;
  kn.inv_rk_rows = full_width_ ? ws_.inv_rk_rows.get() : nullptr;
  kn.kconst = Lw.kconst.get();
  kn.rot = static_cast<int>(rot_);
  kn.rope_factor = static_cast<float>(c_.rope.attention_factor);
  k::circuit_finish(ws_.kid.get(), ws_.inv_rx.get(), static_cast<int>(B), static_cast<int>(T),
                    ws_.qbar.get(), kn, static_cast<int>(Hl_), static_cast<int>(KVl_),
                    static_cast<int>(d_), static_cast<int>(plan_.head_begin),
                    static_cast<int>(group_), static_cast<int>(plan_.kv_begin), eps_, scale_,
                    ws_.k0m.get(), ws_.k0s.get(), ws_.qk.get(), s());
  // attr[b, h, c] = delta_c (.) gamma W_K,g(h)^T qk_h: the heads' key directions in the residual's
  // coordinates, then one fp32 product with the C upstream deltas per probe.
  // (post-norm blocks: no input norm, unit gains; LayerNorm: the centring folded in).
  k::key_directions(Wk, post_norm_ ? nullptr : Lw.input_norm.get(),
                    norm_mode_ == k::NormMode::kLayer, ws_.qk.get(), static_cast<int>(B),
                    static_cast<int>(Hl_), static_cast<int>(KVl_), static_cast<int>(d_),
                    static_cast<int>(D), static_cast<int>(plan_.head_begin),
                    static_cast<int>(group_), static_cast<int>(plan_.kv_begin), ws_.G.get(), s());
  if (C > 0)
    blas_.nt(Hl_, C, D, {ws_.G.get(), Dt::kF32, D, Hl_ * D},
             {ws_.delta.get(), Dt::kF32, D, Ctot_ * D}, {ws_.attr.get(), Dt::kF32, C, Hl_ * C}, 1.f,
             0.f, static_cast<int>(B));
}

void CudaBackend::attention_block(const PlannedLayer& layer) {
  const int64_t l = layer.layer;
  const DeviceLayer& Lw = w_.layers[static_cast<size_t>(l)];
  const int64_t B = B_, T = T_, BT = BT_, D = D_, d = d_, Hl = Hl_, qw = qw_;
  // The attention output z holds each head's value dims (dv; the query/key width d under latent
  // attention): its width zw, and the head-write recording, follow dv.
  const int64_t dv = dv_, dvp = (dv + 15) / 16 * 16, zw = Hl * dv;
  const int Bi = static_cast<int>(B), Ti = static_cast<int>(T), Di = static_cast<int>(D);
  const int64_t vt_elems =
      k::flash_attention_scratch(Bi, Ti, static_cast<int>(KVl_), static_cast<int>(dp_));

  if (parallel_) {  // the MLP of a parallel block reads the residual before this attention's write
    CUDA_CHECK(cudaMemcpyAsync(ws_.xpar.get(), ws_.x.get(),
                               static_cast<size_t>(BT * D) * sizeof(float),
                               cudaMemcpyDeviceToDevice, s()));
  }
  if (u_ready_for_ != l)  // else the MoE block before formed it with x
    k::norm_rows(norm_mode_, ws_.x.get(), BT, Di, Lw.input_norm.get(), Lw.input_norm_bias.get(),
                 eps_, ws_.u.get(), nullptr, nullptr, ws_.inv_rx.get(), s());
  u_ready_for_ = -1;
  // The sink queries (docs/metrics.md 1.4): those that can see position 0.
  const int64_t window = c_.window(l), nq = window > 0 ? std::min(T, window) : T;
  if (mla_) {
    mla_project(Lw);
  } else {
    blas_.nt(BT, qkv_ld_, D, {ws_.u.get(), Dt::kBF16, D}, {Lw.wqkv.get(), Dt::kBF16, D},
             {ws_.qkv.get(), Dt::kF32, qkv_ld_});
    k::add_row_bias(ws_.qkv.get(), BT, static_cast<int>(qkv_ld_), qkv_ld_, Lw.qkv_bias.get(), s());
    if (full_width_) {
      // One RMS over every head of q (and every KV head of k): partial sums here, summed over tp.
      k::full_width_sumsq(ws_.qkv.get(), BT, qkv_ld_, static_cast<int>(qw), static_cast<int>(KVl_),
                          static_cast<int>(d), count_kv_.get(), ws_.fw_sums.get(), s());
      coll_.tp_allreduce_sum(ws_.fw_sums.get(), static_cast<size_t>(2 * BT));
      k::full_width_apply(ws_.qkv.get(), BT, qkv_ld_, static_cast<int>(qw), static_cast<int>(kw_),
                          ws_.fw_sums.get(), static_cast<float>(H_ * d),
                          static_cast<float>(c_.num_kv_heads * d), eps_, Lw.q_norm.get(),
                          Lw.k_norm.get(), ws_.inv_rk_rows.get(), s());
    }
    // Recording: qbar, the mean of the normed rotated q over the sink queries past position 0,
    // from the same pass.
    k::qk_norm_rope(
        ws_.qkv.get(), Bi, Ti, static_cast<int>(qkv_ld_), static_cast<int>(Hl),
        static_cast<int>(KVl_), static_cast<int>(d), static_cast<int>(dp_), static_cast<int>(rot_),
        qk_norm_ ? Lw.q_norm.get() : nullptr, qk_norm_ ? Lw.k_norm.get() : nullptr, eps_,
        cos_.get(), sin_.get(), ws_.Qa.get(), ws_.Ka.get(), ws_.Va.get(),
        record_ && B > 0 ? ws_.qbar.get() : nullptr, static_cast<int>(nq), ws_.partial.get(), s());
  }
  const int64_t C = ci_.count_before(l);
  if (record_ && B > 0) {
    if (mla_)  // mla_pack left the rotated queries in qkv's q columns
      k::column_mean_rest(ws_.qkv.get(), Bi, Ti, static_cast<int>(qw), qkv_ld_, ws_.partial.get(),
                          ws_.qbar.get(), s(), static_cast<int>(nq));
    mark(l, kQkvDone);
    circuit(l, C);
  } else {
    mark(l, kQkvDone);
  }
  mark(l, kCircuitDone);
  k::flash_attention(ws_.Qa.get(), ws_.Ka.get(), ws_.Va.get(), ws_.z.get(), ws_.a0.get(), Bi, Ti,
                     static_cast<int>(Hl), static_cast<int>(KVl_), static_cast<int>(dv),
                     static_cast<int>(dp_), static_cast<int>(plan_.head_begin),
                     static_cast<int>(group_), static_cast<int>(plan_.kv_begin), scale_,
                     vt_elems > 0 ? ws_.Vt.get() : nullptr, s(), k::AttnKernel::kAuto,
                     {static_cast<int>(window), Lw.sinks.get(),
                      record_ && Lw.sinks.get() ? ws_.sink_mass.get() : nullptr});
  mark(l, kFlashDone);

  float* a = ws_.tp_pack.get();
  float* hp = a + BT * D;  // [B, H, {delta, p0}, D]
  // The z and W_O whose products are the head writes as the block adds them: post-norm blocks
  // scale them per position by 1 / rms(a) and per dimension by the output norm's gain.
  const bf16_bits* zrec = ws_.z.get();
  const bf16_bits* wrec = Lw.wo.get();
  if (post_norm_) {
    // a = z W_O^T (+ b_O), complete over the tp group, then a * gain / rms(a) per position.
    blas_.nt(BT, D, zw, {ws_.z.get(), Dt::kBF16, zw}, {Lw.wo.get(), Dt::kBF16, zw},
             {a, Dt::kF32, D});
    coll_.tp_allreduce_sum(a, static_cast<size_t>(BT * D));
    k::add_row_bias(a, BT, Di, D, Lw.o_bias.get(), s());
    k::post_norm_rows(a, BT, Di, Lw.attn_out_norm.get(), eps_, ws_.out_scale.get(), s());
    if (record_ && B > 0) {
      k::scale_rows_bf16(ws_.z.get(), BT, static_cast<int>(zw), ws_.out_scale.get(), ws_.zs.get(),
                         s());
      zrec = ws_.zs.get();
    }
    wrec = Lw.wo_scaled.get();
  }
  if (record_ && B > 0) {
    // ||w_h[i]||^2 = z_h[i]^T (W_O,h^T W_O,h) z_h[i], fused on the tensor cores, and zbar (the
    // mean of z over i >= 1) from the same read of z.
    k::head_write_norms(zrec, Lw.gram_hi.get(), Lw.gram_lo.get(), Bi, Ti, static_cast<int>(Hl),
                        static_cast<int>(dv), static_cast<int>(dvp), ws_.norm_partial.get(),
                        ws_.wp0.get(), ws_.wrest.get(), ws_.zbar.get(), s());
    // Position-0 vector and delta of each head write: linear in z, so W_O,h (z_h[0] - zbar_h);
    // every head slot of hp is written (zeros for the other tp ranks' heads).
    k::head_vectors(zrec, ws_.zbar.get(), wrec, Bi, Ti, static_cast<int>(Hl), static_cast<int>(dv),
                    Di, static_cast<int>(H_), static_cast<int>(plan_.head_begin), hp, s());
  }
  mark(l, kHeadRecDone);
  if (post_norm_) {
    if (record_) coll_.tp_allreduce_sum(hp, static_cast<size_t>(B * H_ * 2 * D));
    k::add_inplace(ws_.x.get(), a, BT * D, s());
  } else if (coll_.tp_size() == 1) {
    // o_proj: row-parallel over tp; one tp rank adds straight into the residual.
    blas_.nt(BT, D, zw, {ws_.z.get(), Dt::kBF16, zw}, {Lw.wo.get(), Dt::kBF16, zw},
             {ws_.x.get(), Dt::kF32, D}, 1.f, 1.f);
    k::add_row_bias(ws_.x.get(), BT, Di, D, Lw.o_bias.get(), s());
  } else {
    blas_.nt(BT, D, zw, {ws_.z.get(), Dt::kBF16, zw}, {Lw.wo.get(), Dt::kBF16, zw},
             {a, Dt::kF32, D});
    coll_.tp_allreduce_sum(a, static_cast<size_t>(record_ ? BT * D + B * H_ * 2 * D : BT * D));
    k::add_inplace(ws_.x.get(), a, BT * D, s());
    k::add_row_bias(ws_.x.get(), BT, Di, D, Lw.o_bias.get(), s());
  }
  if (!record_) {
    mark(l, kAttnDone);
    return;
  }
  // Heads' deltas for later targets, mean-ablation at position 0, p0_sum (after the attributions
  // above read the upstream state, as in src/cpu/backend.cpp).
  k::finish_components({hp + D, H_ * 2 * D, 2 * D, hp, H_ * 2 * D, 2 * D, false}, Bi,
                       static_cast<int>(H_), Di, Ti, abl_heads_.get() + l * H_,
                       ws_.delta.get() + ci_.head(l, 0) * D, Ctot_ * D, ws_.x.get(), T * D,
                       ws_.p0_sum.get(), s());
  // The part of the block's position-0 write that is no head's (its output bias) joins p0_sum.
  if (post_norm_)
    k::add_p0_remainder(a, Bi, Ti, Di, hp, static_cast<int>(H_), ws_.p0_sum.get(), s());
  else
    k::add_row_bias(ws_.p0_sum.get(), B, Di, D, Lw.o_bias.get(), s());
  mark(l, kAttnDone);

  const bool sinks = Lw.sinks.get() != nullptr;
  const size_t n_a0 = static_cast<size_t>(B * Hl * T), n_bh = static_cast<size_t>(B * Hl),
               n_attr = static_cast<size_t>(B * Hl * C), n_k = static_cast<size_t>(B * kw_);
  h_a0_.reserve(std::max<size_t>(n_a0 * (sinks ? 2 : 1), 1));
  h_small_.reserve(std::max<size_t>(4 * n_bh + 2 * n_k, 1));
  h_attr_.reserve(std::max<size_t>(n_attr, 1));
  float* h_wp0 = h_small_.get();
  float* h_wrest = h_wp0 + n_bh;
  float* h_a0m = h_wrest + n_bh;
  float* h_k0m = h_a0m + n_bh;
  float* h_k0s = h_k0m + n_k;
  float* h_sink_mean = sinks ? h_k0s + n_k : nullptr;
  float* h_sink = sinks ? h_a0_.get() + n_a0 : nullptr;
  if (B > 0) {
    k::row_means(ws_.a0.get(), B * Hl, static_cast<int>(nq), T, ws_.a0_mean.get(), s());
    if (sinks)
      k::row_means(ws_.sink_mass.get(), B * Hl, static_cast<int>(nq), T, ws_.sink_mean.get(), s());
    fork_copies();  // every source below is written by now
    tap_copy(h_a0_.get(), ws_.a0.get(), n_a0);
    if (sinks) {
      tap_copy(h_sink, ws_.sink_mass.get(), n_a0);
      tap_copy(h_sink_mean, ws_.sink_mean.get(), n_bh);
    }
    tap_copy(h_wp0, ws_.wp0.get(), n_bh);
    tap_copy(h_wrest, ws_.wrest.get(), n_bh);
    tap_copy(h_a0m, ws_.a0_mean.get(), n_bh);
    tap_copy(h_attr_.get(), ws_.attr.get(), n_attr);
    tap_copy(h_k0m, ws_.k0m.get(), n_k);
    tap_copy(h_k0s, ws_.k0s.get(), n_k);
  }
  const int64_t probe0 = probe0_;
  defer([this, l, B, T, D, d, Hl, C, probe0, nq, h_wp0, h_wrest, h_a0m, h_k0m, h_k0s, h_sink,
         h_sink_mean] {
    AttentionTap tap{l,
                     B,
                     T,
                     D,
                     d,
                     probe0,
                     plan_.head_begin,
                     Hl,
                     h_a0m,
                     h_a0_.get(),
                     h_wp0,
                     h_wrest,
                     h_attr_.get(),
                     C,
                     h_k0m,
                     h_k0s,
                     plan_.kv_begin,
                     KVl_};
    tap.sink_queries = nq;
    tap.sink_mass = h_sink;
    tap.sink_mass_mean = h_sink_mean;
    emit_attention_tap(*obs_, tap_source(), tap);
  });
}

void CudaBackend::expert_ffn(const DeviceLayer& Lw, const bf16_bits* X, const int32_t* x_rows,
                             int x_div, const std::vector<int>& rows,
                             const std::vector<int64_t>& offsets,
                             const std::vector<int64_t>& expert, int64_t total, bf16_bits* out) {
  if (total == 0) return;
  const int64_t I = Lw.inter, D = D_;
  ws_.act.reserve(static_cast<size_t>(total * I));
  if (sm90_experts_) {  // gather (x_rows), gate|up and SwiGLU in one product; down in another
    gemm_gu_.build(rows, offsets, expert, static_cast<int>(I), true);
    gemm_dn_.build(rows, offsets, expert, static_cast<int>(D), false);
    ws_.gemm_gu_dev.reserve(gemm_gu_.ints());
    ws_.gemm_dn_dev.reserve(gemm_dn_.ints());
    k::grouped_gemm_sm90(X, x_rows, x_div, Lw.w_gate_up.get(), ws_.act.get(), static_cast<int>(D),
                         static_cast<int>(I), true, gemm_gu_, ws_.gemm_gu_dev.get(), s());
    k::grouped_gemm_sm90(ws_.act.get(), nullptr, 1, Lw.w_down.get(), out, static_cast<int>(I),
                         static_cast<int>(D), false, gemm_dn_, ws_.gemm_dn_dev.get(), s());
    return;
  }
  if (x_rows) {  // the cuBLAS route reads packed rows
    ws_.xg.reserve(static_cast<size_t>(total * D));
    k::gather_rows(X, x_rows, x_div, total, static_cast<int>(D), ws_.xg.get(), s());
    X = ws_.xg.get();
  }
  if (!plain_experts_) {
    // Biases or another activation (gpt-oss): fp32 pre-activations and products, the biases of
    // each row's expert added on the device (the groups' first rows, sizes and experts go there
    // first). With several ep ranks the rows of another call lie between the groups: untouched.
    const size_t G = rows.size();
    std::vector<int32_t> table(3 * G);
    for (size_t g = 0; g < G; ++g) {
      table[g] = static_cast<int32_t>(offsets[g]);
      table[G + g] = rows[g];
      table[2 * G + g] = static_cast<int32_t>(expert[g]);
    }
    ws_.expert_groups.reserve(std::max<size_t>(table.size(), 1));
    to_device(ws_.expert_groups.get(), table.data(), table.size());
    const k::ExpertGroups groups{ws_.expert_groups.get(), ws_.expert_groups.get() + G,
                                 ws_.expert_groups.get() + 2 * G, static_cast<int>(G)};
    ws_.hf_experts.reserve(static_cast<size_t>(total * std::max<int64_t>(2 * I, D)));
    blas_.grouped_nt(rows, offsets, expert, 2 * I, D, X, Lw.w_gate_up.get(), ws_.hf_experts.get(),
                     Dt::kF32);
    k::expert_bias_activation(ws_.hf_experts.get(), total, static_cast<int>(I), groups, c_.act,
                              static_cast<float>(c_.swiglu_limit),
                              static_cast<float>(c_.swiglu_alpha), Lw.expert_gate_up_bias.get(),
                              ws_.act.get(), s());
    blas_.grouped_nt(rows, offsets, expert, D, I, ws_.act.get(), Lw.w_down.get(),
                     ws_.hf_experts.get(), Dt::kF32);
    k::expert_add_bias(ws_.hf_experts.get(), total, static_cast<int>(D), groups,
                       Lw.expert_down_bias.get(), out, s());
    return;
  }
  ws_.h.reserve(static_cast<size_t>(total * 2 * I));
  blas_.grouped_nt(rows, offsets, expert, 2 * I, D, X, Lw.w_gate_up.get(), ws_.h.get(), Dt::kBF16);
  k::swiglu(ws_.h.get(), total, static_cast<int>(I), ws_.act.get(), s());
  blas_.grouped_nt(rows, offsets, expert, D, I, ws_.act.get(), Lw.w_down.get(), out, Dt::kBF16);
}

const bf16_bits* CudaBackend::moe_experts(const DeviceLayer& Lw, int64_t n) {
  const int64_t D = D_, K = K_, E = E_, npairs = n * K;
  const int P = coll_.ep_size();
  if (device_routing_) {  // every expert is here, the tile lists already on the device
    const int I = static_cast<int>(Lw.inter), Di = static_cast<int>(D);
    ws_.act.reserve(static_cast<size_t>(npairs * I));
    k::grouped_gemm_sm90_device_plan(ws_.u.get(), ws_.ipack.get(), static_cast<int>(K), npairs,
                                     Lw.w_gate_up.get(), ws_.act.get(), Di, I, true,
                                     ws_.gemm_gu_dev.get(), static_cast<int>(E), s());
    // Recording: the per-expert rest sums from the down product's epilogue (RestTap), so the
    // expert outputs are not read a second time.
    k::RestTap tap;
    if (record_ && B_ > 0) {
      ws_.rest_tiles.reserve(static_cast<size_t>(
          k::rest_tap_floats(npairs, static_cast<int>(E), static_cast<int>(B_), Di)));
      tap = {ws_.pos_w.get(), ws_.pos_tok.get(), static_cast<int>(T_), static_cast<int>(B_),
             ws_.rest_tiles.get()};
    }
    k::grouped_gemm_sm90_device_plan(ws_.act.get(), nullptr, 1, npairs, Lw.w_down.get(),
                                     ws_.out.get(), I, Di, false, ws_.gemm_dn_dev.get(),
                                     static_cast<int>(E), s(), tap);
    return ws_.out.get();
  }
  if (P == 1) {  // every expert is here: the products read the routed rows straight from u
    std::vector<int64_t> widx(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) widx[static_cast<size_t>(e)] = e;
    expert_ffn(Lw, ws_.u.get(), ws_.ipack.get(), static_cast<int>(K), counts_, offsets_, widx,
               npairs, ws_.out.get());
    return ws_.out.get();
  }
  ws_.xg.reserve(static_cast<size_t>(std::max<int64_t>(npairs * D, 1)));
  k::gather_rows(ws_.u.get(), ws_.ipack.get(), static_cast<int>(K), npairs, static_cast<int>(D),
                 ws_.xg.get(), s());
  // Expert parallel, device to device. The gathered rows are expert-major and every ep rank owns a
  // contiguous range of experts, so each owner's rows are one contiguous block. The per-expert
  // counts of every source travel first (MPI, E ints per rank), so both sides know every size; the
  // rows go as bf16, the answers (bf16, as every expert output) come back in the order they were
  // sent, i.e. straight into the source order the combine and the recording read.
  const int64_t El = plan_.local_experts(), eb = plan_.expert_begin;
  std::string mine(reinterpret_cast<const char*>(counts_.data()), counts_.size() * sizeof(int));
  const std::vector<std::string> all = comms_.ep_group->allgather_bytes(mine);
  std::vector<size_t> send_rows(static_cast<size_t>(P), 0), recv_rows(static_cast<size_t>(P), 0);
  std::vector<int> grows;  // groups (source, local expert), source-major, as the rows arrive
  std::vector<int64_t> goff, gexp;
  int64_t npr = 0;
  for (int r = 0; r < P; ++r) {
    for (int64_t e = r * El; e < (r + 1) * El; ++e)
      send_rows[static_cast<size_t>(r)] += static_cast<size_t>(counts_[static_cast<size_t>(e)]);
    if (all[static_cast<size_t>(r)].size() != static_cast<size_t>(E) * sizeof(int))
      throw RuntimeFailure("expert counts of ep rank " + std::to_string(r) + " are malformed");
    for (int64_t j = 0; j < El; ++j) {
      int c = 0;
      std::memcpy(&c, all[static_cast<size_t>(r)].data() + (eb + j) * sizeof(int), sizeof(int));
      grows.push_back(c);
      goff.push_back(npr);
      gexp.push_back(j);
      npr += c;
      recv_rows[static_cast<size_t>(r)] += static_cast<size_t>(c);
    }
  }
  auto bytes = [&](const std::vector<size_t>& rows, size_t elem) {
    std::vector<size_t> b(rows.size());
    for (size_t r = 0; r < rows.size(); ++r) b[r] = rows[r] * static_cast<size_t>(D) * elem;
    return b;
  };
  ws_.xr.reserve(static_cast<size_t>(std::max<int64_t>(npr * D, 1)));
  ws_.out2.reserve(static_cast<size_t>(std::max<int64_t>(npr * D, 1)));
  // While the rows travel, this rank's own rows for its own experts (its block of the send buffer,
  // in the order they also arrive in) run from the send buffer into their place among the answers;
  // the copy of them that arrives is not read. The other sources' groups run after the exchange.
  const int me = comms_.ep_group->rank();
  int64_t send_me = 0, recv_me = 0;
  for (int r = 0; r < me; ++r) {
    send_me += static_cast<int64_t>(send_rows[static_cast<size_t>(r)]);
    recv_me += static_cast<int64_t>(recv_rows[static_cast<size_t>(r)]);
  }
  std::vector<int> own_rows, other_rows;
  std::vector<int64_t> own_off, own_exp, other_off, other_exp;
  for (size_t g = 0; g < grows.size(); ++g) {
    if (static_cast<int64_t>(g) / El == me) {
      own_rows.push_back(grows[g]);
      own_off.push_back(goff[g] - recv_me);
      own_exp.push_back(gexp[g]);
    } else {
      other_rows.push_back(grows[g]);
      other_off.push_back(goff[g]);
      other_exp.push_back(gexp[g]);
    }
  }
  coll_.ep_exchange_begin(ws_.xg.get(), bytes(send_rows, sizeof(bf16_bits)), ws_.xr.get(),
                          bytes(recv_rows, sizeof(bf16_bits)));
  expert_ffn(Lw, ws_.xg.get() + send_me * D, nullptr, 1, own_rows, own_off, own_exp,
             static_cast<int64_t>(recv_rows[static_cast<size_t>(me)]),
             ws_.out2.get() + recv_me * D);
  coll_.ep_exchange_end();
  expert_ffn(Lw, ws_.xr.get(), nullptr, 1, other_rows, other_off, other_exp, npr, ws_.out2.get());
  coll_.ep_alltoallv(ws_.out2.get(), bytes(recv_rows, sizeof(bf16_bits)), ws_.out.get(),
                     bytes(send_rows, sizeof(bf16_bits)));
  return ws_.out.get();
}

void CudaBackend::shared_expert(const DeviceLayer& Lw, int64_t n, int64_t s0, int64_t s1, float* m,
                                float* p0, float* n0, float* rest) {
  const int64_t D = D_, T = T_, B = B_, S = S_, I = Lw.shared_inter;
  const int Di = static_cast<int>(D);
  if (n > 0) {
    ws_.h.reserve(static_cast<size_t>(n * 2 * I));
    ws_.act.reserve(static_cast<size_t>(n * I));
    blas_.nt(n, 2 * I, D, {ws_.u.get(), Dt::kBF16, D}, {Lw.shared_gate_up.get(), Dt::kBF16, D},
             {ws_.h.get(), Dt::kBF16, 2 * I});
    k::swiglu(ws_.h.get(), n, static_cast<int>(I), ws_.act.get(), s());
    blas_.nt(n, D, I, {ws_.act.get(), Dt::kBF16, I}, {Lw.shared_down.get(), Dt::kBF16, I},
             {ws_.shared_out.get(), Dt::kF32, D});
    if (Lw.shared_gate.get())  // Qwen2-MoE's sigmoid gate; DeepSeek's shared experts have none
      k::sigmoid_gate_rows(ws_.shared_out.get(), ws_.u32.get(), n, Di, Lw.shared_gate.get(), s());
    k::add_inplace(m + s0 * D, ws_.shared_out.get(), n * D, s());
  }
  if (!record_) return;
  // Its slot is E: segments (begin, end, out) of the slice's rows per probe, then (row, out) items.
  std::vector<int32_t> segs, items;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t out = static_cast<int32_t>(b * S + E_);
    const int64_t r0 = std::max(s0, b * T + 1), r1 = std::min(s1, (b + 1) * T);
    if (r0 < r1)
      segs.insert(segs.end(), {static_cast<int32_t>(r0 - s0), static_cast<int32_t>(r1 - s0), out});
    if (b * T >= s0 && b * T < s1)
      items.insert(items.end(), {static_cast<int32_t>(b * T - s0), out});
  }
  std::vector<int32_t> pack(segs);
  pack.insert(pack.end(), items.begin(), items.end());
  to_device(ws_.shared_pack.get(), pack.data(), pack.size());
  k::segment_sums(ws_.shared_out.get(), nullptr, nullptr, s0, ws_.shared_pack.get(),
                  static_cast<int>(segs.size() / 3), Di, static_cast<int>(T), rest, s());
  k::p0_rows(ws_.shared_out.get(), nullptr, ws_.shared_pack.get() + segs.size(),
             static_cast<int>(items.size() / 2), Di, p0, n0, s());
}

void CudaBackend::mlp_block(const PlannedLayer& layer) {
  const int64_t l = layer.layer;
  const DeviceLayer& Lw = w_.layers[static_cast<size_t>(l)];
  const int64_t B = B_, T = T_, BT = BT_, D = D_, K = K_, S = S_;
  const bool moe = Lw.moe;
  const bool shared = moe && shared_;
  const int64_t E = moe ? E_ : 0, E1 = std::max<int64_t>(E_, 1),
                nslots = moe ? E_ + (shared ? 1 : 0) : 1;
  const int Di = static_cast<int>(D), Ti = static_cast<int>(T);
  const int tp = coll_.tp_size(), tr = coll_.tp_rank();
  const int64_t s0 = BT * tr / tp, s1 = BT * (tr + 1) / tp, n = s1 - s0;

  // One buffer summed over the tp group, laid out as src/cpu/backend.cpp's: m [BT, D], p0 writes
  // and rest sums [B, S, D] each, p0 norms [B, S], p0 routing [B, E], rest routing counts [E].
  const int64_t off_p0 = BT * D, off_rest = off_p0 + B * S * D, off_n0 = off_rest + B * S * D,
                off_r0 = off_n0 + B * S, off_rc = off_r0 + B * E1, total = off_rc + E1;
  // On one tp rank the products below write every row of m; several sum rows they do not own.
  const int64_t zero_from = tp == 1 ? off_p0 : 0, zero_to = record_ ? total : off_p0;
  if (zero_to > zero_from)
    CUDA_CHECK(cudaMemsetAsync(ws_.mbuf.get() + zero_from, 0,
                               static_cast<size_t>(zero_to - zero_from) * sizeof(float), s()));
  float* m = ws_.mbuf.get();
  // On one tp rank with nothing else to add to the routed experts' sum (no shared expert, no output
  // norm), the combine adds it to the residual itself: m is neither written nor read back.
  const bool add_combined = moe && tp == 1 && !shared && !post_norm_;
  // That pass holds each new row whole: it forms the next layer's attention input norm too
  // (RMSNorm, read by that layer alone: one ep rank, no parallel residual).
  k::NextNorm next;
  if (add_combined && norm_mode_ == k::NormMode::kRms && !parallel_ && coll_.ep_size() == 1 &&
      l + 1 < L_ && w_.layers[static_cast<size_t>(l + 1)].input_norm.get()) {
    next.gamma = w_.layers[static_cast<size_t>(l + 1)].input_norm.get();
    next.eps = eps_;
    next.u = ws_.u.get();
    next.inv = ws_.inv_rx.get();
  }
  float* p0 = m + off_p0;
  float* rest = m + off_rest;
  float* n0 = m + off_n0;

  // The MLP reads the residual after this layer's attention, or before it (parallel residual).
  const float* in = parallel_ ? ws_.xpar.get() : ws_.x.get();
  // A bf16 router (router_split) takes u's fp32 value as u + [mid | lo]: the fp32 product on the
  // tensor cores (exact bf16 products, fp32 sums); else u32 on the CUDA cores. The shared expert's
  // gate reads u32.
  const bool split_router = moe && Lw.router_split.get() != nullptr;
  const bool want_u32 = moe && (!split_router || (shared && Lw.shared_gate.get()));
  k::norm_rows(norm_mode_, in + s0 * D, n, Di, Lw.post_norm.get(), Lw.post_norm_bias.get(), eps_,
               ws_.u.get(), want_u32 ? ws_.u32.get() : nullptr,
               split_router ? ws_.u_split.get() : nullptr, nullptr, s());

  if (moe) {
    const int64_t npairs = n * K;
    if (split_router) {
      blas_.nt(n, E, D, {ws_.u.get(), Dt::kBF16, D}, {Lw.router_split.get(), Dt::kBF16, 2 * D},
               {ws_.router_logits.get(), Dt::kF32, E});
      blas_.nt(n, E, 2 * D, {ws_.u_split.get(), Dt::kBF16, 2 * D},
               {Lw.router_split.get(), Dt::kBF16, 2 * D}, {ws_.router_logits.get(), Dt::kF32, E},
               1.f, 1.f);
    } else {
      blas_.nt(n, E, D, {ws_.u32.get(), Dt::kF32, D}, {Lw.router.get(), Dt::kF32, D},
               {ws_.router_logits.get(), Dt::kF32, E});
    }
    k::add_row_bias(ws_.router_logits.get(), n, static_cast<int>(E), E, Lw.router_bias.get(), s());
    if (c_.router == RouterKind::kSigmoidGroupTopK)
      k::router_sigmoid_groups(ws_.router_logits.get(), n, static_cast<int>(E), static_cast<int>(K),
                               static_cast<int>(c_.n_group), static_cast<int>(c_.topk_group),
                               Lw.router_score_bias.get(), c_.norm_topk_prob,
                               static_cast<float>(c_.routed_scaling_factor), ws_.ids.get(),
                               ws_.tw.get(), ws_.gap.get(), s());
    else
      k::router_topk(ws_.router_logits.get(), n, static_cast<int>(E), static_cast<int>(K),
                     renormalise_topk_, ws_.ids.get(), ws_.tw.get(), ws_.gap.get(), s());
    // The routing bookkeeping on the device: a histogram of the pairs per expert and a stable
    // counting sort that puts the pairs in source order: by expert, then by token. The Hopper
    // expert kernel on one ep rank takes its tile lists built on the device from the counts, so
    // the host only checks them (every pair routed: NaN logits pick no expert; the near-ties)
    // when they arrive, behind the device. The cuBLAS route's grouped product takes host sizes,
    // and the ep exchange its block sizes: there the host waits for the counts.
    k::expert_histogram(ws_.ids.get(), npairs, static_cast<int>(E), ws_.gap.get(), n,
                        ws_.cnt_dev.get(), s());
    device_routing_ = sm90_experts_ && coll_.ep_size() == 1;
    if (device_routing_) {
      const int Ii = static_cast<int>(Lw.inter);
      ws_.gemm_gu_dev.reserve(static_cast<size_t>(
          k::grouped_gemm_device_plan_ints(npairs, static_cast<int>(E), Ii, true)));
      ws_.gemm_dn_dev.reserve(static_cast<size_t>(
          k::grouped_gemm_device_plan_ints(npairs, static_cast<int>(E), Di, false)));
      ws_.tile_base.reserve(static_cast<size_t>(E));
      k::grouped_gemm_device_plan(ws_.cnt_dev.get(), static_cast<int>(E), Ii, true,
                                  ws_.off_dev.get(), nullptr, ws_.gemm_gu_dev.get(), s());
      k::grouped_gemm_device_plan(ws_.cnt_dev.get(), static_cast<int>(E), Di, false, nullptr,
                                  ws_.tile_base.get(), ws_.gemm_dn_dev.get(), s());
      // Pairs that NaN logits leave unplaced read row 0 until the host reports the router.
      CUDA_CHECK(cudaMemsetAsync(ws_.ipack.get(), 0,
                                 static_cast<size_t>(2 * npairs) * sizeof(int32_t), s()));
      h_cnt_.reserve(static_cast<size_t>(L_ * (E + 1)));
      int32_t* hc = h_cnt_.get() + l * (E + 1);
      tap_to_host(hc, ws_.cnt_dev.get(), static_cast<size_t>(E + 1));
      flush_deferred(1);  // the taps before this layer's attention, while the device routes
      defer([this, l, hc, E, npairs] {
        int64_t assigned = 0;
        for (int64_t e = 0; e < E; ++e) assigned += hc[e];
        if (assigned != npairs) non_finite(l, "router", probe0_);  // earlier taps ran first
        near_ties_[static_cast<size_t>(l)] += hc[E];
      });
    } else {
      h_cnt_.reserve(static_cast<size_t>(E + 1));
      to_host(h_cnt_.get(), ws_.cnt_dev.get(), static_cast<size_t>(E + 1));
      flush_deferred(1);  // the taps before this layer's attention, while the device routes
      sync();
      int64_t assigned = 0;
      counts_.assign(static_cast<size_t>(E), 0);
      offsets_.assign(static_cast<size_t>(E), 0);
      std::vector<int32_t> off32(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) {
        counts_[static_cast<size_t>(e)] = h_cnt_[static_cast<size_t>(e)];
        offsets_[static_cast<size_t>(e)] = assigned;
        off32[static_cast<size_t>(e)] = static_cast<int32_t>(assigned);
        assigned += h_cnt_[static_cast<size_t>(e)];
      }
      if (assigned != npairs) {  // NaN logits pick no expert
        flush_deferred(0);       // an earlier tap may name the first non-finite component
        non_finite(l, "router", probe0_);
      }
      near_ties_[static_cast<size_t>(l)] += h_cnt_[static_cast<size_t>(E)];
      to_device(ws_.off_dev.get(), off32.data(), off32.size());
    }
    routed_ += n;
    k::expert_rank(ws_.ids.get(), npairs, static_cast<int>(E), ws_.off_dev.get(),
                   ws_.sort_scratch.get(), ws_.ipack.get(), ws_.ipack.get() + npairs, s());
    k::pair_info(ws_.ipack.get(), ws_.tw.get(), npairs, static_cast<int>(K), s0, ws_.pos_w.get(),
                 ws_.pos_tok.get(), s());
    mark(l, kRouted);

    const bf16_bits* back = moe_experts(Lw, n);
    mark(l, kExpertsDone);
    if (add_combined) {
      // Straight into the residual, the norms of the MLP and residual taps from the same pass; a
      // probe's position-0 rows wait in m for the recording's ablation.
      k::combine_add(back, ws_.ipack.get() + npairs, ws_.tw.get(), n, static_cast<int>(K), Di, Ti,
                     ws_.x.get(), record_ ? m : nullptr, record_ ? ws_.norms.get() : nullptr,
                     record_ ? ws_.rnorms.get() : nullptr, next, s());
    } else {
      k::combine(back, ws_.ipack.get() + npairs, ws_.tw.get(), n, static_cast<int>(K), Di,
                 m + s0 * D, s());
    }
    mark(l, kCombineDone);
    if (record_) {
      if (device_routing_)
        k::expert_rest_sums_from_tiles(ws_.rest_tiles.get(), ws_.pos_tok.get(), ws_.off_dev.get(),
                                       ws_.cnt_dev.get(), ws_.tile_base.get(), static_cast<int>(E),
                                       static_cast<int>(B), Ti, static_cast<int>(S), Di, rest, s());
      else
        k::expert_rest_sums(back, ws_.pos_w.get(), ws_.pos_tok.get(), ws_.off_dev.get(),
                            ws_.cnt_dev.get(), static_cast<int>(E), static_cast<int>(B), Ti,
                            static_cast<int>(S), Di, npairs, ws_.rest_scratch.get(), rest, s());
      k::expert_p0_and_counts(back, ws_.pos_w.get(), ws_.ids.get(), ws_.ipack.get() + npairs,
                              ws_.cnt_dev.get(), static_cast<int>(B), Ti, static_cast<int>(K),
                              static_cast<int>(E), s0, s1, static_cast<int>(S), Di, p0, n0,
                              m + off_r0, m + off_rc, s());
    }
    if (shared) shared_expert(Lw, n, s0, s1, m, p0, n0, rest);
  } else {
    const int64_t I = Lw.inter;
    flush_deferred(1);
    mark(l, kRouted);
    if (n > 0) {
      ws_.act.reserve(static_cast<size_t>(n * I));
      if (c_.gated_mlp && c_.act == Activation::kSilu && !Lw.mlp_bias.get()) {
        ws_.h.reserve(static_cast<size_t>(n * 2 * I));
        blas_.nt(n, 2 * I, D, {ws_.u.get(), Dt::kBF16, D}, {Lw.w_gate_up.get(), Dt::kBF16, D},
                 {ws_.h.get(), Dt::kBF16, 2 * I});
        k::swiglu(ws_.h.get(), n, static_cast<int>(I), ws_.act.get(), s());
      } else {  // biases or another activation: fp32 pre-activations
        const int64_t width = (c_.gated_mlp ? 2 : 1) * I;
        blas_.nt(n, width, D, {ws_.u.get(), Dt::kBF16, D}, {Lw.w_gate_up.get(), Dt::kBF16, D},
                 {ws_.hf.get(), Dt::kF32, width});
        k::bias_activation(ws_.hf.get(), n, static_cast<int>(I), c_.gated_mlp, c_.act,
                           Lw.mlp_bias.get(), ws_.act.get(), s());
      }
      blas_.nt(n, D, I, {ws_.act.get(), Dt::kBF16, I}, {Lw.w_down.get(), Dt::kBF16, I},
               {m + s0 * D, Dt::kF32, D});
      k::add_row_bias(m + s0 * D, n, Di, D, Lw.down_bias.get(), s());
      // Post-norm blocks write the MLP output normed: m * gain / rms(m) per position.
      if (post_norm_)
        k::post_norm_rows(m + s0 * D, n, Di, Lw.mlp_out_norm.get(), eps_, nullptr, s());
    }
    mark(l, kExpertsDone);
    mark(l, kCombineDone);
    if (record_) {
      std::vector<int32_t> segs, items;  // (begin, end, out) and (row, out) of this block's rows
      for (int64_t b = 0; b < B; ++b) {
        const int64_t r0 = std::max(s0, b * T + 1), r1 = std::min(s1, (b + 1) * T);
        if (r0 < r1)
          segs.insert(segs.end(), {static_cast<int32_t>(r0 - s0), static_cast<int32_t>(r1 - s0),
                                   static_cast<int32_t>(b * S)});
        if (b * T >= s0 && b * T < s1)
          items.insert(items.end(),
                       {static_cast<int32_t>(b * T - s0), static_cast<int32_t>(b * S)});
      }
      std::vector<int32_t> pack(segs);
      pack.insert(pack.end(), items.begin(), items.end());
      to_device(ws_.ipack.get(), pack.data(), pack.size());
      k::segment_sums(m + s0 * D, nullptr, nullptr, s0, ws_.ipack.get(),
                      static_cast<int>(segs.size() / 3), Di, Ti, rest, s());
      k::p0_rows(m + s0 * D, nullptr, ws_.ipack.get() + segs.size(),
                 static_cast<int>(items.size() / 2), Di, p0, n0, s());
    }
  }
  mark(l, kMoeRecDone);
  flush_deferred(0);  // this layer's attention tap, while the device runs the experts
  coll_.tp_allreduce_sum(ws_.mbuf.get(), static_cast<size_t>(record_ ? total : BT * D));

  if (record_) {
    k::finish_components({p0, S * D, D, rest, S * D, D, true}, static_cast<int>(B),
                         static_cast<int>(nslots), Di, Ti, abl_slots_.get() + l * S,
                         ws_.delta.get() + ci_.expert(l, 0) * D, Ctot_ * D, m, T * D,
                         ws_.p0_sum.get(), s());
    // x += m with ||m|| (this tap) and ||x|| (the residual tap that follows) in one pass: every
    // row, or only the position-0 rows the combine left in m.
    if (add_combined) {
      k::add_rows_norms(ws_.x.get(), m, B, Di, ws_.norms.get(), ws_.rnorms.get(), s(), T);
      if (next.gamma)
        k::norm_rows(k::NormMode::kRms, ws_.x.get(), B, Di, next.gamma, nullptr, eps_, next.u,
                     nullptr, nullptr, next.inv, s(), T);
    } else {
      k::add_rows_norms(ws_.x.get(), m, BT, Di, ws_.norms.get(), ws_.rnorms.get(), s());
    }
    x_norms_ready_ = true;
  } else if (!add_combined) {
    k::add_inplace(ws_.x.get(), m, BT * D, s());
  }
  if (next.gamma) u_ready_for_ = l + 1;
  mark(l, kMoeDone);
  if (!record_) return;

  h_mnorms_.reserve(static_cast<size_t>(std::max<int64_t>(BT, 1)));
  h_mlp_.reserve(static_cast<size_t>(B * S + B * E1 + E1));
  float* h_n0 = h_mlp_.get();
  float* h_r0 = h_n0 + B * S;
  float* h_rc = h_r0 + B * E1;
  tap_to_host(h_mnorms_.get(), ws_.norms.get(), static_cast<size_t>(BT));
  tap_copy(h_n0, n0, static_cast<size_t>(B * S + B * E1 + E1));  // n0, r0, rc are adjacent
  defer([this, &layer, h_n0, h_r0, h_rc] {
    emit_mlp_tap(*obs_, tap_source(), layers_, layer, h_mnorms_.get(), h_n0, h_r0, h_rc);
  });
}

CudaBackend& cuda_of(Backend& b) {
  auto* p = dynamic_cast<CudaBackend*>(&b);
  if (!p) throw RuntimeFailure("not a CUDA backend: " + b.name());
  return *p;
}
const CudaBackend& cuda_of(const Backend& b) {
  auto* p = dynamic_cast<const CudaBackend*>(&b);
  if (!p) throw RuntimeFailure("not a CUDA backend: " + b.name());
  return *p;
}

}  // namespace

void set_recording(Backend& backend, bool record) { cuda_of(backend).set_record(record); }
void set_phase_timing(Backend& backend, bool on) { cuda_of(backend).set_timing(on); }
RunProfile last_run_profile(const Backend& backend) { return cuda_of(backend).profile(); }
MemoryReport memory_report(const Backend& backend) { return cuda_of(backend).memory(); }
std::vector<int64_t> near_tie_counts(const Backend& backend) {
  return cuda_of(backend).near_ties();
}
int64_t routed_tokens(const Backend& backend) { return cuda_of(backend).routed(); }
std::string expert_gemm_strategy(const Backend& backend) {
  return cuda_of(backend).expert_strategy();
}

}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(const Checkpoint& ckpt, const ShardPlan& plan,
                                           ForwardComms comms, ForwardOptions options) {
  return std::make_unique<cuda::CudaBackend>(&ckpt, ckpt.config(), plan, comms, std::move(options),
                                             std::nullopt);
}

std::unique_ptr<Backend> make_cuda_backend_synthetic(const ModelConfig& cfg, const ShardPlan& plan,
                                                     ForwardComms comms, ForwardOptions options,
                                                     uint64_t seed) {
  return std::make_unique<cuda::CudaBackend>(nullptr, cfg, plan, comms, std::move(options), seed);
}

void check_cuda_supports(const ModelConfig& c) {
  std::string missing;
  auto need = [&](bool ok, const char* what) {
    if (!ok) missing += (missing.empty() ? "" : ", ") + std::string(what);
  };
  // Every family of docs/families.md runs; what is refused here is what the kernels do not have.
  need(!(c.block == BlockKind::kPostNorm && c.num_experts > 0), "post-norm MoE blocks");
  need(c.act == Activation::kSilu || c.act == Activation::kSwigluClamped || !c.gated_mlp,
       "gated MLPs with an activation other than SiLU");
  need(c.act != Activation::kSwigluClamped || !c.any_dense_layer(),
       "the clamped SwiGLU in dense MLPs");
  need(!(c.num_experts > 0 && c.mlp_bias), "expert biases outside gpt-oss's layout");
  need(!c.mla() || c.mla_kv_rank + c.qk_rope_dim <= 4096, "a latent wider than 4096");
  if (!missing.empty())
    throw InputError("--device cuda: the cuda backend does not run " + c.model_type +
                     " models yet (" + missing + "); use --device cpu");
}

BackendEntry cuda_backend_entry() {
  BackendEntry e;
  e.name = "cuda";
  e.summary = "NVIDIA GPUs (bf16 products, fp32 statistics), one rank per GPU, NCCL";
  e.check = [](const ModelConfig& c, const ShardPlan& plan, bool) {
    check_cuda_supports(c);
    if (plan.etp != 1)
      throw InputError("--etp " + std::to_string(plan.etp) +
                       ": the cuda backend supports etp=1 only");
  };
  e.make = [](const BackendInputs& in) -> std::unique_ptr<Backend> {
    if (in.ckpt) return make_cuda_backend(*in.ckpt, *in.plan, in.comms, in.options);
    return make_cuda_backend_synthetic(*in.cfg, *in.plan, in.comms, in.options,
                                       static_cast<uint64_t>(in.synthetic_seed));
  };
  e.calibrate = [](int, const std::string& dir, const Comm& world) {
    return calibrate_cuda(dir, world);
  };
  e.prepare = [](int local_rank) { return cuda::prepare_device(local_rank); };
  return e;
}

}  // namespace sinkscope
