// CPU backend: the instrumented Qwen3-MoE forward pass on one rank's shard
// (docs/parallel-layout.md).
//
// Per layer and micro-batch:
//   attention  heads of this rank; per (probe, head) the T x T causal softmax in fp32, A[i, 0]
//              kept, z = A V; each head's write w = z W_O[:, h]^T computed on its own (so its
//              norms and position-0 vector are exact) and summed into the o_proj partial sum,
//              which is all-reduced over the tp group.
//   circuit    the rank that owns a target head computes its attributions from the position-0
//              deltas of every upstream component (gathered over the tp group per layer).
//   MoE        each tp rank routes a 1/tp slice of its dp group's tokens, sends (token, expert)
//              pairs to the expert owners of its ep group (all-to-all with counts), gets the
//              expert outputs back per pair, and the slices are summed over the tp group.
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include "cpu/kernels.hpp"
#include "model/median.hpp"
#include "model/weights.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/model.hpp"

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

class CpuBackend final : public Backend {
 public:
  CpuBackend(const Checkpoint& ck, const ShardPlan& plan, ForwardComms comms, ForwardOptions opt)
      : ck_(ck), c_(ck.config()), plan_(plan), comms_(comms), opt_(std::move(opt)) {
    const uint64_t before = ck.weight_bytes_read();
    w_ = load_weights(ck, plan, opt_.want_logits);
    bytes_loaded_ = ck.weight_bytes_read() - before;
    const int64_t d = c_.head_dim;
    inv_freq_.resize(static_cast<size_t>(d / 2));
    for (int64_t j = 0; j < d / 2; ++j)
      inv_freq_[static_cast<size_t>(j)] =
          1.0 / std::pow(c_.rope_theta, static_cast<double>(2 * j) / static_cast<double>(d));
    slots_ = std::max<int64_t>(c_.num_experts, 1);
    // Test hook (docs/reliability.md): SINKSCOPE_INJECT_FAULT=RANK:LAYER makes that world rank
    // throw when it reaches that layer, so the failure tests can stop one rank part way.
    if (const char* f = std::getenv("SINKSCOPE_INJECT_FAULT")) {
      int rank = -1, layer = -1;
      if (std::sscanf(f, "%d:%d", &rank, &layer) == 2 && rank == comms_.world->rank())
        fault_layer_ = layer;
    }
    ci_ = ComponentIndex{c_.num_heads, c_.num_heads + slots_};
  }

  std::string name() const override { return "cpu"; }
  uint64_t weight_bytes_loaded() const override { return bytes_loaded_; }
  double communication_seconds() const override { return comm_seconds_; }
  void set_ablations(std::vector<Ablation> ablations) override {
    opt_.ablations = std::move(ablations);
  }

  FloatArray run(const IntArray& tokens, int64_t probe0, ForwardObserver& obs) override;

 private:
  void embed(const IntArray& tokens, std::vector<float>& x) const;
  void residual_tap(int64_t index, const std::vector<float>& x, int64_t B, int64_t T,
                    int64_t probe0, ForwardObserver& obs) const;
  void attention(int64_t l, const std::vector<float>& x, std::vector<float>& y, int64_t B,
                 int64_t T, int64_t probe0, ForwardObserver& obs);
  void mlp(int64_t l, const std::vector<float>& y, std::vector<float>& x, int64_t B, int64_t T,
           int64_t probe0, ForwardObserver& obs);
  // Expert-parallel MoE on this rank's token slice: returns per (slice row, k) expert ids,
  // weights and the weighted expert outputs [n * K, D].
  void moe_slice(const LayerWeights& L, const float* u, int64_t n, std::vector<int32_t>& topk,
                 std::vector<float>& outs) const;
  void run_mlp(const MlpWeights& m, const float* u, int64_t n, float* out) const;
  bool ablated(int64_t layer, Ablation::Kind kind, int64_t index) const {
    return has_ablation(opt_.ablations, layer, kind, index);
  }
  [[noreturn]] void non_finite(int64_t layer, const char* component, int64_t probe) const {
    throw RuntimeFailure(non_finite_message(layer, component, probe, ck_.dir()));
  }

