// CPU backend: the instrumented forward pass of every supported family on one rank's shard
// (docs/parallel-layout.md), fp32 with OpenBLAS sgemm. It is the reference the CUDA backend is
// checked against.
//
// Per layer and micro-batch:
//   attention  heads of this rank; per (probe, head) the T x T causal softmax in fp32, A[i, 0]
//              kept, z = A V; each head's write w = z W_O[:, h]^T computed on its own (so its
//              norms and position-0 vector are exact) and summed into the o_proj partial sum,
//              which is all-reduced over the tp group. Post-norm families scale every head's
//              write by the layer's output norm (gamma / rms of the summed output, per position).
//   circuit    the rank that owns a target head computes its attributions from the position-0
//              deltas of every upstream component (gathered over the tp group per layer).
//   MLP / MoE  each tp rank routes a 1/tp slice of its dp group's tokens, sends (token, expert)
//              pairs to the expert owners of its ep group (all-to-all with counts), gets the
//              expert outputs back per pair, and the slices are summed over the tp group.
// The block wiring (pre-norm, post-norm, parallel residual) follows the family.
#include <omp.h>
#if __has_include(<malloc.h>)
#include <malloc.h>
#endif
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <span>

#include "checkpoint/omp_threads.hpp"
#include "cpu/kernels.hpp"
#include "cpu/mla.hpp"
#include "cpu/sink_kernels.hpp"
#include "cpu/weights.hpp"
#include "model/layer_plan.hpp"
#include "model/median.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"
#include "sinkscope/model.hpp"
#include "sinkscope/plan.hpp"

namespace sinkscope {
namespace {

using cpu::gemm_nn;
using cpu::gemm_nt;

// Adds the time of its scope to a counter (the communication share of a run).
class ScopedSeconds {
 public:
  explicit ScopedSeconds(double* acc) : acc_(acc), start_(std::chrono::steady_clock::now()) {}
  ~ScopedSeconds() {
    *acc_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }
  ScopedSeconds(const ScopedSeconds&) = delete;
  ScopedSeconds& operator=(const ScopedSeconds&) = delete;

 private:
  double* acc_;
  std::chrono::steady_clock::time_point start_;
};

// The forward's per-layer temporaries are tens of MB each. glibc serves blocks that large with mmap
// and gives them back on free, so every layer paid a page fault per 4 KiB page it touched again
// (bench/bench_cpu.cpp: 7.5 s against 3.4 s, 26% against 58% of the sgemm rate). Keeping freed
// memory in the heap makes the next layer's temporaries reuse it; the process's peak is unchanged
// (it holds the same blocks at once), only not returned between layers.
void keep_freed_memory() {
#ifdef M_MMAP_THRESHOLD
  static const bool done = [] {
    mallopt(M_MMAP_THRESHOLD, 512 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    return true;
  }();
  (void)done;
#endif
}

void add_bias(float* x, int64_t rows, int64_t n, int64_t ld, std::span<const float> bias) {
  if (bias.empty()) return;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) x[r * ld + j] += bias[static_cast<size_t>(j)];
}

class CpuBackend final : public Backend, private LayerOps {
 public:
  explicit CpuBackend(const BackendInputs& in)
      : ck_(*in.ckpt), c_(in.ckpt->config()), plan_(*in.plan), comms_(in.comms), opt_(in.options) {
    keep_freed_memory();
    ck_.set_read_threads(load_threads(opt_.threads));  // the load converts on every thread
    const uint64_t before = ck_.weight_bytes_read();
    const auto load_start = std::chrono::steady_clock::now();
    w_ = load_weights(ck_, plan_, opt_.want_logits, opt_.load_progress);
    load_seconds_ =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
    bytes_loaded_ = ck_.weight_bytes_read() - before;
    inv_freq_ = c_.rope.inv_freq(c_.head_dim);
    embed_name_ = tensor_name(c_, Role::kEmbed);
    layers_ = make_layer_plan(c_, opt_.ablations, comms_.world->rank());
  }

  std::string name() const override { return "cpu"; }
  uint64_t weight_bytes_loaded() const override { return bytes_loaded_; }
  double weight_load_seconds() const override { return load_seconds_; }
  double communication_seconds() const override { return comm_seconds_; }
  void set_ablations(std::vector<Ablation> ablations) override {
    opt_.ablations = std::move(ablations);
    layers_ = make_layer_plan(c_, opt_.ablations, comms_.world->rank());
  }

  FloatArray run(const IntArray& tokens, int64_t probe0, ForwardObserver& obs) override;

 private:
  // The operations at the layer plan's hook points (model/layer_plan.hpp), on the micro-batch in
  // x_ [B, T, D]. embed: x_ = the embeddings, with the embedding's position-0 bookkeeping.
  void embed(const IntArray& tokens) override;
  void residual(int64_t index) override;
  // The attention block reading x_; a_ = its write (ablations applied), complete for the dp group,
  // added to x_ unless the block is parallel (then the MLP adds it).
  void attention(const PlannedLayer& layer) override;
  // The MLP / MoE block reading x_ (the layer's input in a parallel block); m = its write, added to
  // x_ (with a_ in a parallel block).
  void mlp(const PlannedLayer& layer) override;
  // u = norm(x) per row; inv_scale[r] = 1 / rms (RMSNorm) or 1 / std (LayerNorm).
  void normalize(const NormWeights& n, const float* x, int64_t rows, float* u,
                 float* inv_scale) const;
  TapSource tap_source() const { return {B_, T_, c_.hidden_size, probe0_, ck_.dir(), ""}; }
  // Expert-parallel MoE on this rank's token slice: returns per (slice row, k) expert ids and
  // the weighted expert outputs [n * K, D].
  void moe_slice(const LayerWeights& L, const float* u, int64_t n, std::vector<int32_t>& topk,
                 std::vector<float>& outs) const;
  // score_bias: DeepSeek's selection-only bias (sigmoid group routing; empty otherwise).
  void route(const float* logits, int64_t n, int32_t* topk, float* weight,
             std::span<const float> score_bias) const;
  void run_mlp(const MlpWeights& m, const float* u, int64_t n, float* out) const;
  // Sums of squares of a query/key row over the full projection width (all heads of the dp
  // group), for the full-width q/k norm: [rows] each.
  void full_width_sumsq(const std::vector<float>& q, const std::vector<float>& k, int64_t rows,
                        std::vector<double>& q_ss, std::vector<double>& k_ss);

