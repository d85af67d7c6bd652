// The planner's cost model: FLOPs per token, parameters per rank, memory and time of a layout
// (docs/planner.md "Cost model").
#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"
#include "sinkscope/plan.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {

namespace {
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

double mlp_flops(const ModelConfig& c, int64_t inter) {
  return (c.gated_mlp ? 3.0 : 2.0) * 2.0 * static_cast<double>(c.hidden_size * inter);
}
int64_t kv_held(const ModelConfig& c, int tp) {
  return tp <= c.num_kv_heads ? c.num_kv_heads / tp : 1;
}

// FLOPs per token of one layer's attention projections: the part every tp rank computes (the
// latent down-projections q_a and kv_a of multi-head latent attention), the part per query head
// (q or q_b, the head's rows of kv_b, its columns of o) and per KV head (k, v).
struct ProjFlops {
  double replicated = 0, per_head = 0, per_kv_head = 0;
};
ProjFlops projection_flops(const ModelConfig& c) {
  const double D = static_cast<double>(c.hidden_size), d = static_cast<double>(c.head_dim),
               dv = static_cast<double>(c.value_dim());
  ProjFlops p;
  if (c.mla()) {
    const double Rq = static_cast<double>(c.mla_q_rank), Rkv = static_cast<double>(c.mla_kv_rank);
    p.replicated = 2.0 * D * (Rkv + static_cast<double>(c.qk_rope_dim)) + 2.0 * D * Rq;
    p.per_head = 2.0 * (Rq > 0 ? Rq : D) * d +
                 2.0 * Rkv * (static_cast<double>(c.qk_nope_dim) + dv) + 2.0 * dv * D;
  } else {
    p.per_head = 2.0 * D * d + 2.0 * dv * D;  // q, o
    p.per_kv_head = 2.0 * 2.0 * D * d;        // k, v
  }
  return p;
}

// Roles whose 2-D weights an FP8 checkpoint stores as e4m3 with block scales (every linear
// projection of the layers but the router; embedding, lm_head, norms and biases stay wide).
bool fp8_projection(Role r) {
  switch (r) {
    case Role::kQ:
    case Role::kK:
    case Role::kV:
    case Role::kQkv:
    case Role::kO:
    case Role::kMlpGate:
    case Role::kMlpUp:
    case Role::kMlpDown:
    case Role::kExpertGate:
    case Role::kExpertUp:
    case Role::kExpertDown:
    case Role::kExpertsGateUp:
    case Role::kExpertsDown:
    case Role::kSharedGate:
    case Role::kSharedUp:
    case Role::kSharedDown:
    case Role::kQA:
    case Role::kQB:
    case Role::kKvA:
    case Role::kKvB:
      return true;
    default:
      return false;
  }
}
}  // namespace

double mean_keys(int64_t window, int64_t seq_len) {
  const double T = static_cast<double>(seq_len), W = static_cast<double>(window);
  if (window <= 0 || window >= seq_len) return (T + 1) / 2;
  return (W * (W + 1) / 2 + (T - W) * W) / T;
}

ForwardFlops forward_flops(const ModelConfig& c, int64_t T) {
  ForwardFlops f;
  const double D = static_cast<double>(c.hidden_size), H = static_cast<double>(c.num_heads),
               KV = static_cast<double>(c.num_kv_heads);
  const double dqk = static_cast<double>(c.head_dim), dv = static_cast<double>(c.value_dim());
  const ProjFlops p = projection_flops(c);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    f.projections += p.replicated + H * p.per_head + KV * p.per_kv_head;
    f.attention += 2.0 * H * (dqk + dv) * mean_keys(c.window(l), T);  // QK^T and AV
    if (c.is_moe_layer(l)) {
      f.router += 2.0 * D * static_cast<double>(c.num_experts);
      f.experts += static_cast<double>(c.top_k) * mlp_flops(c, c.moe_intermediate_size);
      if (c.has_shared_expert())
        f.shared_experts += mlp_flops(c, c.shared_expert_intermediate_size) +
                            (c.shared_expert_gated ? 2.0 * D : 0.0);
    } else {
      f.dense_mlp += mlp_flops(c, c.intermediate_size);
    }
  }
  return f;
}