  const Checkpoint& ck_;
  const ModelConfig& c_;
  ShardPlan plan_;
  ForwardComms comms_;
  ForwardOptions opt_;
  ModelWeights w_;
  uint64_t bytes_loaded_ = 0;
  std::vector<double> inv_freq_;
  int64_t slots_ = 1;
  int64_t fault_layer_ = -1;
  mutable double comm_seconds_ = 0;  // time inside collectives (all-reduces, the expert exchange)
  ComponentIndex ci_;
  // Per micro-batch circuit state: position-0 delta (c[0] - cbar) of every component slot, and
  // the running sum of the components' position-0 writes (for the identity check).
  std::vector<float> delta_;   // [B, C, D]
  std::vector<float> p0_sum_;  // [B, D]
};

void CpuBackend::embed(const IntArray& tokens, std::vector<float>& x) const {
  const int64_t D = c_.hidden_size;
  for (size_t i = 0; i < tokens.data.size(); ++i)
    ck_.read_row("model.embed_tokens.weight", tokens.data[i],
                 x.data() + static_cast<int64_t>(i) * D);
}

void CpuBackend::residual_tap(int64_t index, const std::vector<float>& x, int64_t B, int64_t T,
                              int64_t probe0, ForwardObserver& obs) const {
  const int64_t D = c_.hidden_size;
  std::vector<float> x0(static_cast<size_t>(B * D)), norm_p0(B), rest_median(B),
      abs_median(B, std::nanf(""));
  std::vector<float> norms;
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x.data() + b * T * D;
    std::copy(xb, xb + D, x0.begin() + b * D);
    norm_p0[b] = cpu::l2_norm(xb, D);
    norms.resize(static_cast<size_t>(T - 1));
    for (int64_t i = 1; i < T; ++i) norms[i - 1] = cpu::l2_norm(xb + i * D, D);
    double sum = 0;
    for (float v : norms) sum += v;
    if (!std::isfinite(sum) || !std::isfinite(norm_p0[b]))
      non_finite(index - 1, index == 0 ? "embedding" : "residual", probe0 + b);
    rest_median[b] = static_cast<float>(median_of(norms));
    if (probe0 + b == 0) {  // Sun et al.'s criterion is counted on probe 0 only
      std::vector<float> mags(xb, xb + T * D);
      for (auto& m : mags) m = std::fabs(m);
      abs_median[b] = static_cast<float>(median_of(mags));
    }
  }
  ResidualTap tap{
      index, B, T, D, probe0, x0.data(), norm_p0.data(), rest_median.data(), abs_median.data()};
  obs.on_residual(tap);
}