  const Checkpoint& ck_;
  const ModelConfig& c_;
  ShardPlan plan_;
  ForwardComms comms_;
  ForwardOptions opt_;
  ModelWeights w_;
  uint64_t bytes_loaded_ = 0;
  double load_seconds_ = 0;
  std::vector<double> inv_freq_;
  std::string embed_name_;
  LayerPlan layers_;
  // The micro-batch of the current run: its shape, the observer, the residual stream and the
  // attention's write.
  int64_t B_ = 0, T_ = 0, probe0_ = 0;
  ForwardObserver* obs_ = nullptr;
  std::vector<float> x_, a_;
  mutable double comm_seconds_ = 0;  // time inside collectives (all-reduces, the expert exchange)
  // Per micro-batch circuit state: position-0 delta (c[0] - cbar) of every component slot, and
  // the running sum of the residual's position-0 writes (for the identity check).
  std::vector<float> delta_;   // [B, C, D]
  std::vector<float> p0_sum_;  // [B, D]
};

void CpuBackend::embed(const IntArray& tokens) {
  const int64_t B = B_, T = T_, D = c_.hidden_size, Ctot = layers_.components;
  x_.assign(static_cast<size_t>(B * T * D), 0.f);
  for (size_t i = 0; i < tokens.data.size(); ++i)
    ck_.read_row(embed_name_, tokens.data[i], x_.data() + static_cast<int64_t>(i) * D);
  delta_.assign(static_cast<size_t>(B * Ctot * D), 0.f);
  p0_sum_.assign(static_cast<size_t>(B * D), 0.f);
  for (int64_t b = 0; b < B; ++b) {
    float* xb = x_.data() + b * T * D;
    float* delta = delta_.data() + (b * Ctot + layers_.embed_component) * D;
    for (int64_t i = 1; i < T; ++i)
      for (int64_t j = 0; j < D; ++j) delta[j] += xb[i * D + j];
    for (int64_t j = 0; j < D; ++j) {
      delta[j] = xb[j] - delta[j] / static_cast<float>(T - 1);
      if (layers_.embed_ablated) xb[j] -= delta[j];
      p0_sum_[b * D + j] = xb[j];
    }
  }
}

void CpuBackend::normalize(const NormWeights& n, const float* x, int64_t rows, float* u,
                           float* inv_scale) const {
  const int64_t D = c_.hidden_size;
  if (c_.norm == NormKind::kLayer)
    cpu::layer_norm(x, rows, D, n.gain.data(), n.bias.empty() ? nullptr : n.bias.data(),
                    c_.rms_norm_eps, u, inv_scale);
  else
    cpu::rms_norm(x, rows, D, n.gain.data(), c_.rms_norm_eps, u, inv_scale);
}

void CpuBackend::residual(int64_t index) {
  const int64_t B = B_, T = T_, D = c_.hidden_size;
  std::vector<float> x0(static_cast<size_t>(B * D)), norms(static_cast<size_t>(B * T));
  float abs_median = std::nanf("");
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x_.data() + b * T * D;
    std::copy(xb, xb + D, x0.begin() + b * D);
    for (int64_t i = 0; i < T; ++i) norms[b * T + i] = cpu::l2_norm(xb + i * D, D);
    if (probe0_ + b == 0) {  // Sun et al.'s criterion is counted on probe 0 only
      std::vector<float> mags(xb, xb + T * D);
      for (auto& m : mags) m = std::fabs(m);
      abs_median = static_cast<float>(median_of(mags));
    }
  }
  emit_residual_tap(*obs_, tap_source(), index, x0.data(), norms.data(), abs_median);
}

void CpuBackend::full_width_sumsq(const std::vector<float>& q, const std::vector<float>& k,
                                  int64_t rows, std::vector<double>& q_ss,
                                  std::vector<double>& k_ss) {
  const int64_t d = c_.head_dim, Hl = plan_.local_heads(), KVl = plan_.local_kv_heads();
  const int64_t qw = Hl * d, kw = KVl * d, group = c_.kv_group_size();
  const int tp_rank = comms_.tp_group->rank();
  // A KV head held by several tp ranks (tp > num_kv_heads) is counted by the rank that owns its
  // first query head only.
  std::vector<char> counts(static_cast<size_t>(KVl));
  for (int64_t g = 0; g < KVl; ++g)
    counts[g] = ((plan_.kv_begin + g) * group) / (c_.num_heads / plan_.tp) == tp_rank;
  std::vector<double> buf(static_cast<size_t>(2 * rows), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double sq = 0, sk = 0;
    for (int64_t j = 0; j < qw; ++j) sq += static_cast<double>(q[r * qw + j]) * q[r * qw + j];
    for (int64_t g = 0; g < KVl; ++g)
      if (counts[g])
        for (int64_t j = 0; j < d; ++j) {
          const double v = k[r * kw + g * d + j];
          sk += v * v;
        }
    buf[r] = sq;
    buf[rows + r] = sk;
  }
  if (comms_.tp_group->size() > 1) {
    ScopedSeconds timed(&comm_seconds_);
    comms_.tp_group->allreduce_sum(buf.data(), buf.size());
  }
  q_ss.assign(buf.begin(), buf.begin() + rows);
  k_ss.assign(buf.begin() + rows, buf.end());
}

void CpuBackend::attention(const PlannedLayer& layer) {
  const int64_t l = layer.layer, B = B_, T = T_;
  const std::vector<float>& x = x_;
  std::vector<float>& a = a_;
  const LayerWeights& L = w_.layers[static_cast<size_t>(l)];
  const int64_t D = c_.hidden_size, d = c_.head_dim, Hl = plan_.local_heads(),
                KVl = plan_.local_kv_heads();
  const int64_t BT = B * T, qw = Hl * d, kw = KVl * d, H = c_.num_heads;
  const int64_t group = c_.kv_group_size(), rot = c_.rope.rotated(c_.head_dim);
  // Value width (v_head_dim under multi-head latent attention, else head_dim).
  const int64_t dv = c_.value_dim(), vw = KVl * dv, zw = Hl * dv;
  const bool mla = c_.mla();
  const double eps = c_.rms_norm_eps;
  const float scale = static_cast<float>(
      c_.softmax_scale > 0 ? c_.softmax_scale : 1.0 / std::sqrt(static_cast<double>(d)));
  const bool post_norm = c_.block == BlockKind::kPostNorm;
  const bool layer_norm = c_.norm == NormKind::kLayer;
  const int tp = comms_.tp_group->size();

  // The attention's input: the normed residual (pre-norm, parallel) or the residual itself.
  std::vector<float> u(static_cast<size_t>(BT * D)), inv_rx(static_cast<size_t>(BT), 1.f);
  if (post_norm)
    std::copy(x.begin(), x.end(), u.begin());
  else
    normalize(L.attn_norm, x.data(), BT, u.data(), inv_rx.data());
  std::vector<float> q(static_cast<size_t>(BT * qw)), k(static_cast<size_t>(BT * kw)),
      v(static_cast<size_t>(BT * vw));
  std::vector<float> inv_rl;  // multi-head latent attention: 1 / rms of the latent at position 0
  std::vector<float> k0_model(static_cast<size_t>(B * kw));
  std::vector<float> inv_rk(static_cast<size_t>(B * KVl), 1.f);
  std::vector<float> unit_gain(static_cast<size_t>(kw), 1.f);
  const float* kgain = unit_gain.data();  // [KVl * d]: the gain of each held key dimension
  std::vector<float> kgain_tiled;
  if (mla) {
    cpu::mla_project(c_, L, u.data(), B, T, Hl, inv_freq_.data(), q, k, v, inv_rl, k0_model);
  } else {
    gemm_nt(BT, qw, D, u.data(), D, L.q.data(), D, q.data(), qw);
    gemm_nt(BT, kw, D, u.data(), D, L.k.data(), D, k.data(), kw);
    gemm_nt(BT, kw, D, u.data(), D, L.v.data(), D, v.data(), kw);
    add_bias(q.data(), BT, qw, qw, L.q_bias);
    add_bias(k.data(), BT, kw, kw, L.k_bias);
    add_bias(v.data(), BT, kw, kw, L.v_bias);

    // q/k norms. inv_rk: 1 / r_k, the scale of head g's key at position 0 (docs/metrics.md
    // section 4); kgain(g, j): the k norm's gain of dimension j of held KV head g.
    if (c_.qk_norm == QkNormKind::kPerHead) {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t g = 0; g < KVl; ++g) {
          float tmp[1];
          std::vector<float> scratch(static_cast<size_t>(d));
          cpu::rms_norm(k.data() + b * T * kw + g * d, 1, d, L.k_norm.data(), eps, scratch.data(),
                        tmp);
          inv_rk[b * KVl + g] = tmp[0];
        }
      cpu::rms_norm(q.data(), BT * Hl, d, L.q_norm.data(), eps, q.data());
      cpu::rms_norm(k.data(), BT * KVl, d, L.k_norm.data(), eps, k.data());
      kgain_tiled.resize(static_cast<size_t>(kw));
      for (int64_t g = 0; g < KVl; ++g) std::copy_n(L.k_norm.data(), d, kgain_tiled.data() + g * d);
      kgain = kgain_tiled.data();
    } else if (c_.qk_norm == QkNormKind::kFullWidth) {
      std::vector<double> q_ss, k_ss;
      full_width_sumsq(q, k, BT, q_ss, k_ss);
      const double qn = static_cast<double>(H * d), kn = static_cast<double>(c_.num_kv_heads * d);
      for (int64_t r = 0; r < BT; ++r) {
        const float iq = static_cast<float>(1.0 / std::sqrt(q_ss[r] / qn + eps));
        const float ik = static_cast<float>(1.0 / std::sqrt(k_ss[r] / kn + eps));
        for (int64_t j = 0; j < qw; ++j) q[r * qw + j] = q[r * qw + j] * iq * L.q_norm[j];
        for (int64_t j = 0; j < kw; ++j) k[r * kw + j] = k[r * kw + j] * ik * L.k_norm[j];
        if (r % T == 0)
          for (int64_t g = 0; g < KVl; ++g) inv_rk[(r / T) * KVl + g] = ik;
      }
      kgain = L.k_norm.data();
    }
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(k.data() + b * T * kw, kw, k0_model.begin() + b * kw);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < Hl; ++h)
        cpu::rope(q.data() + b * T * qw + h * d, T, rot, qw, 0, inv_freq_.data());
      for (int64_t g = 0; g < KVl; ++g)
        cpu::rope(k.data() + b * T * kw + g * d, T, rot, kw, 0, inv_freq_.data());
    }
  }  // not mla
  // YaRN scales cos and sin (the rotated dimensions of q and k) by its attention factor; multi-head
  // latent attention applies it in cpu::mla_project and in its attribution.
  const float rope_af = mla ? 1.f : static_cast<float>(c_.rope.attention_factor);
  if (rope_af != 1.f) {
    for (int64_t r = 0; r < BT * Hl; ++r)
      for (int64_t j = 0; j < rot; ++j) q[r * d + j] *= rope_af;
    for (int64_t r = 0; r < BT * KVl; ++r)
      for (int64_t j = 0; j < rot; ++j) k[r * d + j] *= rope_af;
  }
  // The sink queries of this layer: those that can see position 0 (docs/metrics.md 1.4).
  const int64_t window = c_.window(l), nq = window > 0 ? std::min(T, window) : T;
  const bool sinks = !L.sinks.empty();
  // The held KV head of local query head h (KV heads are replicated when tp > num_kv_heads).
  auto kv_of = [&](int64_t h_local) {
    return (plan_.head_begin + h_local) / group - plan_.kv_begin;
  };

  // qbar: mean over the sink queries i >= 1 of the rotated, normed queries. The key at position 0
  // is K(c) times YaRN's attention factor in the rotated dimensions: folded into qbar here.
  std::vector<float> qbar(static_cast<size_t>(B * qw), 0.f);
  for (int64_t b = 0; b < B && nq > 1; ++b) {
    for (int64_t i = 1; i < nq; ++i)
      for (int64_t j = 0; j < qw; ++j) qbar[b * qw + j] += q[(b * T + i) * qw + j];
    for (int64_t j = 0; j < qw; ++j)
      qbar[b * qw + j] *= (j % d < rot ? rope_af : 1.f) / static_cast<float>(nq - 1);
  }

  // Attention, parallel over (probe, head), in blocks of query rows: a block of queries
  // [i0, i1) needs keys [0, i1) only, so the causal upper triangle is never computed and the
  // score buffer is kQueryBlock x T (O(T) memory per thread, not T x T).
  constexpr int64_t kQueryBlock = 64;
  std::vector<float> z(static_cast<size_t>(BT * zw)), a0(static_cast<size_t>(B * Hl * T)),
      a0_mean(B * Hl);
  std::vector<float> sink_mass(sinks ? static_cast<size_t>(B * Hl * T) : 0),
      sink_mass_mean(sinks ? static_cast<size_t>(B * Hl) : 0);