ShardParams shard_params(const ModelConfig& c, int tp, int ep, int etp) {
  const ShardPlan p = ShardPlan::make(tp * ep * etp, 0, tp, ep, c, etp);
  // name -> (role, expert) of the family's first spelling, as required_tensors names them.
  std::unordered_map<std::string, std::pair<Role, int64_t>> role_of;
  auto add = [&](Role r, int64_t l, int64_t e) {
    if (has_role(c, r)) role_of.emplace(tensor_name(c, r, l, e), std::make_pair(r, e));
  };
  for (Role r : {Role::kEmbed, Role::kFinalNorm, Role::kFinalNormBias, Role::kLmHead})
    add(r, -1, -1);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    for (int r = static_cast<int>(Role::kAttnNorm); r < static_cast<int>(Role::kCount); ++r) {
      const Role role = static_cast<Role>(r);
      if (role == Role::kExpertGate || role == Role::kExpertUp || role == Role::kExpertDown) {
        if (c.is_moe_layer(l))
          for (int64_t e = 0; e < c.num_experts; ++e) add(role, l, e);
      } else {
        add(role, l, -1);
      }
    }
  }
  const int64_t Hl = p.local_heads(), KVl = kv_held(c, tp), H = c.num_heads, KV = c.num_kv_heads;
  // Bytes per stored parameter: the checkpoint's width (bf16 or f16; f32), MXFP4 experts 17 bytes
  // per 32 weights, FP8 projections 1 byte plus a float32 scale per block.
  const double wide = c.dtype == "float32" ? 4.0 : 2.0;
  const double fp8 = c.fp8_block_rows > 0
                         ? 1.0 + 4.0 / static_cast<double>(c.fp8_block_rows *
                                                           std::max<int64_t>(1, c.fp8_block_cols))
                         : wide;
  ShardParams s;
  for (const RequiredTensor& t : required_tensors(c, nullptr, false)) {
    int64_t n = 1;
    for (int64_t x : t.shape) n *= x;
    s.total_model += n;
    const auto it = role_of.find(t.name);
    if (it == role_of.end()) throw RuntimeFailure("plan: tensor " + t.name + " has no role");
    const auto [role, e] = it->second;
    int64_t held = n;  // norms, router, dense MLP, shared experts, latent down-projections
    switch (role) {
      case Role::kEmbed:
        s.embedding += n;
        continue;
      case Role::kLmHead:
        continue;  // loaded only for logits (tests)
      case Role::kQ:
      case Role::kQBias:
      case Role::kO:
      case Role::kQkv:
      case Role::kQkvBias:
      case Role::kQB:   // MLA: q_b_proj's rows of this rank's heads
      case Role::kKvB:  // and kv_b_proj's
      case Role::kSinks:
        held = n / H * Hl;
        break;
      case Role::kK:
      case Role::kV:
      case Role::kKBias:
      case Role::kVBias:
        held = n / KV * KVl;
        break;
      case Role::kQNorm:
        held = c.qk_norm == QkNormKind::kFullWidth ? n / H * Hl : n;
        break;
      case Role::kKNorm:
        held = c.qk_norm == QkNormKind::kFullWidth ? n / KV * KVl : n;
        break;
      case Role::kExpertGate:
      case Role::kExpertUp:
      case Role::kExpertDown:
        held = e >= p.expert_begin && e < p.expert_end ? n / etp : 0;
        break;
      case Role::kExpertsGateUp:
      case Role::kExpertsDown:
      case Role::kExpertsGateUpBias:
        held = n / c.num_experts * p.local_experts() / etp;
        break;
      case Role::kExpertsDownBias:
        held = n / c.num_experts * p.local_experts();
        break;
      default:
        break;
    }
    s.held += held;
    const bool packed =
        c.mxfp4_experts && (role == Role::kExpertsGateUp || role == Role::kExpertsDown);
    s.held_stored_bytes += static_cast<double>(held) * (packed                 ? 17.0 / 32.0
                                                        : fp8_projection(role) ? fp8
                                                                               : wide);
  }
  return s;
}