void CpuBackend::attention(int64_t l, const std::vector<float>& x, std::vector<float>& y, int64_t B,
                           int64_t T, int64_t probe0, ForwardObserver& obs) {
  const LayerWeights& L = w_.layers[static_cast<size_t>(l)];
  const int64_t D = c_.hidden_size, d = c_.head_dim, Hl = plan_.local_heads(),
                KVl = plan_.local_kv_heads();
  const int64_t BT = B * T, qw = Hl * d, kw = KVl * d, H = c_.num_heads;
  const int64_t group = c_.kv_group_size();
  const double eps = c_.rms_norm_eps;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));

  std::vector<float> u(static_cast<size_t>(BT * D)), inv_rx(static_cast<size_t>(BT));
  cpu::rms_norm(x.data(), BT, D, L.input_norm.data(), eps, u.data(), inv_rx.data());
  std::vector<float> q(static_cast<size_t>(BT * qw)), k(static_cast<size_t>(BT * kw)),
      v(static_cast<size_t>(BT * kw));
  gemm_nt(BT, qw, D, u.data(), D, L.q.data(), D, q.data(), qw);
  gemm_nt(BT, kw, D, u.data(), D, L.k.data(), D, k.data(), kw);
  gemm_nt(BT, kw, D, u.data(), D, L.v.data(), D, v.data(), kw);

  // r_k: the rms of each held KV head's key at position 0 before k_norm (docs/metrics.md section 4).
  std::vector<float> inv_rk(static_cast<size_t>(B * KVl));
  cpu::rms_norm(q.data(), BT * Hl, d, L.q_norm.data(), eps, q.data());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < KVl; ++g) {
      float tmp[1];
      std::vector<float> scratch(static_cast<size_t>(d));
      cpu::rms_norm(k.data() + b * T * kw + g * d, 1, d, L.k_norm.data(), eps, scratch.data(), tmp);
      inv_rk[b * KVl + g] = tmp[0];
    }
  cpu::rms_norm(k.data(), BT * KVl, d, L.k_norm.data(), eps, k.data());
  std::vector<float> k0_model(static_cast<size_t>(B * kw));
  for (int64_t b = 0; b < B; ++b) std::copy_n(k.data() + b * T * kw, kw, k0_model.begin() + b * kw);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hl; ++h)
      cpu::rope(q.data() + b * T * qw + h * d, T, d, qw, 0, inv_freq_.data());
    for (int64_t g = 0; g < KVl; ++g)
      cpu::rope(k.data() + b * T * kw + g * d, T, d, kw, 0, inv_freq_.data());
  }
  // The held KV head of local query head h (KV heads are replicated when tp > num_kv_heads).
  auto kv_of = [&](int64_t h_local) {
    return (plan_.head_begin + h_local) / group - plan_.kv_begin;
  };

  // qbar: mean over i >= 1 of the rotated, normed queries.
  std::vector<float> qbar(static_cast<size_t>(B * qw), 0.f);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 1; i < T; ++i)
      for (int64_t j = 0; j < qw; ++j) qbar[b * qw + j] += q[(b * T + i) * qw + j];
    for (int64_t j = 0; j < qw; ++j) qbar[b * qw + j] /= static_cast<float>(T - 1);
  }

  // Attention, parallel over (probe, head), in blocks of query rows: a block of queries
  // [i0, i1) needs keys [0, i1) only, so the causal upper triangle is never computed and the
  // score buffer is kQueryBlock x T (O(T) memory per thread, not T x T).
  constexpr int64_t kQueryBlock = 64;
  std::vector<float> z(static_cast<size_t>(BT * qw)), a0(static_cast<size_t>(B * Hl * T)),
      a0_mean(B * Hl);
#pragma omp parallel num_threads(opt_.threads)
  {
    std::vector<float> s(static_cast<size_t>(std::min(kQueryBlock, T) * T));
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < B * Hl; ++bh) {
      const int64_t b = bh / Hl, h = bh % Hl, g = kv_of(h);
      const float* qh = q.data() + b * T * qw + h * d;
      const float* kh = k.data() + b * T * kw + g * d;
      const float* vh = v.data() + b * T * kw + g * d;
      double sum = 0;
      for (int64_t i0 = 0; i0 < T; i0 += kQueryBlock) {
        const int64_t i1 = std::min(T, i0 + kQueryBlock), rows = i1 - i0;
        gemm_nt(rows, i1, d, qh + i0 * qw, qw, kh, kw, s.data(), i1, scale);
        cpu::causal_softmax_rows(s.data(), rows, i1, i0);
        for (int64_t r = 0; r < rows; ++r) {
          a0[bh * T + i0 + r] = s[r * i1];
          sum += s[r * i1];
        }
        gemm_nn(rows, d, i1, s.data(), i1, vh, kw, z.data() + (b * T + i0) * qw + h * d, qw);
      }
      a0_mean[bh] = static_cast<float>(sum / static_cast<double>(T));
    }
  }

  // Head writes: w = z_h W_O[:, h]^T, norms and position-0 summaries, summed into the partial a.
  std::vector<float> a(static_cast<size_t>(BT * D), 0.f);
  std::vector<float> wp0_norm(B * Hl), wrest_norm(B * Hl);
  std::vector<float> head_pack(static_cast<size_t>(B * H * 2 * D), 0.f);  // [B, H, {delta, p0}, D]
