// Component kinds as data (docs/metrics.md section 4): every source of the circuit map and every
// ablation target is a (layer, kind, index). The kind table drives the slot layout, the reduction
// into `circuit/attr_<kind>` datasets, the ablation choices and the profile; a family that brings
// a new kind adds one row here (and one line in docs/schema.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sinkscope/config.hpp"

namespace sinkscope {

// The numeric values are part of the file format (`circuit/ablation/components[:, 1]`).
enum class ComponentKind : int32_t {
  kHead = 0,
  kExpert = 1,
  kEmbedding = 2,
  kMlp = 3,           // the dense MLP of a dense layer
  kSharedExpert = 4,  // the gated shared expert of an MoE layer (Qwen2-MoE)
};

struct ComponentKindInfo {
  ComponentKind kind;
  const char* name;     // "head", "expert", ... (reports, errors)
  const char* dataset;  // circuit/<dataset>
  // Shape of its attribution dataset: [L, H] for the embedding, [L, H, L] for kinds with one
  // component per layer, [L, H, L, n] for kinds with n per layer.
  bool per_layer;  // false: the embedding (no source layer)
  bool indexed;    // true: several per layer (heads, experts)
};

const std::vector<ComponentKindInfo>& component_kinds();
const ComponentKindInfo& component_kind_info(ComponentKind kind);

// How many components of `kind` layer `layer` has (the embedding: 1 for layer 0 only).
int64_t component_count(const ModelConfig& c, ComponentKind kind, int64_t layer);
// The index width of an indexed kind's dataset (H for heads, E for experts), 1 otherwise.
int64_t component_width(const ModelConfig& c, ComponentKind kind);

// Slots of the circuit map's source axis: the embedding is slot 0; layer l's components follow at
// 1 + l * stride: its H heads, then max(E, 1) slots for its experts (MoE layer) or for the dense
// MLP (first of them), then one slot for the shared expert when the model has one.
class ComponentLayout {
 public:
  ComponentLayout() = default;
  explicit ComponentLayout(const ModelConfig& c);
  int64_t num_heads() const { return heads_; }
  int64_t stride() const { return stride_; }
  int64_t embed() const { return 0; }
  int64_t head(int64_t layer, int64_t h) const { return 1 + layer * stride_ + h; }
  int64_t expert(int64_t layer, int64_t e) const { return 1 + layer * stride_ + heads_ + e; }
  int64_t mlp(int64_t layer) const { return expert(layer, 0); }
  int64_t shared_expert(int64_t layer) const { return 1 + layer * stride_ + heads_ + mlp_slots_; }
  int64_t slot(ComponentKind kind, int64_t layer, int64_t index) const;
  int64_t count_before(int64_t layer) const { return 1 + layer * stride_; }

 private:
  int64_t heads_ = 0, mlp_slots_ = 1, stride_ = 0;
};

// Mean-ablation at position zero (docs/metrics.md section 4, causal version): the component's
// write at position 0 is replaced by its mean write over positions 1..T-1, per probe.
struct Ablation {
  using Kind = ComponentKind;
  static constexpr Kind kHead = ComponentKind::kHead, kExpert = ComponentKind::kExpert,
                        kEmbedding = ComponentKind::kEmbedding, kMlp = ComponentKind::kMlp,
                        kSharedExpert = ComponentKind::kSharedExpert;
  int32_t layer = 0;
  Kind kind = kHead;
  int32_t index = 0;
  bool operator==(const Ablation&) const = default;
};

// Whether `ablations` mean-ablates component `index` of `kind` in `layer`.
inline bool has_ablation(const std::vector<Ablation>& ablations, int64_t layer, ComponentKind kind,
                         int64_t index) {
  for (const auto& a : ablations)
    if (a.layer == layer && a.kind == kind && a.index == index) return true;
  return false;
}

// Every component of layers [first, last] (heads, experts or the dense MLP, shared expert).
std::vector<Ablation> components_of_layers(const ModelConfig& c, int64_t first, int64_t last);

std::string describe(const Ablation& a);  // "layer 3 expert 5"

}  // namespace sinkscope
