#include "cpu/mla.hpp"

#include <algorithm>

#include "cpu/kernels.hpp"

namespace sinkscope::cpu {
namespace {

// transformers' apply_rotary_pos_emb_interleave order: (x0, x2, ..., x1, x3, ...).
void deinterleave(float* x, int64_t n, std::vector<float>& tmp) {
  tmp.assign(x, x + n);
  for (int64_t j = 0; j < n / 2; ++j) {
    x[j] = tmp[static_cast<size_t>(2 * j)];
    x[j + n / 2] = tmp[static_cast<size_t>(2 * j + 1)];
  }
}

}  // namespace

void mla_project(const ModelConfig& c, const LayerWeights& L, const float* u, int64_t B, int64_t T,
                 int64_t Hl, const double* inv_freq, std::vector<float>& q, std::vector<float>& k,
                 std::vector<float>& v, std::vector<float>& inv_rl, std::vector<float>& k0) {
  const MlaWeights& W = L.mla;
  const int64_t D = c.hidden_size, BT = B * T, dn = c.qk_nope_dim, dr = c.qk_rope_dim,
                dv = c.v_head_dim, dqk = dn + dr, Rq = c.mla_q_rank, Rkv = c.mla_kv_rank,
                ra = Rkv + dr, dkv = dn + dv, qw = Hl * dqk;
  const float af = static_cast<float>(c.rope.attention_factor);
  q.assign(static_cast<size_t>(BT * qw), 0.f);
  if (Rq > 0) {
    std::vector<float> qa(static_cast<size_t>(BT * Rq));
    gemm_nt(BT, Rq, D, u, D, W.q_a.data(), D, qa.data(), Rq);
    rms_norm(qa.data(), BT, Rq, W.q_a_norm.data(), kMlaLatentEps, qa.data());
    gemm_nt(BT, qw, Rq, qa.data(), Rq, W.q_b.data(), Rq, q.data(), qw);
  } else {
    gemm_nt(BT, qw, D, u, D, L.q.data(), D, q.data(), qw);
  }
  // The compressed kv: latent [Rkv] (normed) and the shared rope key [dr].
  std::vector<float> a(static_cast<size_t>(BT * ra)), lat(static_cast<size_t>(BT * Rkv)),
      inv(static_cast<size_t>(BT));
  gemm_nt(BT, ra, D, u, D, W.kv_a.data(), D, a.data(), ra);
  for (int64_t r = 0; r < BT; ++r) std::copy_n(a.data() + r * ra, Rkv, lat.data() + r * Rkv);
  rms_norm(lat.data(), BT, Rkv, W.kv_a_norm.data(), kMlaLatentEps, lat.data(), inv.data());
  std::vector<float> kv(static_cast<size_t>(BT * Hl * dkv));
  gemm_nt(BT, Hl * dkv, Rkv, lat.data(), Rkv, W.kv_b.data(), Rkv, kv.data(), Hl * dkv);

  // Rope parts: de-interleaved when the config says so, rotated, scaled by the attention factor.
  std::vector<float> kr(static_cast<size_t>(BT * dr)), tmp;
  for (int64_t r = 0; r < BT; ++r) {
    float* x = kr.data() + r * dr;
    std::copy_n(a.data() + r * ra + Rkv, dr, x);
    if (c.rope.interleave) deinterleave(x, dr, tmp);
    for (int64_t h = 0; h < Hl && c.rope.interleave; ++h)
      deinterleave(q.data() + r * qw + h * dqk + dn, dr, tmp);
  }
  for (int64_t b = 0; b < B; ++b) {
    rope(kr.data() + b * T * dr, T, dr, dr, 0, inv_freq);
    for (int64_t h = 0; h < Hl; ++h)
      rope(q.data() + b * T * qw + h * dqk + dn, T, dr, qw, 0, inv_freq);
  }
  if (af != 1.f) {
    for (auto& x : kr) x *= af;
    for (int64_t r = 0; r < BT; ++r)
      for (int64_t h = 0; h < Hl; ++h)
        for (int64_t j = 0; j < dr; ++j) q[r * qw + h * dqk + dn + j] *= af;
  }

  k.assign(static_cast<size_t>(BT * qw), 0.f);
  v.assign(static_cast<size_t>(BT * Hl * dv), 0.f);
  for (int64_t r = 0; r < BT; ++r)
    for (int64_t h = 0; h < Hl; ++h) {
      const float* src = kv.data() + r * Hl * dkv + h * dkv;
      std::copy_n(src, dn, k.data() + r * qw + h * dqk);
      std::copy_n(kr.data() + r * dr, dr, k.data() + r * qw + h * dqk + dn);
      std::copy_n(src + dn, dv, v.data() + (r * Hl + h) * dv);
    }
  inv_rl.resize(static_cast<size_t>(B));
  k0.resize(static_cast<size_t>(B * qw));
  for (int64_t b = 0; b < B; ++b) {
    inv_rl[static_cast<size_t>(b)] = inv[static_cast<size_t>(b * T)];
    std::copy_n(k.data() + b * T * qw, qw, k0.data() + b * qw);
  }
}

void mla_attribute(const ModelConfig& c, const LayerWeights& L, const float* src, int64_t C,
                   int64_t Hl, float inv_rx, float inv_rl, const float* qbar, float scale,
                   float* attr, float* k0_sum) {
  const MlaWeights& W = L.mla;
  const int64_t D = c.hidden_size, dn = c.qk_nope_dim, dr = c.qk_rope_dim, dv = c.v_head_dim,
                dqk = dn + dr, Rkv = c.mla_kv_rank, ra = Rkv + dr, dkv = dn + dv;
  const float af = static_cast<float>(c.rope.attention_factor);
  // Every source through kv_a_proj once: A [(C + 1), Rkv + rope].
  std::vector<float> A(static_cast<size_t>((C + 1) * ra));
  gemm_nt(C + 1, ra, D, src, D, W.kv_a.data(), D, A.data(), ra);
  // Per row: the latent scaled as position 0 scales it, gamma_kv (.) l / (r_x r_l), and the rope
  // key af * P l_rope / r_x (P the de-interleave; RoPE is the identity at position 0 but for af).
  std::vector<float> lat(static_cast<size_t>((C + 1) * Rkv)), rk(static_cast<size_t>((C + 1) * dr)),
      tmp;
  for (int64_t r = 0; r <= C; ++r) {
    for (int64_t j = 0; j < Rkv; ++j)
      lat[r * Rkv + j] = A[r * ra + j] * W.kv_a_norm[j] * inv_rl * inv_rx;
    float* x = rk.data() + r * dr;
    std::copy_n(A.data() + r * ra + Rkv, dr, x);
    if (c.rope.interleave) deinterleave(x, dr, tmp);
    for (int64_t j = 0; j < dr; ++j) x[j] *= af * inv_rx;
  }
  // qbar_h . k_nope_h(lat) = lat . (W_kvb,nope,h^T qbar_nope,h): one Rkv-vector per head.
  std::vector<float> wq(static_cast<size_t>(Hl * Rkv), 0.f);
  for (int64_t h = 0; h < Hl; ++h)
    for (int64_t j = 0; j < dn; ++j) {
      const float qj = qbar[h * dqk + j];
      const float* row = W.kv_b.data() + (h * dkv + j) * Rkv;
      for (int64_t t = 0; t < Rkv; ++t) wq[h * Rkv + t] += qj * row[t];
    }
  std::vector<float> nope(static_cast<size_t>(C * Hl));
  if (C > 0) gemm_nt(C, Hl, Rkv, lat.data(), Rkv, wq.data(), Rkv, nope.data(), Hl);
  for (int64_t h = 0; h < Hl; ++h)
    for (int64_t s = 0; s < C; ++s) {
      double acc = nope[s * Hl + h];
      for (int64_t j = 0; j < dr; ++j)
        acc += static_cast<double>(rk[s * dr + j]) * qbar[h * dqk + dn + j];
      attr[h * C + s] = static_cast<float>(acc) * scale;
    }
  // The sum row through the whole key: k0_sum = [kv_b,nope,h lat_C ; rope_C] per head.
  const float* lc = lat.data() + C * Rkv;
  for (int64_t h = 0; h < Hl; ++h) {
    for (int64_t j = 0; j < dn; ++j) {
      const float* row = W.kv_b.data() + (h * dkv + j) * Rkv;
      double acc = 0;
      for (int64_t t = 0; t < Rkv; ++t) acc += static_cast<double>(row[t]) * lc[t];
      k0_sum[h * dqk + j] = static_cast<float>(acc);
    }
    std::copy_n(rk.data() + C * dr, dr, k0_sum + h * dqk + dn);
  }
}

}  // namespace sinkscope::cpu