#pragma omp parallel num_threads(opt_.threads)
  {
    std::vector<float> wbuf(static_cast<size_t>(T * D));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < Hl; ++h) {
        gemm_nt(T, D, d, z.data() + b * T * qw + h * d, qw, L.o.data() + h * d, qw, wbuf.data(), D);
        float* ab = a.data() + b * T * D;
        for (int64_t i = 0; i < T * D; ++i) ab[i] += wbuf[i];
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
  // o_proj is row-parallel: the partial sums of the tp ranks add up to a_l. One collective
  // carries a and the heads' position-0 vectors.
  if (comms_.tp_group->size() > 1) {
    std::vector<float> buf(a.size() + head_pack.size());
    std::copy(a.begin(), a.end(), buf.begin());
    std::copy(head_pack.begin(), head_pack.end(), buf.begin() + static_cast<long>(a.size()));
    ScopedSeconds timed(&comm_seconds_);
    comms_.tp_group->allreduce_sum(buf.data(), buf.size());
    std::copy_n(buf.begin(), a.size(), a.begin());
    std::copy(buf.begin() + static_cast<long>(a.size()), buf.end(), head_pack.begin());
  }

  // Circuit attribution for this layer's (target) heads from the sources of layers < l.
  const int64_t C = ci_.count_before(l), Ctot = ci_.count_before(c_.num_layers);
  std::vector<float> attr(static_cast<size_t>(B * Hl * C)), k0_sum(static_cast<size_t>(B * kw));
  {
    std::vector<float> src(static_cast<size_t>((C + 1) * D)), G(static_cast<size_t>((C + 1) * kw));
    for (int64_t b = 0; b < B; ++b) {
      const float* db = delta_.data() + b * Ctot * D;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < D; ++j) src[c * D + j] = db[c * D + j] * L.input_norm[j];
      for (int64_t j = 0; j < D; ++j) src[C * D + j] = p0_sum_[b * D + j] * L.input_norm[j];
      gemm_nt(C + 1, kw, D, src.data(), D, L.k.data(), D, G.data(), kw);
      const float ix = inv_rx[b * T];
      for (int64_t h = 0; h < Hl; ++h) {
        const int64_t g = kv_of(h);
        const float f = ix * inv_rk[b * KVl + g] * scale;
        const float* qb = qbar.data() + b * qw + h * d;
        for (int64_t c = 0; c < C; ++c) {
          const float* gc = G.data() + c * kw + g * d;
          double acc = 0;
          for (int64_t j = 0; j < d; ++j) acc += static_cast<double>(gc[j]) * L.k_norm[j] * qb[j];
          attr[(b * Hl + h) * C + c] = static_cast<float>(acc) * f;
        }
      }
      for (int64_t g = 0; g < KVl; ++g)
        for (int64_t j = 0; j < d; ++j)
          k0_sum[b * kw + g * d + j] =
              G[C * kw + g * d + j] * ix * inv_rk[b * KVl + g] * L.k_norm[j];
    }
  }

  AttentionTap tap{l,
                   B,
                   T,
                   D,
                   d,
                   probe0,
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
  obs.on_attention(tap);

  // Store the heads' deltas for later targets; ablate; y = x + a.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const float* delta = head_pack.data() + ((b * H + h) * 2) * D;
      const float* p0 = delta + D;
      std::copy_n(delta, D, delta_.data() + (b * Ctot + ci_.head(l, h)) * D);
      const bool ab = ablated(l, Ablation::kHead, h);
      for (int64_t j = 0; j < D; ++j) {
        if (ab) a[b * T * D + j] -= delta[j];  // position 0 gets the head's mean write
        p0_sum_[b * D + j] += ab ? p0[j] - delta[j] : p0[j];
      }
    }
  y.resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] + a[i];
  for (int64_t b = 0; b < B; ++b) {
    double s = 0;
    for (int64_t h = 0; h < Hl; ++h) s += wp0_norm[b * Hl + h] + wrest_norm[b * Hl + h];
    if (!std::isfinite(s)) non_finite(l, "attention", probe0 + b);
  }
}