#pragma omp parallel num_threads(opt_.threads)
  {
    std::vector<float> s(static_cast<size_t>(std::min(kQueryBlock, T) * T));
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < B * Hl; ++bh) {
      const int64_t b = bh / Hl, h = bh % Hl, g = kv_of(h);
      const float* qh = q.data() + b * T * qw + h * d;
      const float* kh = k.data() + b * T * kw + g * d;
      const float* vh = v.data() + b * T * vw + g * dv;
      double sum = 0, sink_sum = 0;
      for (int64_t i0 = 0; i0 < T; i0 += kQueryBlock) {
        // Keys [k0, i1): a sliding window skips the keys no query of the block sees.
        const int64_t i1 = std::min(T, i0 + kQueryBlock), rows = i1 - i0,
                      k0 = window > 0 ? std::max<int64_t>(0, i0 - window + 1) : 0, nk = i1 - k0;
        gemm_nt(rows, nk, d, qh + i0 * qw, qw, kh + k0 * kw, kw, s.data(), nk, scale);
        if (window > 0 || sinks)
          cpu::window_sink_softmax_rows(s.data(), rows, nk, i0, window,
                                        sinks ? &L.sinks[static_cast<size_t>(h)] : nullptr,
                                        sinks ? sink_mass.data() + bh * T + i0 : nullptr, k0);
        else
          cpu::causal_softmax_rows(s.data(), rows, nk, i0);
        for (int64_t r = 0; r < rows; ++r) {
          a0[bh * T + i0 + r] = k0 == 0 ? s[r * nk] : 0.f;
          if (i0 + r < nq) {
            sum += s[r * nk];
            if (sinks) sink_sum += sink_mass[bh * T + i0 + r];
          }
        }
        gemm_nn(rows, dv, nk, s.data(), nk, vh + k0 * vw, vw, z.data() + (b * T + i0) * zw + h * dv,
                zw);
      }
      a0_mean[bh] = static_cast<float>(sum / static_cast<double>(nq));
      if (sinks) sink_mass_mean[bh] = static_cast<float>(sink_sum / static_cast<double>(nq));
    }
  }

  // The layer's output a = z W_O^T (+ b_O), summed over the tp group. Post-norm blocks need it
  // before the heads' writes (their scale is gamma / rms(a) per position): one collective for a,
  // a second for the heads' position-0 vectors. Pre-norm blocks send both in one.
  a.assign(static_cast<size_t>(BT * D), 0.f);
  std::vector<float> out_scale;  // [BT] 1 / rms(a) of post-norm blocks
  const bool bias_here = comms_.tp_group->rank() == 0 && !L.o_bias.empty();
  if (post_norm) {
    gemm_nt(BT, D, zw, z.data(), zw, L.o.data(), zw, a.data(), D);
    if (bias_here) add_bias(a.data(), BT, D, D, L.o_bias);
    if (tp > 1) {
      ScopedSeconds timed(&comm_seconds_);
      comms_.tp_group->allreduce_sum(a.data(), a.size());
    }
    out_scale.resize(static_cast<size_t>(BT));
    for (int64_t r = 0; r < BT; ++r) {
      float* ar = a.data() + r * D;
      double ss = 0;
      for (int64_t j = 0; j < D; ++j) ss += static_cast<double>(ar[j]) * ar[j];
      out_scale[r] = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(D) + eps));
      for (int64_t j = 0; j < D; ++j) ar[j] = ar[j] * out_scale[r] * L.attn_out_norm.gain[j];
    }
  }

  // Head writes: w = z_h W_O[:, h]^T (scaled as the block writes it), norms and position-0
  // summaries.
  std::vector<float> wp0_norm(B * Hl), wrest_norm(B * Hl);
  std::vector<float> head_pack(static_cast<size_t>(B * H * 2 * D), 0.f);  // [B, H, {delta, p0}, D]
