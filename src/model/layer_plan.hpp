// The layer plan: the instrumented forward pass of one rank as data, shared by the CPU and CUDA
// backends (docs/architecture.md, "The layer plan"). It fixes, once per model and ablation set,
// everything about a run that is not arithmetic: the hook points and their order, the block wiring
// each layer follows, the component slots every write is booked to, which components are
// mean-ablated, and where the failure tests inject a fault. Backends supply the operations (norms,
// products, attention, routing) through LayerOps; the tap structs the Recorder sees are assembled
// here from the per-row statistics the backends compute (tap_assembly below), so both backends
// hand the observer the same things, checked the same way.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sinkscope/components.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/hooks.hpp"
#include "sinkscope/ndarray.hpp"

namespace sinkscope {

// One MLP-side component slot of a layer: the routed experts 0..E-1, then the shared expert (slot
// E), or the dense MLP (slot 0).
struct PlannedSlot {
  ComponentKind kind;
  int64_t index;      // expert id, or 0
  int64_t component;  // its slot in the ComponentLayout (the circuit map's source index)
  bool ablated;
};

struct PlannedLayer {
  int64_t layer = 0;
  bool moe = false;
  bool shared_expert = false;
  int64_t sources = 0;                // component slots upstream of this layer's attention (C)
  int64_t head_component0 = 0;        // ComponentLayout slot of head 0 (heads are consecutive)
  int64_t mlp_component0 = 0;         // ComponentLayout slot of MLP slot 0 (slots are consecutive)
  std::vector<uint8_t> head_ablated;  // [H]
  std::vector<PlannedSlot> slots;     // the layer's MLP-side slots in slot order
  std::vector<uint8_t> slot_ablated;  // [slots_per_layer]: 1 where that slot is mean-ablated
  bool inject_fault = false;          // the failure tests' hook (SINKSCOPE_INJECT_FAULT)
};

struct LayerPlan {
  // Block wiring (docs/metrics.md, "Model families"): the normalisation of the attention and MLP
  // inputs (none in post-norm blocks, which norm the outputs instead), and whether the MLP reads
  // the layer's input (parallel residual) or the residual after the attention's write.
  BlockKind block = BlockKind::kPreNorm;
  NormKind norm = NormKind::kRms;
  bool post_norm = false;
  bool parallel_residual = false;
  int64_t heads = 0;            // H
  int64_t slots_per_layer = 1;  // S: max(E, 1) (+ 1 shared expert)
  int64_t components = 0;       // every component slot of the model (Ctot)
  int64_t embed_component = 0;
  bool embed_ablated = false;
  std::vector<PlannedLayer> layers;
};

// The plan for `c` with `ablations` applied; the injected fault (SINKSCOPE_INJECT_FAULT=RANK:LAYER,
// docs/reliability.md) is read for `world_rank`.
LayerPlan make_layer_plan(const ModelConfig& c, const std::vector<Ablation>& ablations,
                          int world_rank);

// The operations a backend supplies; run_layers calls them at the hook points in order:
// embed, residual(0), then per layer begin_layer, attention (its tap), mlp (its tap),
// residual(l + 1). attention and mlp add their writes to the backend's residual stream as the
// plan's wiring says (a parallel block's MLP reads the layer's input).
class LayerOps {
 public:
  virtual ~LayerOps() = default;
  virtual void embed(const IntArray& tokens) = 0;
  virtual void residual(int64_t index) = 0;
  virtual void begin_layer(const PlannedLayer&) {}
  virtual void attention(const PlannedLayer& layer) = 0;
  virtual void mlp(const PlannedLayer& layer) = 0;
};

// Runs the plan's hook points on `ops` (throws the injected fault where the plan says).
void run_layers(const LayerPlan& plan, LayerOps& ops, const IntArray& tokens);

// ---- tap assembly ------------------------------------------------------------------------------
// From per-row statistics on the host to the tap structs, with the non-finite checks. `where`
// names the checkpoint (or model) in the error, `suffix` the backend (" (cuda)").
struct TapSource {
  int64_t B = 0, T = 0, D = 0, probe0 = 0;
  std::string where;
  const char* suffix = "";
};

// x0 [B, D]; row_norms [B * T] = ||x[b, i]||; abs_median_probe0: Sun et al.'s median of |x| over
// probe 0 (used when src.probe0 == 0, else NaN).
void emit_residual_tap(ForwardObserver& obs, const TapSource& src, int64_t index, const float* x0,
                       const float* row_norms, float abs_median_probe0);

// Checks the head write norms [B, Hl] (non-finite: names the layer's attention) and calls the
// observer with `tap` as it is.
void emit_attention_tap(ForwardObserver& obs, const TapSource& src, const AttentionTap& tap);

// m_row_norms [B * T] = ||m[b, i]|| of the block's write; slot_p0_norms [B, S] the position-0 write
// norms of each MLP-side slot; p0_routed [B, E], rest_routed [E] (MoE layers).
void emit_mlp_tap(ForwardObserver& obs, const TapSource& src, const LayerPlan& plan,
                  const PlannedLayer& layer, const float* m_row_norms, const float* slot_p0_norms,
                  const float* p0_routed, const float* rest_routed);

}  // namespace sinkscope