void CpuBackend::run_mlp(const MlpWeights& m, const float* u, int64_t n, float* out) const {
  if (n == 0) return;
  const int64_t D = c_.hidden_size, I = m.inter;
  std::vector<float> g(static_cast<size_t>(n * I)), up(static_cast<size_t>(n * I));
  gemm_nt(n, I, D, u, D, m.gate.data(), D, g.data(), I);
  gemm_nt(n, I, D, u, D, m.up.data(), D, up.data(), I);
  cpu::swiglu(g.data(), up.data(), g.data(), n * I);
  gemm_nt(n, D, I, g.data(), I, m.down.data(), I, out, D);
}

void CpuBackend::moe_slice(const LayerWeights& L, const float* u, int64_t n,
                           std::vector<int32_t>& topk, std::vector<float>& outs) const {
  const int64_t D = c_.hidden_size, E = c_.num_experts, K = c_.top_k;
  // Router: softmax over experts, top-k (ties go to the lower expert index), weights.
  std::vector<float> logits(static_cast<size_t>(n * E));
  gemm_nt(n, E, D, u, D, L.router.data(), D, logits.data(), E);
  topk.assign(static_cast<size_t>(n * K), 0);
  std::vector<float> weight(static_cast<size_t>(n * K));
  std::vector<double> p(static_cast<size_t>(E));
  std::vector<int32_t> order(static_cast<size_t>(E));
  for (int64_t r = 0; r < n; ++r) {
    const float* lr = logits.data() + r * E;
    const double mx = *std::max_element(lr, lr + E);
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(static_cast<double>(lr[e]) - mx));
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [&](int32_t a, int32_t b) { return p[a] != p[b] ? p[a] > p[b] : a < b; });
    double wsum = 0;
    for (int64_t j = 0; j < K; ++j) wsum += p[order[j]];
    for (int64_t j = 0; j < K; ++j) {
      topk[r * K + j] = order[j];
      weight[r * K + j] = static_cast<float>(c_.norm_topk_prob ? p[order[j]] / wsum : p[order[j]]);
    }
  }

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

void CpuBackend::mlp(int64_t l, const std::vector<float>& y, std::vector<float>& x, int64_t B,
                     int64_t T, int64_t probe0, ForwardObserver& obs) {
  const LayerWeights& L = w_.layers[static_cast<size_t>(l)];
  const int64_t D = c_.hidden_size, BT = B * T, E = L.moe ? c_.num_experts : 0, K = c_.top_k,
                S = slots_;
  const int64_t Ctot = ci_.count_before(c_.num_layers);
  std::vector<float> u(static_cast<size_t>(BT * D));
  cpu::rms_norm(y.data(), BT, D, L.post_norm.data(), c_.rms_norm_eps, u.data());

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
  if (L.moe) {
    std::vector<int32_t> topk;
    std::vector<float> outs;
    moe_slice(L, u.data() + s0 * D, n, topk, outs);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t token = s0 + r;
      for (int64_t j = 0; j < K; ++j) {
        const float* o = outs.data() + (r * K + j) * D;
        const int64_t e = topk[r * K + j];
        for (int64_t c = 0; c < D; ++c) m[token * D + c] += o[c];
        account(token, e, o);
        if (token % T == 0)
          buf[off_r0 + (token / T) * E + e] = 1.f;
        else
          buf[off_rc + e] += 1.f;
      }
    }
  } else {
    run_mlp(L.dense, u.data() + s0 * D, n, m + s0 * D);
    for (int64_t r = 0; r < n; ++r) account(s0 + r, 0, m + (s0 + r) * D);
  }
  if (tp > 1) {
    ScopedSeconds timed(&comm_seconds_);
    comms_.tp_group->allreduce_sum(buf.data(), buf.size());
  }

  // Per-component deltas for the circuit map, ablation, the tap, and x = y + m.
  std::vector<float> out_p0(B), out_rest(B),
      expert_p0(static_cast<size_t>(B * std::max<int64_t>(E, 1)), 0.f);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < (L.moe ? E : 1); ++s) {
      const float* p0 = buf.data() + off_p0 + (b * S + s) * D;
      const float* rest = buf.data() + off_rest + (b * S + s) * D;
      float* delta = delta_.data() + (b * Ctot + (L.moe ? ci_.expert(l, s) : ci_.mlp(l))) * D;
      for (int64_t j = 0; j < D; ++j) delta[j] = p0[j] - rest[j] / static_cast<float>(T - 1);
      const bool ab = ablated(l, L.moe ? Ablation::kExpert : Ablation::kMlp, s);
      for (int64_t j = 0; j < D; ++j) {
        if (ab) m[b * T * D + j] -= delta[j];
        p0_sum_[b * D + j] += ab ? p0[j] - delta[j] : p0[j];
      }
      if (L.moe) expert_p0[b * E + s] = buf[off_n0 + b * S + s];
    }
    out_p0[b] = cpu::l2_norm(m + b * T * D, D);
    double rest = 0;
    for (int64_t i = 1; i < T; ++i) rest += cpu::l2_norm(m + (b * T + i) * D, D);
    out_rest[b] = static_cast<float>(rest / static_cast<double>(T - 1));
    if (!std::isfinite(out_p0[b] + out_rest[b])) non_finite(l, L.moe ? "moe" : "mlp", probe0 + b);
  }
  MlpTap tap{l,
             B,
             T,
             D,
             probe0,
             L.moe,
             E,
             out_p0.data(),
             out_rest.data(),
             expert_p0.data(),
             buf.data() + off_r0,
             buf.data() + off_rc};
  obs.on_mlp(tap);
  x.resize(y.size());
  for (size_t i = 0; i < y.size(); ++i) x[i] = y[i] + m[i];
}