#pragma omp parallel num_threads(opt_.threads)
  {
    std::vector<float> wbuf(static_cast<size_t>(T * D));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < Hl; ++h) {
        gemm_nt(T, D, dv, z.data() + b * T * zw + h * dv, zw, L.o.data() + h * dv, zw, wbuf.data(),
                D);
        if (post_norm) {
          for (int64_t i = 0; i < T; ++i)
            for (int64_t j = 0; j < D; ++j)
              wbuf[i * D + j] *= out_scale[b * T + i] * L.attn_out_norm.gain[j];
        } else {
          float* ab = a.data() + b * T * D;
          for (int64_t i = 0; i < T * D; ++i) ab[i] += wbuf[i];
        }
        wp0_norm[b * Hl + h] = cpu::l2_norm(wbuf.data(), D);
        double rest = 0;
        for (int64_t i = 1; i < T; ++i) rest += cpu::l2_norm(wbuf.data() + i * D, D);
        wrest_norm[b * Hl + h] = static_cast<float>(rest / static_cast<double>(T - 1));
        float* delta = head_pack.data() + ((b * H + plan_.head_begin + h) * 2) * D;
        float* p0 = delta + D;
        std::fill(delta, delta + D, 0.f);
        for (int64_t i = 1; i < T; ++i)
          for (int64_t c = 0; c < D; ++c) delta[c] += wbuf[i * D + c];
        for (int64_t c = 0; c < D; ++c) {
          p0[c] = wbuf[c];
          delta[c] = wbuf[c] - delta[c] / static_cast<float>(T - 1);
        }
      }
    }
  }
  if (!post_norm && bias_here) add_bias(a.data(), BT, D, D, L.o_bias);
  // o_proj is row-parallel: the partial sums of the tp ranks add up to a_l. One collective
  // carries a (pre-norm) and the heads' position-0 vectors.
  if (tp > 1) {
    const size_t na = post_norm ? 0 : a.size();
    std::vector<float> buf(na + head_pack.size());
    std::copy_n(a.begin(), na, buf.begin());
    std::copy(head_pack.begin(), head_pack.end(), buf.begin() + static_cast<long>(na));
    ScopedSeconds timed(&comm_seconds_);
    comms_.tp_group->allreduce_sum(buf.data(), buf.size());
    std::copy_n(buf.begin(), na, a.begin());
    std::copy(buf.begin() + static_cast<long>(na), buf.end(), head_pack.begin());
  }

  // Circuit attribution for this layer's (target) heads from the sources of layers < l:
  // K(c) = kgain (.) W_K (gamma_in (.) P c) / (s_x r_k), P the LayerNorm centring (identity for
  // RMSNorm); the constant kconst = W_K beta_in + b_K enters the identity only.
  const int64_t C = layer.sources, Ctot = layers_.components;
  std::vector<float> kconst(static_cast<size_t>(kw), 0.f);
  if (layer_norm && !L.attn_norm.bias.empty())
    gemm_nt(1, kw, D, L.attn_norm.bias.data(), D, L.k.data(), D, kconst.data(), kw);
  if (!L.k_bias.empty())
    for (int64_t j = 0; j < kw; ++j) kconst[j] += L.k_bias[j];
  std::vector<float> attr(static_cast<size_t>(B * Hl * C)), k0_sum(static_cast<size_t>(B * kw));
  {
    std::vector<float> src(static_cast<size_t>((C + 1) * D)),
        G(mla ? 0 : static_cast<size_t>((C + 1) * kw));
    for (int64_t b = 0; b < B; ++b) {
      const float* db = delta_.data() + b * Ctot * D;
      auto put = [&](int64_t row, const float* vsrc) {
        float* dst = src.data() + row * D;
        double mean = 0;
        if (layer_norm) {
          for (int64_t j = 0; j < D; ++j) mean += vsrc[j];
          mean /= static_cast<double>(D);
        }
        for (int64_t j = 0; j < D; ++j)
          dst[j] = (vsrc[j] - static_cast<float>(mean)) * (post_norm ? 1.f : L.attn_norm.gain[j]);
      };
      for (int64_t c = 0; c < C; ++c) put(c, db + c * D);
      put(C, p0_sum_.data() + b * D);
      const float ix = inv_rx[b * T];
      if (mla) {  // through the latent and the shared rope key (docs/metrics.md, DeepSeek-V3)
        cpu::mla_attribute(c_, L, src.data(), C, Hl, ix, inv_rl[b], qbar.data() + b * qw, scale,
                           attr.data() + b * Hl * C, k0_sum.data() + b * kw);
        continue;
      }
      gemm_nt(C + 1, kw, D, src.data(), D, L.k.data(), D, G.data(), kw);
      for (int64_t h = 0; h < Hl; ++h) {
        const int64_t g = kv_of(h);
        const float f = ix * inv_rk[b * KVl + g] * scale;
        const float* qb = qbar.data() + b * qw + h * d;
        const float* kg = kgain + g * d;
        for (int64_t c = 0; c < C; ++c) {
          const float* gc = G.data() + c * kw + g * d;
          double acc = 0;
          for (int64_t j = 0; j < d; ++j) acc += static_cast<double>(gc[j]) * kg[j] * qb[j];
          attr[(b * Hl + h) * C + c] = static_cast<float>(acc) * f;
        }
      }
      for (int64_t g = 0; g < KVl; ++g)
        for (int64_t j = 0; j < d; ++j)
          k0_sum[b * kw + g * d + j] = (G[C * kw + g * d + j] * ix + kconst[g * d + j]) *
                                       inv_rk[b * KVl + g] * kgain[g * d + j];
    }
  }

  AttentionTap tap{l,
                   B,
                   T,
                   D,
                   d,
                   probe0_,
                   plan_.head_begin,
                   Hl,
                   a0_mean.data(),
                   a0.data(),
                   wp0_norm.data(),
                   wrest_norm.data(),
                   attr.data(),
                   C,
                   k0_model.data(),
                   k0_sum.data(),
                   plan_.kv_begin,
                   KVl};
  tap.sink_queries = nq;
  tap.sink_mass = sinks ? sink_mass.data() : nullptr;
  tap.sink_mass_mean = sinks ? sink_mass_mean.data() : nullptr;
  emit_attention_tap(*obs_, tap_source(), tap);

  // Store the heads' deltas for later targets; the part of a[0] that is no head's (the output
  // bias) joins the running position-0 sum; ablate.
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> rest0(a.begin() + b * T * D, a.begin() + b * T * D + D);
    for (int64_t h = 0; h < H; ++h) {
      const float* delta = head_pack.data() + ((b * H + h) * 2) * D;
      const float* p0 = delta + D;
      std::copy_n(delta, D, delta_.data() + (b * Ctot + layer.head_component0 + h) * D);
      const bool ab = layer.head_ablated[static_cast<size_t>(h)] != 0;
      for (int64_t j = 0; j < D; ++j) {
        rest0[j] -= p0[j];
        if (ab) a[b * T * D + j] -= delta[j];  // position 0 gets the head's mean write
        p0_sum_[b * D + j] += ab ? p0[j] - delta[j] : p0[j];
      }
    }
    for (int64_t j = 0; j < D; ++j) p0_sum_[b * D + j] += static_cast<float>(rest0[j]);
  }
  if (!layers_.parallel_residual)
    for (size_t i = 0; i < x_.size(); ++i) x_[i] += a[i];
}

