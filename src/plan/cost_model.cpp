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
}  // namespace

ForwardFlops forward_flops(const ModelConfig& c, int64_t T) {
  ForwardFlops f;
  const double D = static_cast<double>(c.hidden_size), d = static_cast<double>(c.head_dim),
               H = static_cast<double>(c.num_heads), KV = static_cast<double>(c.num_kv_heads);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const double keys = c.window(l) > 0 ? std::min<double>(static_cast<double>(c.window(l)),
                                                           (static_cast<double>(T) + 1) / 2)
                                        : (static_cast<double>(T) + 1) / 2;
    f.projections += 2.0 * D * (2 * H * d + 2 * KV * d);  // q, o; k, v
    f.attention += 2.0 * 2.0 * H * d * keys;              // QK^T and AV
    if (c.is_moe_layer(l)) {
      f.router += 2.0 * D * static_cast<double>(c.num_experts);
      f.experts += static_cast<double>(c.top_k) * mlp_flops(c, c.moe_intermediate_size);
      if (c.has_shared_expert())
        f.experts += mlp_flops(c, c.shared_expert_intermediate_size) + 2.0 * D;
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
  ShardParams s;
  for (const RequiredTensor& t : required_tensors(c, nullptr, false)) {
    int64_t n = 1;
    for (int64_t x : t.shape) n *= x;
    s.total_model += n;
    const auto it = role_of.find(t.name);
    if (it == role_of.end()) throw RuntimeFailure("plan: tensor " + t.name + " has no role");
    const auto [role, e] = it->second;
    switch (role) {
      case Role::kEmbed:
        s.embedding += n;
        break;
      case Role::kLmHead:
        break;  // loaded only for logits (tests)
      case Role::kQ:
      case Role::kQBias:
      case Role::kO:
        s.held += n / H * Hl;
        break;
      case Role::kQkv:
      case Role::kQkvBias:
        s.held += n / H * Hl;
        break;
      case Role::kK:
      case Role::kV:
      case Role::kKBias:
      case Role::kVBias:
        s.held += n / KV * KVl;
        break;
      case Role::kQNorm:
        s.held += c.qk_norm == QkNormKind::kFullWidth ? n / H * Hl : n;
        break;
      case Role::kKNorm:
        s.held += c.qk_norm == QkNormKind::kFullWidth ? n / KV * KVl : n;
        break;
      case Role::kExpertGate:
      case Role::kExpertUp:
      case Role::kExpertDown:
        if (e >= p.expert_begin && e < p.expert_end) s.held += n / etp;
        break;
      case Role::kExpertsGateUp:
      case Role::kExpertsDown:
      case Role::kExpertsGateUpBias:
        s.held += n / c.num_experts * p.local_experts() / etp;
        break;
      case Role::kExpertsDownBias:
        s.held += n / c.num_experts * p.local_experts();
        break;
      case Role::kSinks:
        s.held += n / H * Hl;
        break;
      default:
        s.held += n;
        break;  // norms, router, dense MLP, shared expert: replicated
    }
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
  const double d = static_cast<double>(c.head_dim), L = static_cast<double>(c.num_layers);
  const double E = static_cast<double>(c.num_experts), K = static_cast<double>(c.top_k);
  const double Il = c.num_experts > 0 ? static_cast<double>(c.moe_intermediate_size) / p.etp : 0;
  const double act_bytes = cuda ? 2.0 : 4.0;  // bf16 on the device, fp32 on the CPU

  // ---- memory per rank
  const double held = static_cast<double>(sp.held), embed = static_cast<double>(sp.embedding);
  o.weight_gib = held * (cuda ? 2.0 : 4.0) / kGiB;
  // Activations of one micro-batch: residual stream and its copies, this rank's q/k/v and
  // attention output, routed (token, expert) pairs in and out with their gate/up/h rows, one
  // 64 x T score block per thread (CPU) or the MoE and attention workspaces (CUDA), dense MLP rows.
  const double tokens_mb = B * T;
  double act = tokens_mb * (6 * D + 2 * (Hl + 2 * KVl) * d);
  if (c.num_experts > 0) act += tokens_mb * K / tp * p.etp * (2 * D + 3 * Il);
  if (c.any_dense_layer()) act += tokens_mb * 3 * static_cast<double>(c.intermediate_size);
  act += (cuda ? B * Hl * 128 : r.threads * 64.0) * T;
  // Recorder: attribution sums of this rank's target heads over every component slot (doubles),
  // and rank 0 gathers every rank's record.
  const double comps = 1 + L * (static_cast<double>(c.num_heads) + E);
  const double record_bytes = L * static_cast<double>(c.num_heads) * comps * 8.0;
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
    // fp32 copy of the shard + its mapped bf16 file pages (file-backed pages count as resident).
    o.host_gib = o.weight_gib + held * 2.0 / kGiB + o.scratch_gib + k.base_mib / 1024.0;
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
  const double dp_tokens = std::ceil(N / p.dp) * T;  // tokens through this rank's dp group
  const double all_tokens = N * T;
  auto rate = [&](double m) { return k.gemm_gflops * 1e9 * m / (m + k.gemm_half_m); };
  const double proj_rank = L * 2.0 * D * (2 * Hl * d + 2 * KVl * d);
  const double attn_rank = f.attention * Hl / static_cast<double>(c.num_heads);
  const int G = p.ep * p.etp;  // ranks of an expert group
  const double expert_rows =
      E > 0 ? std::max(1.0, tokens_mb * std::max(1.0, static_cast<double>(G) / tp) * K / E) : 1;
  o.gemm_s =
      dp_tokens * proj_rank / rate(tokens_mb) + all_tokens / world * f.experts / rate(expert_rows) +
      dp_tokens / tp * f.router / rate(tokens_mb / tp) + dp_tokens * f.dense_mlp / rate(tokens_mb);
  o.attention_s = dp_tokens * attn_rank / (k.attention_gflops * 1e9);
  // Between the products: every rank normalises, rotates and adds over its dp group's tokens.
  o.elementwise_s = k.elementwise_ns * 1e-9 * dp_tokens * L * D / 1024.0;
  o.forward_s = o.gemm_s + o.attention_s + o.elementwise_s;
  o.record_s = k.record_fraction * o.forward_s;
  // Exchange: the tp all-reduces of each layer's attention output and MoE output (ring: 2 (n-1)/n
  // of the bytes), the ep all-to-all of each rank's routed pairs out and back.
  double moe_l = 0;
  for (int64_t l = 0; l < c.num_layers; ++l) moe_l += c.is_moe_layer(l) ? 1 : 0;
  auto bw = [&](int group) {
    return (group > r.ranks_per_node ? k.inter_gbps : k.intra_gbps) * 1e9;
  };
  double ex = 0;
  if (tp > 1) ex += (L + moe_l) * dp_tokens * D * act_bytes * 2.0 * (tp - 1) / tp / bw(tp);
  if (G > 1) ex += moe_l * 2.0 * dp_tokens / tp * K * p.etp * D * act_bytes * (G - 1) / G / bw(G);
  o.exchange_s = ex;
  const double pass = o.forward_s + o.record_s + o.exchange_s;
  // Ablated passes: the causal profile's 1 + 3 L (embedding; each layer whole, attention, MLP).
  const double passes = r.ablation_passes >= 0 ? static_cast<double>(r.ablation_passes) : 1 + 3 * L;
  o.ablation_s = passes * pass;
  // Load: this rank's shard (bf16 on disk) and, on CUDA, the embedding.
  o.load_s = (held + (cuda ? embed : 0)) * 2.0 / (k.load_gbps * 1e9);
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
  const LayoutPlan p = predict_layout(r, k, 1, 1, 1);
  const double units = static_cast<double>(probes * seq_len * cfg.num_layers) *
                       static_cast<double>(cfg.hidden_size) / 1024.0;
  return std::max(0.0, measured_s - p.gemm_s - p.attention_s) / units * 1e9;
}

}  // namespace sinkscope