FloatArray CpuBackend::run(const IntArray& tokens, int64_t probe0, ForwardObserver& obs) {
  const int64_t B = static_cast<int64_t>(tokens.shape.at(0)),
                T = static_cast<int64_t>(tokens.shape.at(1));
  const int64_t D = c_.hidden_size, Ctot = ci_.count_before(c_.num_layers);
  if (T < 2) throw InputError("probes need at least 2 positions (position 0 and the rest)");
  cpu::set_threads(opt_.threads);
  std::vector<float> x(static_cast<size_t>(B * T * D)), y;
  embed(tokens, x);
  delta_.assign(static_cast<size_t>(B * Ctot * D), 0.f);
  p0_sum_.assign(static_cast<size_t>(B * D), 0.f);
  const bool ablate_embed = ablated(0, Ablation::kEmbedding, 0);
  for (int64_t b = 0; b < B; ++b) {
    float* xb = x.data() + b * T * D;
    float* delta = delta_.data() + (b * Ctot + ci_.embed()) * D;
    for (int64_t i = 1; i < T; ++i)
      for (int64_t j = 0; j < D; ++j) delta[j] += xb[i * D + j];
    for (int64_t j = 0; j < D; ++j) {
      delta[j] = xb[j] - delta[j] / static_cast<float>(T - 1);
      if (ablate_embed) xb[j] -= delta[j];
      p0_sum_[b * D + j] = xb[j];
    }
  }
  residual_tap(0, x, B, T, probe0, obs);
  for (int64_t l = 0; l < c_.num_layers; ++l) {
    if (l == fault_layer_)
      throw RuntimeFailure("injected fault (SINKSCOPE_INJECT_FAULT) in layer " + std::to_string(l));
    attention(l, x, y, B, T, probe0, obs);
    mlp(l, y, x, B, T, probe0, obs);
    residual_tap(l + 1, x, B, T, probe0, obs);
  }
  FloatArray logits;
  if (opt_.want_logits) {
    const int64_t V = c_.vocab_size;
    std::vector<float> u(x.size());
    cpu::rms_norm(x.data(), B * T, D, w_.final_norm.data(), c_.rms_norm_eps, u.data());
    logits = FloatArray({static_cast<size_t>(B), static_cast<size_t>(T), static_cast<size_t>(V)},
                        "probe,position,vocab");
    gemm_nt(B * T, V, D, u.data(), D, w_.lm_head.data(), D, logits.ptr(), V);
  }
  return logits;
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Checkpoint& ckpt, const ShardPlan& plan,
                                          ForwardComms comms, ForwardOptions options) {
  return std::make_unique<CpuBackend>(ckpt, plan, comms, std::move(options));
}

}  // namespace sinkscope