void CpuBackend::run_mlp(const MlpWeights& m, const float* u, int64_t n, float* out) const {
  if (n == 0) return;
  const int64_t D = c_.hidden_size, I = m.inter;
  std::vector<float> h(static_cast<size_t>(n * I));
  gemm_nt(n, I, D, u, D, m.up.data(), D, h.data(), I);
  add_bias(h.data(), n, I, I, m.up_bias);
  if (!m.gate.empty()) {
    std::vector<float> g(static_cast<size_t>(n * I));
    gemm_nt(n, I, D, u, D, m.gate.data(), D, g.data(), I);
    add_bias(g.data(), n, I, I, m.gate_bias);
    if (c_.act == Activation::kSwigluClamped) {
      cpu::swiglu_clamped(g.data(), h.data(), h.data(), n * I, static_cast<float>(c_.swiglu_limit),
                          static_cast<float>(c_.swiglu_alpha));
    } else if (c_.act == Activation::kSilu) {
      cpu::swiglu(g.data(), h.data(), h.data(), n * I);
    } else {
      cpu::activation(c_.act, g.data(), n * I);
      for (int64_t i = 0; i < n * I; ++i) h[i] *= g[i];
    }
  } else {
    cpu::activation(c_.act, h.data(), n * I);
  }
  gemm_nt(n, D, I, h.data(), I, m.down.data(), I, out, D);
  add_bias(out, n, D, D, m.down_bias);
}

