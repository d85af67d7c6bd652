#include "sinkscope/components.hpp"

#include <algorithm>

#include "sinkscope/error.hpp"

namespace sinkscope {

const std::vector<ComponentKindInfo>& component_kinds() {
  static const std::vector<ComponentKindInfo> kinds = {
      {ComponentKind::kEmbedding, "embedding", "attr_embed", false, false},
      {ComponentKind::kHead, "head", "attr_head", true, true},
      {ComponentKind::kExpert, "expert", "attr_expert", true, true},
      {ComponentKind::kMlp, "mlp", "attr_mlp", true, false},
      {ComponentKind::kSharedExpert, "shared_expert", "attr_shared_expert", true, false},
  };
  return kinds;
}

const ComponentKindInfo& component_kind_info(ComponentKind kind) {
  for (const auto& k : component_kinds())
    if (k.kind == kind) return k;
  throw RuntimeFailure("unknown component kind " + std::to_string(static_cast<int>(kind)));
}

int64_t component_count(const ModelConfig& c, ComponentKind kind, int64_t layer) {
  switch (kind) {
    case ComponentKind::kEmbedding:
      return layer == 0 ? 1 : 0;
    case ComponentKind::kHead:
      return c.num_heads;
    case ComponentKind::kExpert:
      return c.is_moe_layer(layer) ? c.num_experts : 0;
    case ComponentKind::kMlp:
      return c.is_moe_layer(layer) ? 0 : 1;
    case ComponentKind::kSharedExpert:
      return c.is_moe_layer(layer) && c.has_shared_expert() ? 1 : 0;
  }
  return 0;
}

int64_t component_width(const ModelConfig& c, ComponentKind kind) {
  if (kind == ComponentKind::kHead) return c.num_heads;
  if (kind == ComponentKind::kExpert) return c.num_experts;
  return 1;
}

ComponentLayout::ComponentLayout(const ModelConfig& c)
    : heads_(c.num_heads),
      mlp_slots_(std::max<int64_t>(c.num_experts, 1)),
      stride_(c.num_heads + std::max<int64_t>(c.num_experts, 1) + (c.has_shared_expert() ? 1 : 0)) {
}

int64_t ComponentLayout::slot(ComponentKind kind, int64_t layer, int64_t index) const {
  switch (kind) {
    case ComponentKind::kEmbedding:
      return embed();
    case ComponentKind::kHead:
      return head(layer, index);
    case ComponentKind::kExpert:
      return expert(layer, index);
    case ComponentKind::kMlp:
      return mlp(layer);
    case ComponentKind::kSharedExpert:
      return shared_expert(layer);
  }
  return -1;
}

std::vector<Ablation> components_of_layers(const ModelConfig& c, int64_t first, int64_t last) {
  std::vector<Ablation> out;
  for (int64_t l = first; l <= last; ++l)
    for (const auto& k : component_kinds()) {
      if (!k.per_layer) continue;
      for (int64_t i = 0; i < component_count(c, k.kind, l); ++i)
        out.push_back({static_cast<int32_t>(l), k.kind, static_cast<int32_t>(i)});
    }
  return out;
}

std::string describe(const Ablation& a) {
  const auto& k = component_kind_info(a.kind);
  if (!k.per_layer) return k.name;
  std::string s = "layer " + std::to_string(a.layer) + " " + k.name;
  if (k.indexed) s += " " + std::to_string(a.index);
  return s;
}

}  // namespace sinkscope
