#include "model/layer_plan.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "model/median.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/model.hpp"

namespace sinkscope {

LayerPlan make_layer_plan(const ModelConfig& c, const std::vector<Ablation>& ablations,
                          int world_rank) {
  const ComponentLayout layout(c);
  LayerPlan p;
  p.block = c.block;
  p.norm = c.norm;
  p.post_norm = c.block == BlockKind::kPostNorm;
  p.parallel_residual = c.block == BlockKind::kParallel;
  p.heads = c.num_heads;
  p.slots_per_layer = std::max<int64_t>(c.num_experts, 1) + (c.has_shared_expert() ? 1 : 0);
  p.components = layout.count_before(c.num_layers);
  p.embed_component = layout.embed();
  p.embed_ablated = has_ablation(ablations, 0, ComponentKind::kEmbedding, 0);
  int64_t fault_layer = -1;
  if (const char* f = std::getenv("SINKSCOPE_INJECT_FAULT")) {
    int rank = -1, layer = -1;
    if (std::sscanf(f, "%d:%d", &rank, &layer) == 2 && rank == world_rank) fault_layer = layer;
  }
  p.layers.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    PlannedLayer& L = p.layers[static_cast<size_t>(l)];
    L.layer = l;
    L.moe = c.is_moe_layer(l);
    L.shared_expert = L.moe && c.has_shared_expert();
    L.sources = layout.count_before(l);
    L.head_component0 = layout.head(l, 0);
    L.mlp_component0 = layout.expert(l, 0);
    L.head_ablated.resize(static_cast<size_t>(c.num_heads));
    for (int64_t h = 0; h < c.num_heads; ++h)
      L.head_ablated[static_cast<size_t>(h)] = has_ablation(ablations, l, ComponentKind::kHead, h);
    auto add = [&](ComponentKind kind, int64_t index) {
      L.slots.push_back(
          {kind, index, layout.slot(kind, l, index), has_ablation(ablations, l, kind, index)});
    };
    if (L.moe) {
      for (int64_t e = 0; e < c.num_experts; ++e) add(ComponentKind::kExpert, e);
      if (L.shared_expert) add(ComponentKind::kSharedExpert, 0);
    } else {
      add(ComponentKind::kMlp, 0);
    }
    L.slot_ablated.assign(static_cast<size_t>(p.slots_per_layer), 0);
    for (size_t s = 0; s < L.slots.size(); ++s) L.slot_ablated[s] = L.slots[s].ablated ? 1 : 0;
    L.inject_fault = l == fault_layer;
  }
  return p;
}

void run_layers(const LayerPlan& plan, LayerOps& ops, const IntArray& tokens) {
  if (tokens.shape.size() != 2 || tokens.shape[1] < 2)
    throw InputError("probes need at least 2 positions (position 0 and the rest)");
  ops.embed(tokens);
  ops.residual(0);
  for (const PlannedLayer& layer : plan.layers) {
    if (layer.inject_fault)
      throw RuntimeFailure("injected fault (SINKSCOPE_INJECT_FAULT) in layer " +
                           std::to_string(layer.layer));
    ops.begin_layer(layer);
    ops.attention(layer);
    ops.mlp(layer);
    ops.residual(layer.layer + 1);
  }
}

namespace {

[[noreturn]] void non_finite(const TapSource& src, int64_t layer, const char* component,
                             int64_t probe) {
  throw RuntimeFailure(non_finite_message(layer, component, probe, src.where, src.suffix));
}

}  // namespace

void emit_residual_tap(ForwardObserver& obs, const TapSource& src, int64_t index, const float* x0,
                       const float* row_norms, float abs_median_probe0) {
  const int64_t B = src.B, T = src.T;
  std::vector<float> norm_p0(static_cast<size_t>(B)), rest_median(static_cast<size_t>(B)),
      abs_median(static_cast<size_t>(B), std::nanf("")), rest;
  for (int64_t b = 0; b < B; ++b) {
    norm_p0[static_cast<size_t>(b)] = row_norms[b * T];
    rest.assign(row_norms + b * T + 1, row_norms + (b + 1) * T);
    double sum = 0;
    for (float v : rest) sum += v;
    if (!std::isfinite(sum) || !std::isfinite(norm_p0[static_cast<size_t>(b)]))
      non_finite(src, index - 1, index == 0 ? "embedding" : "residual", src.probe0 + b);
    rest_median[static_cast<size_t>(b)] = static_cast<float>(median_of(rest));
  }
  if (src.probe0 == 0 && B > 0) abs_median[0] = abs_median_probe0;  // Sun et al.: probe 0 only
  ResidualTap tap{
      index, B, T, src.D, src.probe0, x0, norm_p0.data(), rest_median.data(), abs_median.data()};
  obs.on_residual(tap);
}

void emit_attention_tap(ForwardObserver& obs, const TapSource& src, const AttentionTap& tap) {
  for (int64_t b = 0; b < tap.B; ++b) {
    double sum = 0;
    for (int64_t h = 0; h < tap.local_heads; ++h)
      sum +=
          tap.write_p0_norm[b * tap.local_heads + h] + tap.write_rest_norm[b * tap.local_heads + h];
    if (!std::isfinite(sum)) non_finite(src, tap.layer, "attention", src.probe0 + b);
  }
  obs.on_attention(tap);
}

void emit_mlp_tap(ForwardObserver& obs, const TapSource& src, const LayerPlan& plan,
                  const PlannedLayer& layer, const float* m_row_norms, const float* slot_p0_norms,
                  const float* p0_routed, const float* rest_routed) {
  const int64_t B = src.B, T = src.T, S = plan.slots_per_layer;
  int64_t E = 0;
  for (const PlannedSlot& s : layer.slots) E += s.kind == ComponentKind::kExpert ? 1 : 0;
  const int64_t E1 = std::max<int64_t>(E, 1);
  std::vector<float> out_p0(static_cast<size_t>(B)), out_rest(static_cast<size_t>(B)),
      expert_p0(static_cast<size_t>(B * E1), 0.f);
  for (int64_t b = 0; b < B; ++b) {
    out_p0[static_cast<size_t>(b)] = m_row_norms[b * T];
    double rest = 0;
    for (int64_t i = 1; i < T; ++i) rest += m_row_norms[b * T + i];
    out_rest[static_cast<size_t>(b)] = static_cast<float>(rest / static_cast<double>(T - 1));
    for (size_t s = 0; s < layer.slots.size(); ++s)
      if (layer.slots[s].kind == ComponentKind::kExpert)
        expert_p0[static_cast<size_t>(b * E + layer.slots[s].index)] =
            slot_p0_norms[b * S + static_cast<int64_t>(s)];
    if (!std::isfinite(out_p0[static_cast<size_t>(b)] + out_rest[static_cast<size_t>(b)]))
      non_finite(src, layer.layer, layer.moe ? "moe" : "mlp", src.probe0 + b);
  }
  MlpTap tap{layer.layer,
             B,
             T,
             src.D,
             src.probe0,
             layer.moe,
             E,
             out_p0.data(),
             out_rest.data(),
             expert_p0.data(),
             p0_routed,
             rest_routed};
  obs.on_mlp(tap);
}

}  // namespace sinkscope