void CpuBackend::route(const float* lr, int64_t n, int32_t* topk, float* weight,
                       std::span<const float> bias) const {
  const int64_t E = c_.num_experts, K = c_.top_k;
  if (c_.router == RouterKind::kSigmoidGroupTopK) {
    cpu::route_sigmoid_groups(c_, lr, n, bias.data(), topk, weight);
    return;
  }
  std::vector<double> p(static_cast<size_t>(E));
  std::vector<int32_t> order(static_cast<size_t>(E));
  for (int64_t r = 0; r < n; ++r, lr += E) {
    std::iota(order.begin(), order.end(), 0);
    // Ties go to the lower expert index.
    auto by = [&](const auto& key) {
      std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int32_t a, int32_t b) {
        return key[a] != key[b] ? key[a] > key[b] : a < b;
      });
    };
    if (c_.router == RouterKind::kTopKSoftmax) {
      // Mixtral: the top-k logits, then a softmax over the selected ones.
      by(lr);
      const double mx = lr[order[0]];
      double sum = 0;
      for (int64_t j = 0; j < K; ++j)
        sum += (p[j] = std::exp(static_cast<double>(lr[order[j]]) - mx));
      for (int64_t j = 0; j < K; ++j) {
        topk[r * K + j] = order[j];
        weight[r * K + j] = static_cast<float>(p[j] / sum);
      }
      continue;
    }
    const double mx = *std::max_element(lr, lr + E);
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(static_cast<double>(lr[e]) - mx));
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    by(p);
    double wsum = 0;
    for (int64_t j = 0; j < K; ++j) wsum += p[order[j]];
    for (int64_t j = 0; j < K; ++j) {
      topk[r * K + j] = order[j];
      weight[r * K + j] = static_cast<float>(c_.norm_topk_prob ? p[order[j]] / wsum : p[order[j]]);
    }
  }
}