#include <cmath>
#include <numeric>

namespace sinkscope::cpu {

void route_sigmoid_groups(const ModelConfig& c, const float* logits, int64_t n, const float* bias,
                          int32_t* topk, float* weight) {
  const int64_t E = c.num_experts, K = c.top_k, G = c.n_group, per = E / G, TG = c.topk_group;
  std::vector<float> score(static_cast<size_t>(E)), choice(static_cast<size_t>(E));
  std::vector<double> group(static_cast<size_t>(G));
  std::vector<int32_t> order(static_cast<size_t>(std::max(E, G)));
  for (int64_t r = 0; r < n; ++r) {
    const float* lr = logits + r * E;
    // float32 as transformers (the router runs in float32 in every model dtype).
    for (int64_t e = 0; e < E; ++e) {
      score[e] = 1.f / (1.f + std::exp(-lr[e]));
      choice[e] = score[e] + bias[e];
    }
    for (int64_t g = 0; g < G; ++g) {
      float b1 = -INFINITY, b2 = -INFINITY;
      for (int64_t e = g * per; e < (g + 1) * per; ++e) {
        if (choice[e] > b1) {
          b2 = b1;
          b1 = choice[e];
        } else if (choice[e] > b2) {
          b2 = choice[e];
        }
      }
      group[g] = static_cast<double>(b1 + b2);
    }
    std::iota(order.begin(), order.begin() + G, 0);
    std::partial_sort(
        order.begin(), order.begin() + TG, order.begin() + G,
        [&](int32_t a, int32_t b) { return group[a] != group[b] ? group[a] > group[b] : a < b; });
    std::vector<char> keep(static_cast<size_t>(G), 0);
    for (int64_t g = 0; g < TG; ++g) keep[order[g]] = 1;
    for (int64_t e = 0; e < E; ++e)
      if (!keep[e / per]) choice[e] = 0.f;
    std::iota(order.begin(), order.begin() + E, 0);
    std::partial_sort(order.begin(), order.begin() + K, order.begin() + E,
                      [&](int32_t a, int32_t b) {
                        return choice[a] != choice[b] ? choice[a] > choice[b] : a < b;
                      });
    float sum = 0.f;
    for (int64_t j = 0; j < K; ++j) sum += score[order[j]];
    for (int64_t j = 0; j < K; ++j) {
      topk[r * K + j] = order[j];
      const float w = c.norm_topk_prob ? score[order[j]] / (sum + 1e-20f) : score[order[j]];
      weight[r * K + j] = w * static_cast<float>(c.routed_scaling_factor);
    }
  }
}

}  // namespace sinkscope::cpu