LayoutPlan predict_layout(const PlanRequest& r, const PlanCoefficients& k, int world, int tp,
                          int ep) {
  const ModelConfig& c = r.cfg;
  const bool cuda = r.device == "cuda";
  // The backends' etp: the CPU follows Megatron-Core's default, CUDA keeps whole experts.
  const ShardPlan p = ShardPlan::make(world, 0, tp, ep, c, cuda ? 1 : 0);
  LayoutPlan o;
  o.world = world;
  o.tp = tp;
  o.ep = ep;
  o.etp = p.etp;
  o.dp = p.dp;
  const int rpn = std::min(world, r.ranks_per_node);
  o.nodes = (world + r.ranks_per_node - 1) / r.ranks_per_node;
  const ShardParams sp =
      shard_params(c, tp, c.num_experts > 0 ? ep : 1, c.num_experts > 0 ? p.etp : 1);

  const double D = static_cast<double>(c.hidden_size), T = static_cast<double>(r.seq_len);
  const double B = static_cast<double>(std::min(r.batch, (r.probes + p.dp - 1) / p.dp));
  const double Hl = static_cast<double>(p.local_heads()), KVl = static_cast<double>(kv_held(c, tp));
  const double d = static_cast<double>(c.head_dim), dv = static_cast<double>(c.value_dim());
  const double L = static_cast<double>(c.num_layers), H = static_cast<double>(c.num_heads);
  const double E = static_cast<double>(c.num_experts), K = static_cast<double>(c.top_k);
  const double Il = c.num_experts > 0 ? static_cast<double>(c.moe_intermediate_size) / p.etp : 0;
  const double act_bytes = cuda ? 2.0 : 4.0;  // bf16 on the device, fp32 on the CPU

  // ---- memory per rank
  const double held = static_cast<double>(sp.held), embed = static_cast<double>(sp.embedding);
  // Both backends dequantise on load (MXFP4 and FP8 included): fp32 on the CPU, bf16 on CUDA.
  o.weight_gib = held * (cuda ? 2.0 : 4.0) / kGiB;
  // Activations of one micro-batch: residual stream and its copies, this rank's q/k/v and
  // attention output, routed (token, expert) pairs in and out with their gate/up/h rows, one
  // 64 x T score block per thread (CPU) or the MoE and attention workspaces (CUDA), dense MLP rows.
  const double tokens_mb = B * T;
  double act = tokens_mb * (6 * D + 2 * (Hl * d + KVl * (d + dv)));
  if (c.num_experts > 0) act += tokens_mb * K / tp * p.etp * (2 * D + 3 * Il);
  if (c.any_dense_layer()) act += tokens_mb * 3 * static_cast<double>(c.intermediate_size);
  act += (cuda ? B * Hl * 128 : r.threads * 64.0) * T;
  // Recorder: attribution sums of this rank's target heads over every component slot (doubles),
  // and rank 0 gathers every rank's record.
  const double comps = 1 + L * (H + E);
  const double record_bytes = L * H * comps * 8.0;
  o.scratch_gib = (tokens_mb > 0 ? act * act_bytes : 0) / kGiB + record_bytes / kGiB;
  if (cuda) {
    // Device: bf16 shard, the embedding (bf16), activations, context and workspaces (base).
    o.device_gib = o.weight_gib + embed * 2.0 / kGiB + o.scratch_gib + k.base_mib / 1024.0;
    // Host: the records, the loader's pinned staging (two 16 MiB buffers per staging thread:
    // --threads, at most 8; src/cuda/weights.cpp) and the process. The shard's mapped file pages
    // are page cache, read once on their way to the device and reclaimable: they are not counted
    // against the node (a GPU node need not hold the model in RAM).
    const double staging_gib = std::clamp(r.threads, 1, 8) * 32.0 / 1024.0;
    o.host_gib = record_bytes / kGiB + staging_gib + 0.5;
    o.limit_gib = r.device_mem_gib;
    o.fits = o.device_gib <= r.device_mem_gib;
    if (!o.fits)
      o.why_not = "device memory per GPU above " +
                  std::to_string(static_cast<int>(r.device_mem_gib)) + " GiB";
  } else {
    // fp32 copy of the shard + its mapped file pages as stored (file-backed pages count as
    // resident): bf16, or the packed MXFP4 / FP8 bytes.
    o.host_gib = o.weight_gib + sp.held_stored_bytes / kGiB + o.scratch_gib + k.base_mib / 1024.0;
    o.limit_gib = r.node_mem_gib;
  }
  if (r.node_mem_gib > 0 && o.host_gib * rpn > r.node_mem_gib) {
    o.fits = false;
    o.why_not = (o.why_not.empty() ? "" : o.why_not + "; ") + "host memory of " +
                std::to_string(rpn) + " ranks above the node's " +
                std::to_string(static_cast<int>(r.node_mem_gib)) + " GiB";
  } else if (!cuda) {
    o.fits = true;
  }

  // ---- time per checkpoint
  const ForwardFlops f = forward_flops(c, r.seq_len);
  const double N = static_cast<double>(r.probes);
  const double dp_probes = std::ceil(N / p.dp);
  const double dp_tokens = dp_probes * T;  // tokens through this rank's dp group
  const double micro = std::ceil(dp_probes / static_cast<double>(std::max<int64_t>(1, r.batch)));
  const double all_tokens = N * T;
  // CPU: the node's ranks x threads beyond its cores share them (every rank slows alike).
  const double share =
      !cuda && k.cores > 0 ? std::min(1.0, k.cores / (rpn * static_cast<double>(r.threads))) : 1.0;
  o.cpu_share = share;
  auto rate = [&](double m) { return share * k.gemm_gflops * 1e9 * m / (m + k.gemm_half_m); };
  const ProjFlops pf = projection_flops(c);
  const double proj_rank = L * (pf.replicated + Hl * pf.per_head + KVl * pf.per_kv_head);
  const double attn_rank = f.attention * Hl / H;
  const int G = p.ep * p.etp;  // ranks of an expert group
  const double expert_rows =
      E > 0 ? std::max(1.0, tokens_mb * std::max(1.0, static_cast<double>(G) / tp) * K / E) : 1;
  // Projections and attention over the dp group's tokens (this rank's heads); the MLP block's
  // router, shared experts and dense MLPs over the rank's 1/tp slice of them; the routed experts'
  // pairs spread over every rank.
  o.gemm_s = dp_tokens * proj_rank / rate(tokens_mb) +
             all_tokens / world * f.experts / rate(expert_rows) +
             dp_tokens / tp * (f.router + f.shared_experts + f.dense_mlp) / rate(tokens_mb / tp);
  o.attention_s = dp_tokens * attn_rank / (share * k.attention_gflops * 1e9);
  // Between the products: every rank normalises, rotates and adds over its dp group's tokens.
  o.elementwise_s = k.elementwise_ns * 1e-9 * dp_tokens * L * D / 1024.0 / share;
  // Every micro-batch streams the rank's shard from memory once (as held: fp32 on the CPU).
  if (k.mem_gbps > 0) o.weights_s = micro * held * (cuda ? 2.0 : 4.0) / (share * k.mem_gbps * 1e9);
  o.forward_s = o.gemm_s + o.attention_s + o.elementwise_s + o.weights_s;
  o.record_s = k.record_fraction * o.forward_s;

  // Exchange, per collective steps x latency + bus bytes / bandwidth (the ring all-reduce over n
  // ranks: 2 (n - 1) steps moving 2 (n - 1) / n of the bytes; the all-to-all: its counts, then
  // n - 1 steps moving the (n - 1) / n of the rows that leave the rank). A group larger than a
  // node runs at the across-node rates.
  auto collective = [&](int n, bool a2a, double bytes, double count) {
    if (n <= 1) return 0.0;
    const double m = static_cast<double>(n);
    const bool across = n > r.ranks_per_node;
    const double gbps = across ? k.inter_gbps : a2a ? k.a2a_gbps : k.intra_gbps;
    const double us = across ? k.inter_latency_us : a2a ? k.a2a_latency_us : k.intra_latency_us;
    const double moved = a2a ? (m - 1) / m : 2 * (m - 1) / m;
    return count * 2 * (m - 1) * us * 1e-6 + bytes * moved / (gbps * 1e9);
  };
  // Per layer and micro-batch, both backends all-reduce in fp32 over the tp group: the attention
  // output with the heads' position-0 vectors (post-norm blocks: two collectives), the full-width
  // q/k norms' sums of squares, and the MLP block's output with every slot's position-0 and rest
  // sums and the routing counts. The all-to-all sends each (token, expert) pair of the rank's
  // 1/tp slice to the etp ranks holding the expert and back: fp32 rows with the expert id (CPU),
  // bf16 rows (CUDA).
  const bool post_norm = c.block == BlockKind::kPostNorm;
  const double row_bytes = cuda ? 2.0 * D : 4.0 * (D + 1);
  double ex = 0;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const bool moe = c.is_moe_layer(l);
    const double S = moe ? E + (c.has_shared_expert() ? 1 : 0) : 1;
    double attn_bytes = 4.0 * (dp_tokens * D + dp_probes * H * 2 * D);
    double attn_count = post_norm ? 2 : 1;
    if (c.qk_norm == QkNormKind::kFullWidth) {
      attn_bytes += (cuda ? 4.0 : 8.0) * 2 * dp_tokens;
      attn_count += 1;
    }
    ex += collective(tp, false, attn_bytes, micro * attn_count);
    const double mlp_bytes =
        4.0 * (dp_tokens * D + dp_probes * (2 * S * D + S + (moe ? E : 0)) + micro * (moe ? E : 0));
    ex += collective(tp, false, mlp_bytes, micro);
    if (moe) ex += collective(G, true, 2.0 * dp_tokens / tp * K * p.etp * row_bytes, 2.0 * micro);
  }
  o.exchange_s = ex;
  const double pass = o.forward_s + o.record_s + o.exchange_s;
  // Ablated passes: the causal profile's 1 + 3 L (embedding; each layer whole, attention, MLP).
  const double passes = r.ablation_passes >= 0 ? static_cast<double>(r.ablation_passes) : 1 + 3 * L;
  o.ablation_s = passes * pass;
  // Load: this rank's shard as stored and, on CUDA, the embedding (bf16).
  o.load_s = (sp.held_stored_bytes + (cuda ? embed * 2.0 : 0)) / (k.load_gbps * 1e9);
  o.checkpoint_s = k.startup_s + o.load_s + pass + o.ablation_s;
  const double parallel =
      r.max_parallel > 0 ? static_cast<double>(r.max_parallel) : static_cast<double>(r.checkpoints);
  o.sweep_s =
      std::ceil(static_cast<double>(r.checkpoints) / std::max(1.0, parallel)) * o.checkpoint_s;
  return o;
}

}  // namespace sinkscope

namespace sinkscope {

double elementwise_ns_from(const ModelConfig& cfg, const std::string& device, int64_t probes,
                           int64_t seq_len, double measured_s, PlanCoefficients k) {
  PlanRequest r;
  r.cfg = cfg;
  r.device = device;
  r.probes = probes;
  r.seq_len = seq_len;
  r.batch = probes;
  r.ranks_per_node = 1;
  r.nodes = 1;
  r.device_mem_gib = 1e9;
  k.elementwise_ns = 0;
  k.cores = 0;  // the rates were measured as this forward ran
  const LayoutPlan p = predict_layout(r, k, 1, 1, 1);
  const double units = static_cast<double>(probes * seq_len * cfg.num_layers) *
                       static_cast<double>(cfg.hidden_size) / 1024.0;
  return std::max(0.0, measured_s - p.gemm_s - p.attention_s - p.weights_s) / units * 1e9;
}

}  // namespace sinkscope
