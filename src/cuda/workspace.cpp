#include "cuda/workspace.hpp"

#include <algorithm>

#include "cuda/kernels.cuh"
#include "sinkscope/components.hpp"

namespace sinkscope::cuda {

void Workspace::plan(const ModelConfig& c, const ShardPlan& p, int tp_size, int64_t B, int64_t T,
                     bool record, bool want_logits) {
  auto r = [](auto& buf, int64_t elems) {
    buf.reserve(static_cast<size_t>(std::max<int64_t>(elems, 1)));
  };
  const int64_t D = c.hidden_size, d = c.head_dim, dp = (d + 15) / 16 * 16, H = c.num_heads;
  const int64_t Hl = p.local_heads(), KVl = p.local_kv_heads(), qw = Hl * d, kw = KVl * d;
  // The attention output's width (value dims; below qw under latent attention), and the width of
  // the rows the key attribution contracts (the latent and the rope key under latent attention).
  const int64_t zw = Hl * c.value_dim(), ra = c.mla() ? c.mla_kv_rank + c.qk_rope_dim : 0,
                gw = std::max(kw, ra);
  const int64_t E = c.num_experts, K = c.top_k, E1 = std::max<int64_t>(E, 1);
  const int64_t S = E1 + (c.has_shared_expert() ? 1 : 0);
  const int64_t Ctot = ComponentLayout(c).count_before(c.num_layers);
  const int64_t BT = B * T, n = (BT + tp_size - 1) / tp_size, npairs = n * K;
  const int Bi = static_cast<int>(B), Ti = static_cast<int>(T);
  const bool post_norm = c.block == BlockKind::kPostNorm;

  r(x, BT * D);
  r(tokens, BT);
  r(u, BT * D);
  r(inv_rx, BT);
  r(rnorms, BT);
  r(norms, BT);
  if (c.block == BlockKind::kParallel) r(xpar, BT * D);
  r(qkv, BT * (qw + 2 * kw));
  r(Qa, BT * Hl * dp);
  r(Ka, BT * KVl * dp);
  r(Va, BT * KVl * dp);
  r(Vt, k::flash_attention_scratch(Bi, Ti, static_cast<int>(KVl), static_cast<int>(dp)));
  r(z, BT * zw);
  if (c.mla()) {
    const int64_t Rq = c.mla_q_rank, Rkv = c.mla_kv_rank;
    r(mla_a32, BT * (Rq + Rkv + c.qk_rope_dim));
    r(mla_kv, BT * Hl * (c.qk_nope_dim + c.value_dim()));
    r(inv_rl, BT);
    r(mla_q16, BT * Rq);
    r(mla_lat16, BT * Rkv);
  }
  r(a0, B * Hl * T);
  r(a0_mean, B * Hl);
  r(tp_pack, BT * D + B * H * 2 * D);
  if (c.qk_norm == QkNormKind::kFullWidth) {
    r(fw_sums, 2 * BT);
    r(inv_rk_rows, BT);
  }
  if (post_norm) r(out_scale, BT);
  r(delta, B * Ctot * D);
  r(p0_sum, B * D);
  if (record) {
    if (post_norm) r(zs, BT * zw);
    // One scratch for the column means' partial sums (the residual, latent attention's queries) and
    // qbar's (qk_norm_rope); the steps that use it run one after the other on the stream. z's
    // column means come from the head write norms' pass (norm_partial).
    r(partial, std::max({k::column_mean_scratch(Bi, Ti, static_cast<int>(D)),
                         k::column_mean_scratch(Bi, Ti, static_cast<int>(std::max(qw, D))),
                         k::qk_norm_rope_scratch(Bi, Ti, static_cast<int>(Hl),
                                                 static_cast<int>(KVl), static_cast<int>(d))}));
    r(colmean, B * D);
    r(qbar, B * qw);
    r(zbar, B * zw);
    r(wp0, B * Hl);
    r(wrest, B * Hl);
    r(norm_partial,
      k::head_write_norms_scratch(Bi, static_cast<int>(Hl), static_cast<int>(c.value_dim())));
    if (c.mla()) r(wkg, gw * D);  // latent attention: gamma W_kva^T in fp32
    // Latent attention contracts G = delta W^T [B, Ctot, Rkv + rope] with qk; otherwise G holds
    // the heads' key directions [B, Hl, D] (circuit_kernels.cuh, key_directions).
    r(G, c.mla() ? B * Ctot * gw : B * Hl * D);
    r(idrows, B * 2 * D);
    r(kid, B * 2 * gw);
    r(k0m, B * kw);
    r(k0s, B * kw);
    r(qk, B * std::max(qw, Hl * ra));
    r(attr, B * Hl * Ctot);
    r(median, 1);
    if (c.learned_sinks) {
      r(sink_mass, B * Hl * T);
      r(sink_mean, B * Hl);
    }
    r(median_scratch, static_cast<int64_t>(k::abs_median_scratch_bytes()));
  }
  r(mbuf, BT * D + 2 * B * S * D + B * S + B * E1 + E1);
  // The MLP: each tp rank takes at most n of the BT rows; a dense layer's segments and items are at
  // most 5 ints per probe.
  r(ipack, std::max(2 * npairs, 5 * B));
  if (E > 0) {
    r(u32, BT * D);
    r(u_split, 2 * BT * D);
    r(router_logits, n * E);
    r(ids, npairs);
    r(tw, npairs);
    r(gap, n);
    r(pos_w, npairs);
    r(pos_tok, npairs);
    r(cnt_dev, E + 1);
    r(off_dev, E);
    r(sort_scratch, k::expert_rank_scratch(npairs, static_cast<int>(E)));
    if (record)
      r(rest_scratch, k::expert_rest_sums_scratch(static_cast<int>(E), Bi, static_cast<int>(S),
                                                  static_cast<int>(D), npairs));
    r(out, npairs * D);
  }
  if (c.has_shared_expert()) {
    r(shared_out, n * D);
    r(shared_pack, 5 * B);
  }
  if (c.any_dense_layer() && (!c.gated_mlp || c.act != Activation::kSilu || c.mlp_bias))
    r(hf, n * (c.gated_mlp ? 2 : 1) * c.intermediate_size);
  if (want_logits) r(logits, BT * c.vocab_size);
}

}  // namespace sinkscope::cuda