void CpuBackend::moe_slice(const LayerWeights& L, const float* u, int64_t n,
                           std::vector<int32_t>& topk, std::vector<float>& outs) const {
  const int64_t D = c_.hidden_size, E = c_.num_experts, K = c_.top_k;
  std::vector<float> logits(static_cast<size_t>(n * E));
  gemm_nt(n, E, D, u, D, L.router.data(), D, logits.data(), E);
  add_bias(logits.data(), n, E, E, L.router_bias);
  topk.assign(static_cast<size_t>(n * K), 0);
  std::vector<float> weight(static_cast<size_t>(n * K));
  route(logits.data(), n, topk.data(), weight.data(), L.score_bias);

  // Dispatch (token, expert) pairs to the ranks of the expert group holding that expert (one per
  // intermediate slice when etp > 1): [expert id, u] per pair and destination.
  const Comm& ep = *comms_.ep_group;
  const int P = ep.size();
  std::vector<size_t> send_counts(static_cast<size_t>(P), 0);
  std::vector<std::vector<int64_t>> pairs_to(static_cast<size_t>(P));
  for (int64_t pr = 0; pr < n * K; ++pr)
    for (int slice = 0; slice < plan_.etp; ++slice)
      pairs_to[plan_.expert_owner(topk[pr], slice)].push_back(pr);
  std::vector<float> send;
  send.reserve(static_cast<size_t>(n * K * plan_.etp * (D + 1)));
  for (int r = 0; r < P; ++r) {
    for (int64_t pr : pairs_to[r]) {
      send.push_back(static_cast<float>(topk[pr]));
      send.insert(send.end(), u + (pr / K) * D, u + (pr / K + 1) * D);
    }
    send_counts[r] = pairs_to[r].size() * static_cast<size_t>(D + 1);
  }
  std::vector<float> recv;
  std::vector<size_t> recv_counts;
  {
    ScopedSeconds timed(&comm_seconds_);
    ep.alltoallv(send, send_counts, &recv, &recv_counts);
  }

  // Run the local experts on what arrived, grouped by expert; answer per pair in arrival order.
  const int64_t npairs = static_cast<int64_t>(recv.size()) / (D + 1);
  std::vector<float> answer(static_cast<size_t>(npairs * D));
  std::vector<std::vector<int64_t>> by_expert(static_cast<size_t>(plan_.local_experts()));
  for (int64_t i = 0; i < npairs; ++i) {
    const int64_t e = static_cast<int64_t>(recv[i * (D + 1)]) - plan_.expert_begin;
    if (e < 0 || e >= plan_.local_experts())
      throw RuntimeFailure("expert dispatch reached the wrong rank");
    by_expert[e].push_back(i);
  }
#pragma omp parallel for schedule(dynamic) num_threads(opt_.threads)
  for (int64_t e = 0; e < plan_.local_experts(); ++e) {
    const auto& idx = by_expert[e];
    if (idx.empty()) continue;
    const int64_t m = static_cast<int64_t>(idx.size());
    std::vector<float> in(static_cast<size_t>(m * D)), out(static_cast<size_t>(m * D));
    for (int64_t r = 0; r < m; ++r)
      std::copy_n(recv.data() + idx[r] * (D + 1) + 1, D, in.data() + r * D);
    run_mlp(L.experts[e], in.data(), m, out.data());
    for (int64_t r = 0; r < m; ++r) std::copy_n(out.data() + r * D, D, answer.data() + idx[r] * D);
  }
  std::vector<size_t> back_counts(recv_counts.size());
  for (size_t r = 0; r < recv_counts.size(); ++r)
    back_counts[r] = recv_counts[r] / static_cast<size_t>(D + 1) * D;
  std::vector<float> back;
  std::vector<size_t> back_recv_counts;
  {
    ScopedSeconds timed(&comm_seconds_);
    ep.alltoallv(answer, back_counts, &back, &back_recv_counts);
  }

  // Sum the partial outputs of the etp slices (in rank order), then weight.
  outs.assign(static_cast<size_t>(n * K * D), 0.f);
  size_t pos = 0;
  for (int r = 0; r < P; ++r)
    for (int64_t pr : pairs_to[r]) {
      for (int64_t j = 0; j < D; ++j) outs[pr * D + j] += back[pos + j];
      pos += static_cast<size_t>(D);
    }
  for (int64_t pr = 0; pr < n * K; ++pr)
    for (int64_t j = 0; j < D; ++j) outs[pr * D + j] *= weight[pr];
}

void CpuBackend::mlp(const PlannedLayer& layer) {
  const int64_t l = layer.layer, B = B_, T = T_;
  const std::vector<float>& in =
      x_;  // after the attention's write, or the layer's input (parallel)
  const LayerWeights& L = w_.layers[static_cast<size_t>(l)];
  const int64_t D = c_.hidden_size, BT = B * T, E = L.moe ? c_.num_experts : 0, K = c_.top_k,
                S = layers_.slots_per_layer;
  const int64_t shared_slot = std::max<int64_t>(c_.num_experts, 1);
  const bool shared = layer.shared_expert;
  const bool post_norm = layers_.post_norm;
  const int64_t Ctot = layers_.components;
  std::vector<float> u(static_cast<size_t>(BT * D));
  if (post_norm)
    std::copy(in.begin(), in.end(), u.begin());
  else
    normalize(L.mlp_norm, in.data(), BT, u.data(), nullptr);

  // This tp rank's token slice [s0, s1) of the dp group's tokens.
  const int tp = comms_.tp_group->size(), tr = comms_.tp_group->rank();
  const int64_t s0 = BT * tr / tp, s1 = BT * (tr + 1) / tp, n = s1 - s0;

  // One buffer summed over the tp group: m [BT, D], per (probe, slot) p0 vectors and rest sums
  // [B, S, D] each, p0 norms [B, S], p0 routing [B, E], rest routing counts [E].
  const size_t off_m = 0, off_p0 = off_m + BT * D, off_rest = off_p0 + B * S * D,
               off_n0 = off_rest + B * S * D, off_r0 = off_n0 + B * S,
               off_rc = off_r0 + B * std::max<int64_t>(E, 1);
  std::vector<float> buf(off_rc + static_cast<size_t>(std::max<int64_t>(E, 1)), 0.f);
  float* m = buf.data() + off_m;
  auto account = [&](int64_t token, int64_t slot, const float* write) {
    const int64_t b = token / T, i = token % T;
    if (i == 0) {
      std::copy_n(write, D, buf.data() + off_p0 + (b * S + slot) * D);
      buf[off_n0 + b * S + slot] = cpu::l2_norm(write, D);
    } else {
      float* acc = buf.data() + off_rest + (b * S + slot) * D;
      for (int64_t j = 0; j < D; ++j) acc[j] += write[j];
    }
  };
  // Per slice row: the writes of its components (K experts (+ shared) or the dense MLP), then
  // their sum m; a post-norm block scales them all by gamma / rms(m) of the row.
  std::vector<int32_t> topk;
  std::vector<float> outs, shared_out;
  if (L.moe) {
    moe_slice(L, u.data() + s0 * D, n, topk, outs);
    if (shared) {
      shared_out.resize(static_cast<size_t>(n * D));
      run_mlp(L.shared, u.data() + s0 * D, n, shared_out.data());
      std::vector<float> gate(static_cast<size_t>(n));
      if (!L.shared_gate.empty())  // DeepSeek's shared experts have no gate
        gemm_nt(n, 1, D, u.data() + s0 * D, D, L.shared_gate.data(), D, gate.data(), 1);
      for (int64_t r = 0; r < n && !L.shared_gate.empty(); ++r) {
        const float sg = 1.f / (1.f + std::exp(-gate[r]));
        for (int64_t j = 0; j < D; ++j) shared_out[r * D + j] *= sg;
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      float* mr = m + (s0 + r) * D;
      for (int64_t j = 0; j < K; ++j)
        for (int64_t c = 0; c < D; ++c) mr[c] += outs[(r * K + j) * D + c];
      if (shared)
        for (int64_t c = 0; c < D; ++c) mr[c] += shared_out[r * D + c];
    }
  } else {
    run_mlp(L.dense, u.data() + s0 * D, n, m + s0 * D);
  }
  if (post_norm) {
    const float* gain = L.mlp_out_norm.gain.data();
    for (int64_t r = 0; r < n; ++r) {
      float* mr = m + (s0 + r) * D;
      double ss = 0;
      for (int64_t c = 0; c < D; ++c) ss += static_cast<double>(mr[c]) * mr[c];
      const float sc =
          static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(D) + c_.rms_norm_eps));
      auto apply = [&](float* w) {
        for (int64_t c = 0; c < D; ++c) w[c] *= sc * gain[c];
      };
      apply(mr);
      if (L.moe)
        for (int64_t j = 0; j < K; ++j) apply(outs.data() + (r * K + j) * D);
      if (shared) apply(shared_out.data() + r * D);
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    const int64_t token = s0 + r;
    if (!L.moe) {
      account(token, 0, m + token * D);
      continue;
    }
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = topk[r * K + j];
      account(token, e, outs.data() + (r * K + j) * D);
      if (token % T == 0)
        buf[off_r0 + (token / T) * E + e] = 1.f;
      else
        buf[off_rc + e] += 1.f;
    }
    if (shared) account(token, shared_slot, shared_out.data() + r * D);
  }
  if (tp > 1) {
    ScopedSeconds timed(&comm_seconds_);
    comms_.tp_group->allreduce_sum(buf.data(), buf.size());
  }

  // Per-component deltas for the circuit map, ablation, the tap.
  for (int64_t b = 0; b < B; ++b)
    for (size_t s = 0; s < layer.slots.size(); ++s) {
      const PlannedSlot& sk = layer.slots[s];
      const float* p0 = buf.data() + off_p0 + (b * S + static_cast<int64_t>(s)) * D;
      const float* rest = buf.data() + off_rest + (b * S + static_cast<int64_t>(s)) * D;
      float* delta = delta_.data() + (b * Ctot + sk.component) * D;
      for (int64_t j = 0; j < D; ++j) delta[j] = p0[j] - rest[j] / static_cast<float>(T - 1);
      for (int64_t j = 0; j < D; ++j) {
        if (sk.ablated) m[b * T * D + j] -= delta[j];
        p0_sum_[b * D + j] += sk.ablated ? p0[j] - delta[j] : p0[j];
      }
    }
  std::vector<float> norms(static_cast<size_t>(BT));
  for (int64_t r = 0; r < BT; ++r) norms[r] = cpu::l2_norm(m + r * D, D);
  emit_mlp_tap(*obs_, tap_source(), layers_, layer, norms.data(), buf.data() + off_n0,
               buf.data() + off_r0, buf.data() + off_rc);
  for (size_t i = 0; i < x_.size(); ++i) x_[i] += layers_.parallel_residual ? a_[i] + m[i] : m[i];
}

FloatArray CpuBackend::run(const IntArray& tokens, int64_t probe0, ForwardObserver& obs) {
  B_ = static_cast<int64_t>(tokens.shape.at(0));
  T_ = static_cast<int64_t>(tokens.shape.at(1));
  probe0_ = probe0;
  obs_ = &obs;
  cpu::set_threads(opt_.threads);
  run_layers(layers_, *this, tokens);
  FloatArray logits;
  if (opt_.want_logits) {
    const int64_t V = c_.vocab_size, D = c_.hidden_size;
    std::vector<float> u(x_.size());
    normalize(w_.final_norm, x_.data(), B_ * T_, u.data(), nullptr);
    logits = FloatArray({static_cast<size_t>(B_), static_cast<size_t>(T_), static_cast<size_t>(V)},
                        "probe,position,vocab");
    gemm_nt(B_ * T_, V, D, u.data(), D, w_.lm_head.data(), D, logits.ptr(), V);
  }
  return logits;
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const BackendInputs& in) {
  if (!in.ckpt)
    throw InputError("--device cpu needs a checkpoint (write one with `sinkscope synth`)");
  return std::make_unique<CpuBackend>(in);
}

std::unique_ptr<Backend> make_cpu_backend(const Checkpoint& ckpt, const ShardPlan& plan,
                                          ForwardComms comms, ForwardOptions options) {
  BackendInputs in;
  in.ckpt = &ckpt;
  in.cfg = &ckpt.config();
  in.plan = &plan;
  in.comms = comms;
  in.options = std::move(options);
  return make_cpu_backend(in);
}

BackendEntry cpu_backend_entry() {
  BackendEntry e;
  e.name = "cpu";
  e.summary = "fp32 reference on the host (OpenBLAS), every family";
  e.check = [](const ModelConfig&, const ShardPlan&, bool synthetic) {
    if (synthetic)
      throw InputError(
          "--synthetic-weights needs --device cuda (for the CPU, write a checkpoint with "
          "`sinkscope synth`)");
  };
  e.make = [](const BackendInputs& in) { return make_cpu_backend(in); };
  e.calibrate = [](int threads, const std::string& dir, const Comm& world) {
    return calibrate_cpu(threads, dir, world);
  };
  return e;
}

}  // namespace sinkscope
