// The analysis file and sweep.h5 of docs/schema.md. Dataset and attribute names here are the
// contract: scripts, plots and other people's code read them. Add, never rename.
//
// ONE schema table per file kind (analysis_datasets(), sweep_datasets()) lists every dataset with
// its dimensions, element type (from the member that holds it), long_name, units and description.
// The writer and the reader both walk it, and docs/schema.md's tables are generated from (and
// checked against) the attributes of real output files (tests/tools/schema_doc.py), so none of
// them can drift apart. Adding a
// dataset is one row here (plus the member that holds it).
//
// Dimensions are real HDF5 dimension scales (netCDF-4 layout): one coordinate variable per
// dimension at the root, attached to every axis that uses it, so xarray/h5netcdf and netCDF tools
// open the files as they are. Both readers check shapes against the root attributes: a file that
// reads back is a file whose numbers line up with its own description (what `sweep --resume`
// relies on).
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

#include "io/hdf5_file.hpp"
#include "io/small_file.hpp"
#include "probe/sha256.hpp"
#include "sinkscope/analysis.hpp"
#include "sinkscope/build_config.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/io.hpp"

namespace sinkscope {

namespace {

constexpr const char* kScalarDims = "scalar";

// ---- dimensions ----------------------------------------------------------------------------

// The sizes every dataset is made of: root attributes (analysis) or leading shapes (sweep).
struct Sizes {
  size_t probes = 0;       // N
  size_t positions = 0;    // T
  size_t layers = 0;       // L
  size_t heads = 0;        // H
  size_t experts = 0;      // E
  size_t ablations = 0;    // K: not an attribute; taken from circuit/ablation/components
  size_t checkpoints = 0;  // C (sweep.h5)
};

enum class Axis {
  kProbe,
  kPosition,
  kQuery,
  kLayer,
  kLayerInput,
  kEmbeddingOrLayer,
  kHead,
  kExpert,
  kTargetLayer,
  kTargetHead,
  kSourceLayer,
  kSourceHead,
  kSourceExpert,
  kComponent,
  kField,
  kCheckpoint,
  kCheckpointPair,
  kBound,
};

// The three columns of circuit/ablation/components, the values of its `field` coordinate.
const std::vector<std::string>& ablation_fields() {
  static const std::vector<std::string> fields = {"source_layer", "kind", "index"};
  return fields;
}

struct AxisSpec {
  Axis axis;
  const char* name;  // the dimension's name, and its coordinate variable's (at the root)
  const char* long_name;
  const char* description;
};

// One row per dimension. The L-sized and the (L+1)-sized layer axes have different names
// (`layer` and `layer_input` / `embedding_or_layer`) so no name ever stands for two lengths.
const std::vector<AxisSpec>& axis_specs() {
  using A = Axis;
  // clang-format off
  static const std::vector<AxisSpec> specs = {
      {A::kProbe, "probe", "probe index", "row of /tokens (0..N-1)"},
      {A::kPosition, "position", "token position", "position in the probe (0..T-1); 0 is the sink position"},
      {A::kQuery, "query", "query position", "query position i of the attention row A[i, 0] (0..T-1)"},
      {A::kLayer, "layer", "decoder layer", "decoder layer l (0..L-1)"},
      {A::kLayerInput, "layer_input", "residual stream index",
       "residual stream x_l entering layer l (0..L); x_0 is the embedding output, x_L the final residual before the last norm"},
      {A::kEmbeddingOrLayer, "embedding_or_layer", "source block",
       "0 = the embedding, 1 + l = decoder layer l (0..L)"},
      {A::kHead, "head", "attention head", "query head h (0..H-1)"},
      {A::kExpert, "expert", "routed expert", "routed expert e (0..E-1)"},
      {A::kTargetLayer, "target_layer", "target layer", "layer t of the sink head whose key is attributed (0..L-1)"},
      {A::kTargetHead, "target_head", "target head", "query head h of the target layer (0..H-1)"},
      {A::kSourceLayer, "source_layer", "source layer", "layer l of the writing component (0..L-1)"},
      {A::kSourceHead, "source_head", "source head", "attention head of the source layer (0..H-1)"},
      {A::kSourceExpert, "source_expert", "source expert", "routed expert of the source layer (0..E-1)"},
      {A::kComponent, "component", "ablated component", "row k of circuit/ablation/components (0..K-1)"},
      {A::kField, "field", "component field", "column of circuit/ablation/components: source_layer, kind, index"},
      {A::kCheckpoint, "checkpoint", "checkpoint index", "checkpoint c in sweep order (0..C-1; steps and names give its step and folder)"},
      {A::kCheckpointPair, "checkpoint_pair", "checkpoint pair", "pair (c, c + 1) of consecutive checkpoints (0..C-2)"},
      {A::kBound, "bound", "interval bound", "0 = lower, 1 = upper bound of a 95% bootstrap interval"},
  };
  // clang-format on
  return specs;
}

const AxisSpec& axis_spec(Axis axis) {
  for (const AxisSpec& spec : axis_specs())
    if (spec.axis == axis) return spec;
  throw RuntimeFailure("schema: axis without a row in axis_specs()");
}

size_t extent(Axis axis, const Sizes& s) {
  switch (axis) {
    case Axis::kProbe:
      return s.probes;
    case Axis::kPosition:
    case Axis::kQuery:
      return s.positions;
    case Axis::kLayer:
    case Axis::kTargetLayer:
    case Axis::kSourceLayer:
      return s.layers;
    case Axis::kLayerInput:
    case Axis::kEmbeddingOrLayer:
      return s.layers + 1;
    case Axis::kHead:
    case Axis::kTargetHead:
    case Axis::kSourceHead:
      return s.heads;
    case Axis::kExpert:
    case Axis::kSourceExpert:
      return s.experts;
    case Axis::kComponent:
      return s.ablations;
    case Axis::kField:
      return ablation_fields().size();
    case Axis::kCheckpoint:
      return s.checkpoints;
    case Axis::kCheckpointPair:
      return s.checkpoints == 0 ? 0 : s.checkpoints - 1;
    case Axis::kBound:
      return 2;
  }
  return 0;
}

// ---- content checksum ------------------------------------------------------------------------

// Root attribute `content_sha256`: SHA-256 over every root attribute and every dataset (path,
// dims, shape, values) in the order of the schema table. The writer hashes what it writes, the
// reader what it reads back, so a changed byte anywhere in the file's content is noticed
// (`sweep --resume` then redoes the checkpoint instead of trusting it).
constexpr const char* kContentSha256 = "content_sha256";

class ContentDigest {
 public:
  void text(std::string_view name, std::string_view value) {
    field(name);
    field(value);
  }
  void integer(std::string_view name, int64_t value) { text(name, std::to_string(value)); }
  void real(std::string_view name, double value) {
    char exact[64];  // hexadecimal floating point: every bit of the double
    std::snprintf(exact, sizeof(exact), "%a", value);
    text(name, exact);
  }
  template <typename T>
  void array(std::string_view name, const std::string& dims, const std::vector<size_t>& shape,
             const T* values, size_t count) {
    field(name);
    field(dims);
    const uint64_t rank = shape.size();
    sha_.update(&rank, sizeof(rank));
    for (const size_t extent : shape) {
      const uint64_t e = extent;
      sha_.update(&e, sizeof(e));
    }
    sha_.update(values, count * sizeof(T));
  }
  std::string hex() { return sha_.hex_digest(); }

 private:
  // Length-prefixed, so no two different sequences of fields hash the same bytes.
  void field(std::string_view bytes) {
    const uint64_t n = bytes.size();
    sha_.update(&n, sizeof(n));
    sha_.update(bytes.data(), bytes.size());
  }
  Sha256 sha_;
};

// Every root attribute of write_meta, in its order.
void digest_meta(ContentDigest& d, const AnalysisMeta& m) {
  d.text("sinkscope_version", m.sinkscope_version);
  d.text("model_type", m.model_type);
  d.text("checkpoint", m.checkpoint);
  d.integer("step", m.step);
  d.integer("num_layers", m.num_layers);
  d.integer("num_heads", m.num_heads);
  d.integer("num_kv_heads", m.num_kv_heads);
  d.integer("head_dim", m.head_dim);
  d.integer("num_experts", m.num_experts);
  d.integer("top_k", m.top_k);
  d.integer("hidden_size", m.hidden_size);
  d.integer("num_probes", m.num_probes);
  d.integer("seq_len", m.seq_len);
  d.real("eps", m.eps);
  d.real("sink_rate", m.sink_rate);
  d.integer("tp", m.tp);
  d.integer("ep", m.ep);
  d.integer("dp", m.dp);
  d.integer("world_size", m.world_size);
  d.text("device", m.device);
  d.text("tokens_sha256", m.tokens_sha256);
  d.text("created_utc", m.created_utc);
  d.text("layout", m.layout);
  d.integer("etp", m.etp);
  d.real("circuit_identity_max_rel_err", m.circuit_identity_max_rel_err);
  // Provenance of format version 2.
  d.text("git_commit", m.git_commit);
  d.text("command_line", m.command_line);
  d.text("options", m.options);
  d.text("probes", m.probes);
  d.integer("prepend_bos", m.prepend_bos);
  d.text("ablate", m.ablate);
  d.integer("batch", m.batch);
  d.integer("threads", m.threads);
  d.integer("per_query", m.per_query);
  d.text("checkpoint_headers_sha256", m.checkpoint_headers_sha256);
}

// ---- datasets --------------------------------------------------------------------------------

// Where a dataset's values live in the in-memory struct; the element type follows from it.
template <typename Owner>
using Member = std::variant<FloatArray Owner::*, IntArray Owner::*, float Owner::*,
                            int32_t Owner::*, int64_t Owner::*, std::vector<int64_t> Owner::*,
                            std::vector<std::string> Owner::*>;

template <typename Owner>
struct DatasetSpec {
  const char* name;        // dataset path; its group is the part before the last '/'
  std::vector<Axis> axes;  // empty: a scalar
  const char* long_name;
  const char* units;  // "1": dimensionless; "": not a quantity (ids, indices, names)
  const char* description;
  Member<Owner> member;
  const char* when =
      "";  // "": always written; else the option that adds it (written when non-empty)
  bool coordinate = false;  // listed in the `coordinates` attribute of datasets on its axes
  // Optional datasets that are scalars (never "empty"): written when this says so.
  bool (*present)(const Owner&) = nullptr;
};

// The analysis file. Definitions: docs/metrics.md (sections named in the descriptions).
const std::vector<DatasetSpec<Analysis>>& analysis_datasets() {
  using A = Axis;
  using An = Analysis;
  // One dataset per row: the table reads like docs/schema.md's.
  // clang-format off
  static const std::vector<DatasetSpec<An>> specs = {
      {"tokens", {A::kProbe, A::kPosition}, "probe token ids", "",
       "the probes as run (after --prepend-bos)", &An::tokens},
      {"attention/sink_score", {A::kLayer, A::kHead}, "sink score alpha", "1",
       "mean over probes and all queries of the attention to position 0; on a sliding-window layer "
       "the queries i < window that can see position 0 (metrics 1, 1.4)", &An::sink_score},
      {"attention/sink_rate", {A::kLayer}, "sink rate", "1",
       "fraction of the layer's heads with sink_score > eps (metrics 1)", &An::sink_rate},
      {"attention/p0_per_query", {A::kProbe, A::kLayer, A::kHead, A::kQuery}, "attention to position 0", "1",
       "A[i, 0] for every probe, layer, head and query (metrics 1)", &An::p0_per_query, "--per-query"},
      // Contract 1.4 (docs/metrics.md "Model families II: gpt-oss"): learned sinks (gpt-oss).
      {"attention/learned_sink_mass", {A::kLayer, A::kHead}, "learned sink mass", "1",
       "softmax weight of the head's learned sink logit, mean over probes and the queries sink_score "
       "averages over (metrics 1.4)", &An::learned_sink_mass, "a model with learned sinks (gpt_oss)"},
      {"attention/learned_sink_mass_per_query", {A::kProbe, A::kLayer, A::kHead, A::kQuery},
       "learned sink mass per query", "1",
       "softmax weight of the learned sink logit for every probe, layer, head and query (metrics 1.4)",
       &An::learned_sink_mass_per_query, "--per-query on a model with learned sinks"},
      {"residual/norm_p0", {A::kProbe, A::kLayerInput}, "residual norm at position 0", "residual units",
       "||x_l[0]|| (metrics 2)", &An::norm_p0},
      {"residual/norm_rest_median", {A::kProbe, A::kLayerInput}, "median residual norm elsewhere", "residual units",
       "median over positions i >= 1 of ||x_l[i]|| (metrics 2)", &An::norm_rest_median},
      {"residual/h_ratio", {A::kLayerInput}, "position-0 norm ratio", "1",
       "mean over probes of norm_p0 / norm_rest_median (metrics 2)", &An::h_ratio},
      {"residual/p0_cosine", {A::kLayerInput}, "position-0 cosine across probes", "1",
       "mean cosine of x_l[0] over pairs of distinct probes; NaN with one probe (metrics 2)", &An::p0_cosine},
      {"residual/massive_p0", {A::kLayerInput}, "massive activations at position 0", "channels",
       "channels with |x_l[0, c]| > 100 and > 1000 x the median magnitude (metrics 2)", &An::massive_p0},
      {"writes/attn_head_p0", {A::kLayer, A::kHead}, "head write norm at position 0", "residual units",
       "mean over probes of ||w^{l,h}[0]|| (metrics 3)", &An::attn_head_p0},
      {"writes/attn_head_rest", {A::kLayer, A::kHead}, "head write norm elsewhere", "residual units",
       "mean over probes and positions i >= 1 of ||w^{l,h}[i]|| (metrics 3)", &An::attn_head_rest},
      {"writes/moe_p0", {A::kLayer}, "MLP/MoE write norm at position 0", "residual units",
       "mean over probes of ||m_l[0]|| (metrics 3)", &An::moe_p0},
      {"writes/moe_rest", {A::kLayer}, "MLP/MoE write norm elsewhere", "residual units",
       "mean over probes and positions i >= 1 of ||m_l[i]|| (metrics 3)", &An::moe_rest},
      {"writes/expert_p0", {A::kLayer, A::kExpert}, "expert write norm at position 0", "residual units",
       "mean over probes of ||m^{l,e}[0]||, zero where not routed (metrics 3)", &An::expert_p0},
      {"routing/p0_topk_freq", {A::kLayer, A::kExpert}, "position-0 routing frequency", "1",
       "fraction of probes whose position 0 routes to the expert (metrics 3)", &An::p0_topk_freq},
      {"routing/rest_topk_freq", {A::kLayer, A::kExpert}, "routing frequency elsewhere", "1",
       "fraction of (probe, i >= 1) tokens routed to the expert (metrics 3)", &An::rest_topk_freq},
      {"circuit/attr_embed", {A::kTargetLayer, A::kTargetHead}, "embedding attribution", "logit",
       "attr(embedding -> t,h): differential key attribution (metrics 4)", &An::attr_embed},
      {"circuit/attr_head", {A::kTargetLayer, A::kTargetHead, A::kSourceLayer, A::kSourceHead},
       "head attribution", "logit", "attr(head l.j -> t,h); 0 where l >= t (metrics 4)", &An::attr_head},
      {"circuit/attr_expert", {A::kTargetLayer, A::kTargetHead, A::kSourceLayer, A::kSourceExpert},
       "expert attribution", "logit", "attr(expert l.e -> t,h); 0 where l >= t (metrics 4)", &An::attr_expert},
      {"circuit/attr_mlp", {A::kTargetLayer, A::kTargetHead, A::kSourceLayer}, "dense MLP attribution", "logit",
       "attr(dense MLP of layer l -> t,h); 0 where l >= t or layer l is MoE (metrics 4)", &An::attr_mlp},
      {"circuit/attr_shared_expert", {A::kTargetLayer, A::kTargetHead, A::kSourceLayer},
       "shared expert attribution", "logit",
       "attr(shared expert of layer l -> t,h); 0 where l >= t, layer l is dense or the family has "
       "no shared expert (metrics, Model families)", &An::attr_shared_expert, "a shared-expert family"},
      {"circuit/ablation/components", {A::kComponent, A::kField}, "ablated components", "",
       "source layer, kind (0 head, 1 expert, 2 embedding, 3 dense MLP, 4 shared expert), index (metrics 4)",
       &An::ablation_components, "--ablate"},
      {"circuit/ablation/delta_sink_score", {A::kComponent, A::kLayer, A::kHead}, "sink score change", "1",
       "sink_score with the component mean-ablated at position 0, minus the clean sink_score (metrics 4)",
       &An::ablation_delta_sink, "--ablate"},
      {"profile/layer_share", {A::kEmbeddingOrLayer}, "layer share of the sink", "1",
       "sink-weighted share of positive attribution per source block (metrics 5)", &An::layer_share},
      {"profile/first2_share", {}, "share of layers 0 and 1", "1",
       "layer_share[1] + layer_share[2] (metrics 5)", &An::first2_share},
      {"profile/norm_gain_share", {A::kLayer}, "norm-gain share", "1",
       "share of the positive growth of log h_ratio made by the layer (metrics 5)", &An::norm_gain_share},
      {"profile/peak_layer", {}, "peak layer", "",
       "argmax over l of layer_share[1 + l] (metrics 5)", &An::peak_layer},
      {"profile/entropy", {}, "entropy of layer_share", "nat",
       "Shannon entropy of layer_share: low = concentrated (metrics 5)", &An::entropy},
      // Contract 1.2 (docs/metrics.md "Scientific validity"): per-probe records for the sweep's
      // bootstrap, the causal layer profile and the ablation search.
      {"attention/sink_score_per_probe", {A::kProbe, A::kLayer, A::kHead}, "sink score per probe", "1",
       "alpha of each probe: mean over its queries of A[i, 0] (metrics 1.2, bootstrap)",
       &An::sink_score_per_probe, "per-probe records"},
      {"profile/attr_layer_per_probe", {A::kProbe, A::kEmbeddingOrLayer}, "attribution per probe and block", "logit",
       "each probe's sink-weighted positive attribution per source block (metrics 1.2, bootstrap)",
       &An::attr_layer_per_probe, "per-probe records"},
      {"profile/causal_drop", {A::kEmbeddingOrLayer}, "causal drop per block", "1",
       "drop of the sink-weighted sink score when the block's writes at position 0 are mean-ablated (metrics 1.2)",
       &An::causal_drop, "--causal-profile"},
      {"profile/causal_drop_attention", {A::kLayer}, "causal drop of the layer's heads", "1",
       "as causal_drop, ablating the layer's attention heads only (metrics 1.2)", &An::causal_drop_attention,
       "--causal-profile"},
      {"profile/causal_drop_ffn", {A::kLayer}, "causal drop of the layer's MLP", "1",
       "as causal_drop, ablating the layer's MLP / experts / shared expert only (metrics 1.2)",
       &An::causal_drop_ffn, "--causal-profile"},
      {"profile/causal_drop_per_probe", {A::kProbe, A::kEmbeddingOrLayer}, "causal drop per probe", "1",
       "causal_drop of each probe; its mean is causal_drop (metrics 1.2)", &An::causal_drop_per_probe,
       "--causal-profile"},
      {"profile/causal_layer_share", {A::kEmbeddingOrLayer}, "causal layer share", "1",
       "positive causal drops normalised to sum 1 (metrics 1.2)", &An::causal_layer_share, "--causal-profile"},
      {"profile/causal_first2_share", {}, "causal share of layers 0 and 1", "1",
       "causal_layer_share[1] + causal_layer_share[2] (metrics 1.2)", &An::causal_first2_share,
       "--causal-profile", false, [](const An& a) { return a.has_causal_profile(); }},
      {"profile/causal_peak_layer", {}, "causal peak layer", "",
       "argmax over l of causal_layer_share[1 + l] (metrics 1.2)", &An::causal_peak_layer,
       "--causal-profile", false, [](const An& a) { return a.has_causal_profile(); }},
      {"circuit/search/layer_drop", {A::kEmbeddingOrLayer}, "search: drop per block", "1",
       "sink-weighted drop when each block is ablated, the first stage of --ablate search (metrics 1.2)",
       &An::search_layer_drop, "--ablate search"},
      {"circuit/search/effect", {A::kComponent}, "search: component effect", "1",
       "sink-weighted drop of each ablated component, largest first (metrics 1.2)", &An::search_effect,
       "--ablate search"},
      {"circuit/search/selected", {}, "search: smallest set", "components",
       "the smallest number of leading components reaching `share` of the summed effects (metrics 1.2)",
       &An::search_selected, "--ablate search", false, [](const An& a) { return !a.search_effect.empty(); }},
      {"circuit/search/share", {}, "search: share asked for", "1",
       "the share of the summed effects the selected set reaches (metrics 1.2)", &An::search_share,
       "--ablate search", false, [](const An& a) { return !a.search_effect.empty(); }},
  };
  // clang-format on
  return specs;
}

// sweep.h5: one row of every checkpoint's analysis per dataset, in sweep order.
const std::vector<DatasetSpec<Sweep>>& sweep_datasets() {
  using A = Axis;
  using S = Sweep;
  // clang-format off
  static const std::vector<DatasetSpec<S>> specs = {
      {"steps", {A::kCheckpoint}, "training step", "step",
       "training step of the checkpoint (folder name or --steps)", &S::steps, "", true},
      {"names", {A::kCheckpoint}, "checkpoint name", "",
       "the checkpoint folder's name; its file is checkpoints/<name>.h5", &S::names, "", true},
      {"checkpoint_paths", {A::kCheckpoint}, "checkpoint folder", "",
       "the checkpoint folder as given on the command line", &S::checkpoint_paths},
      {"checkpoint_headers_sha256", {A::kCheckpoint}, "safetensors headers SHA-256", "",
       "SHA-256 of the checkpoint's safetensors headers (names, shapes, offsets)", &S::checkpoint_headers_sha256},
      {"sink_rate", {A::kCheckpoint, A::kLayer}, "sink rate", "1",
       "attention/sink_rate of each checkpoint (metrics 1)", &S::sink_rate},
      {"sink_score", {A::kCheckpoint, A::kLayer, A::kHead}, "sink score alpha", "1",
       "attention/sink_score of each checkpoint (metrics 1)", &S::sink_score},
      {"h_ratio", {A::kCheckpoint, A::kLayerInput}, "position-0 norm ratio", "1",
       "residual/h_ratio of each checkpoint (metrics 2)", &S::h_ratio},
      {"layer_share", {A::kCheckpoint, A::kEmbeddingOrLayer}, "layer share of the sink", "1",
       "profile/layer_share of each checkpoint (metrics 5)", &S::layer_share},
      {"first2_share", {A::kCheckpoint}, "share of layers 0 and 1", "1",
       "profile/first2_share of each checkpoint (metrics 5)", &S::first2_share},
      {"norm_gain_share", {A::kCheckpoint, A::kLayer}, "norm-gain share", "1",
       "profile/norm_gain_share of each checkpoint (metrics 5)", &S::norm_gain_share},
      {"convergence/tv", {A::kCheckpointPair}, "layer_share change", "1",
       "total-variation distance between the layer_share of checkpoints c and c + 1 (metrics 6)",
       &S::convergence_tv},
      {"convergence/step", {}, "convergence step (contract 1.0, deprecated)", "step",
       "first step after which every later tv is <= tau; -1: not converged (metrics 6; superseded by "
       "convergence/converged_step and the convergence_outcome attribute, metrics 1.2)", &S::convergence_step},
      // Contract 1.2 (docs/metrics.md "Scientific validity").
      {"max_sink_score", {A::kCheckpoint}, "largest sink score", "1",
       "max over layers and heads of sink_score (metrics 1.2)", &S::max_sink_score, "contract 1.2"},
      {"causal_layer_share", {A::kCheckpoint, A::kEmbeddingOrLayer}, "causal layer share", "1",
       "profile/causal_layer_share of each checkpoint (metrics 1.2)", &S::causal_layer_share,
       "--causal-profile"},
      {"causal_first2_share", {A::kCheckpoint}, "causal share of layers 0 and 1", "1",
       "profile/causal_first2_share of each checkpoint (metrics 1.2)", &S::causal_first2_share,
       "--causal-profile"},
      {"bootstrap/noise_floor", {A::kCheckpoint}, "profile noise floor", "1",
       "95th percentile of the profile distance between two bootstrap replicates of the checkpoint (metrics 1.2)",
       &S::noise_floor, "--bootstrap"},
      {"convergence/distance", {A::kCheckpointPair}, "profile distance", "1",
       "total-variation distance of the convergence profile between checkpoints c and c + 1 (metrics 1.2)",
       &S::convergence_distance, "contract 1.2"},
      {"convergence/distance_per_doubling", {A::kCheckpointPair}, "profile distance per step doubling", "1",
       "distance / log2(step_{c+1} / step_c) (metrics 1.2)", &S::convergence_distance_per_doubling,
       "contract 1.2"},
      {"convergence/threshold", {A::kCheckpointPair}, "effective threshold", "1",
       "max(tau x doublings, noise floor) on the distance scale (metrics 1.2)", &S::convergence_threshold,
       "contract 1.2"},
      {"convergence/still", {A::kCheckpointPair}, "pair below threshold", "",
       "1 where distance <= threshold (metrics 1.2)", &S::convergence_still, "contract 1.2"},
      {"convergence/converged_step", {}, "convergence step", "step",
       "S of \"converged at step S\", else -1 (metrics 1.2)", &S::converged_step, "contract 1.2", false,
       [](const S& s) { return !s.convergence_outcome.empty(); }},
  };
  // clang-format on
  return specs;
}

std::string dims_text(const std::vector<Axis>& axes) {
  if (axes.empty()) return kScalarDims;
  std::string text;
  for (size_t i = 0; i < axes.size(); ++i)
    text += (i ? "," : "") + std::string(axis_spec(axes[i]).name);
  return text;
}

std::string shape_text(const std::vector<size_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? "," : "") + std::to_string(shape[i]);
  return text + "]";
}

std::vector<size_t> expected_shape(const std::vector<Axis>& axes, const Sizes& sizes) {
  std::vector<size_t> shape;
  for (Axis axis : axes) shape.push_back(extent(axis, sizes));
  return shape;
}

// True when the optional dataset has nothing to write.
template <typename Owner>
bool is_empty(const Owner& owner, const Member<Owner>& member) {
  return std::visit(
      [&](auto pointer) {
        using Value = std::decay_t<decltype(owner.*pointer)>;
        if constexpr (std::is_arithmetic_v<Value>) {
          return false;
        } else {
          return (owner.*pointer).empty();
        }
      },
      member);
}

// The shape an array is written with. A default-constructed array (no shape, no data) stands for
// an empty one of the schema's shape, so an all-failed sweep still writes a well-formed file.
template <typename T>
std::vector<size_t> checked_write_shape(const NdArray<T>& array,
                                        const std::vector<size_t>& expected,
                                        const std::string& file, const char* name) {
  const std::vector<size_t> shape =
      array.shape.empty() && array.data.empty() ? expected : array.shape;
  if (NdArray<T>::count(shape) != array.data.size()) {
    throw RuntimeFailure("cannot write " + file + ": " + name + " holds " +
                         std::to_string(array.data.size()) + " values for its shape " +
                         shape_text(shape));
  }
  if (shape != expected) {
    throw RuntimeFailure("cannot write " + file + ": " + name + " has shape " + shape_text(shape) +
                         ", the schema and attributes say " + shape_text(expected));
  }
  return shape;
}

void check_length(size_t length, const std::vector<size_t>& expected, const std::string& file,
                  const char* name) {
  if (std::vector<size_t>{length} != expected) {
    throw RuntimeFailure("cannot write " + file + ": " + name + " has " + std::to_string(length) +
                         " entries, the schema says " + shape_text(expected));
  }
}

// The `description` attribute: the row's, and the option that adds an optional dataset.
template <typename Owner>
std::string description_of(const DatasetSpec<Owner>& spec) {
  std::string text = spec.description;
  if (spec.when[0] != '\0') text += std::string(" (written with ") + spec.when + ")";
  return text;
}

// Adds one dataset's value to the content checksum: its path, dims, shape and bytes (the writer
// after writing, the reader after reading, in table order).
template <typename Owner>
void digest_value(ContentDigest& digest, const Owner& owner, const DatasetSpec<Owner>& spec) {
  const std::string dims = dims_text(spec.axes);
  std::visit(
      [&](auto pointer) {
        const auto& value = owner.*pointer;
        using Value = std::decay_t<decltype(value)>;
        if constexpr (std::is_arithmetic_v<Value>) {
          digest.array(spec.name, dims, {}, &value, 1);
        } else if constexpr (std::is_same_v<Value, std::vector<std::string>>) {
          for (const std::string& text : value) digest.text(spec.name, text);
        } else if constexpr (std::is_same_v<Value, std::vector<int64_t>>) {
          digest.array(spec.name, dims, {value.size()}, value.data(), value.size());
        } else {
          digest.array(spec.name, dims, value.shape, value.ptr(), value.data.size());
        }
      },
      spec.member);
}

// Writes one dataset of the table with its attributes; dimension scales are attached by the caller.
template <typename Owner>
void write_one(h5::File& file, const Owner& owner, const DatasetSpec<Owner>& spec,
               const Sizes& sizes, const std::string& final_path) {
  const std::vector<size_t> expected = expected_shape(spec.axes, sizes);
  const std::string dims = dims_text(spec.axes);
  std::visit(
      [&](auto pointer) {
        const auto& value = owner.*pointer;
        using Value = std::decay_t<decltype(value)>;
        if constexpr (std::is_arithmetic_v<Value>) {
          file.write_scalar<Value>(spec.name, value);
        } else if constexpr (std::is_same_v<Value, std::vector<std::string>>) {
          check_length(value.size(), expected, final_path, spec.name);
          file.write_strings(spec.name, value, dims);
        } else if constexpr (std::is_same_v<Value, std::vector<int64_t>>) {
          check_length(value.size(), expected, final_path, spec.name);
          file.write_dataset(spec.name, value.data(), expected, dims);
        } else {
          const std::vector<size_t> shape =
              checked_write_shape(value, expected, final_path, spec.name);
          file.write_dataset(spec.name, value.ptr(), shape, dims);
        }
      },
      spec.member);
  file.write_string_attribute("long_name", spec.long_name, spec.name);
  file.write_string_attribute("units", spec.units, spec.name);
  file.write_string_attribute("description", description_of(spec), spec.name);
}

// Writes every dataset of `specs` that `owner` holds, the coordinate variable of every dimension
// they use, and attaches them: the netCDF-4 layout.
template <typename Owner>
void write_datasets(h5::File& file, const Owner& owner,
                    const std::vector<DatasetSpec<Owner>>& specs, const Sizes& sizes,
                    const std::string& final_path, std::set<Axis>& axes_done,
                    ContentDigest* digest = nullptr) {
  std::vector<const DatasetSpec<Owner>*> written;
  std::set<Axis> used;
  for (const DatasetSpec<Owner>& spec : specs) {
    if (spec.when[0] != '\0' && is_empty(owner, spec.member)) continue;
    if (spec.present && !spec.present(owner)) continue;
    written.push_back(&spec);
    used.insert(spec.axes.begin(), spec.axes.end());
  }
  for (Axis axis : used) {
    if (!axes_done.insert(axis).second) continue;  // its coordinate is already in the file
    const AxisSpec& a = axis_spec(axis);
    const size_t n = extent(axis, sizes);
    if (axis == Axis::kField) {
      file.write_strings(a.name, ablation_fields(), a.name);
    } else {
      std::vector<int64_t> index(n);
      for (size_t i = 0; i < n; ++i) index[i] = static_cast<int64_t>(i);
      file.write_dataset(a.name, index.data(), {n}, a.name);
    }
    file.write_string_attribute("long_name", a.long_name, a.name);
    file.write_string_attribute("description", a.description, a.name);
    file.make_dimension_scale(a.name, a.name);
  }
  for (const DatasetSpec<Owner>* spec : written) {
    write_one(file, owner, *spec, sizes, final_path);
    if (digest) digest_value(*digest, owner, *spec);
    std::string coordinates;
    for (size_t axis = 0; axis < spec->axes.size(); ++axis) {
      file.attach_dimension_scale(spec->name, axis_spec(spec->axes[axis]).name,
                                  static_cast<unsigned>(axis));
    }
    // CF `coordinates`: the coordinate datasets along this dataset's axes (xarray shows them).
    for (const DatasetSpec<Owner>* other : written) {
      if (!other->coordinate || other == spec || other->axes.empty()) continue;
      const bool along = std::all_of(other->axes.begin(), other->axes.end(), [&](Axis axis) {
        return std::find(spec->axes.begin(), spec->axes.end(), axis) != spec->axes.end();
      });
      if (along) {
        coordinates += (coordinates.empty() ? "" : " ") + std::string(other->name);
      }
    }
    if (!coordinates.empty()) file.write_string_attribute("coordinates", coordinates, spec->name);
  }
}

Sizes sizes_of(const AnalysisMeta& meta, const std::string& file) {
  for (int64_t value :
       {meta.num_probes, meta.seq_len, meta.num_layers, meta.num_heads, meta.num_experts}) {
    if (value < 0) throw RuntimeFailure("cannot write " + file + ": negative size in attributes");
  }
  Sizes sizes;
  sizes.probes = static_cast<size_t>(meta.num_probes);
  sizes.positions = static_cast<size_t>(meta.seq_len);
  sizes.layers = static_cast<size_t>(meta.num_layers);
  sizes.heads = static_cast<size_t>(meta.num_heads);
  sizes.experts = static_cast<size_t>(meta.num_experts);
  return sizes;
}

void write_meta(h5::File& file, const AnalysisMeta& meta) {
  // A producer that did not stamp a version gets this build's.
  file.write_string_attribute("sinkscope_version", meta.sinkscope_version.empty()
                                                       ? std::string(SINKSCOPE_VERSION)
                                                       : meta.sinkscope_version);
  file.write_int_attribute("format_version",
                           meta.format_version > 0 ? meta.format_version : kFormatVersion);
  file.write_string_attribute("git_commit",
                              meta.git_commit.empty() ? SINKSCOPE_GIT_COMMIT : meta.git_commit);
  file.write_string_attribute("model_type", meta.model_type);
  file.write_string_attribute("checkpoint", meta.checkpoint);
  file.write_string_attribute("checkpoint_headers_sha256", meta.checkpoint_headers_sha256);
  file.write_int_attribute("step", meta.step);
  file.write_int_attribute("num_layers", meta.num_layers);
  file.write_int_attribute("num_heads", meta.num_heads);
  file.write_int_attribute("num_kv_heads", meta.num_kv_heads);
  file.write_int_attribute("head_dim", meta.head_dim);
  file.write_int_attribute("num_experts", meta.num_experts);
  file.write_int_attribute("top_k", meta.top_k);
  file.write_int_attribute("hidden_size", meta.hidden_size);
  file.write_int_attribute("num_probes", meta.num_probes);
  file.write_int_attribute("seq_len", meta.seq_len);
  file.write_double_attribute("eps", meta.eps);
  file.write_double_attribute("sink_rate", meta.sink_rate);
  file.write_int_attribute("tp", meta.tp);
  file.write_int_attribute("ep", meta.ep);
  file.write_int_attribute("dp", meta.dp);
  file.write_int_attribute("world_size", meta.world_size);
  file.write_string_attribute("device", meta.device);
  file.write_string_attribute("tokens_sha256", meta.tokens_sha256);
  file.write_string_attribute("created_utc", meta.created_utc);
  file.write_string_attribute("layout", meta.layout);
  file.write_int_attribute("etp", meta.etp);
  file.write_double_attribute("circuit_identity_max_rel_err", meta.circuit_identity_max_rel_err);
  file.write_string_attribute("command_line", meta.command_line);
  file.write_string_attribute("options", meta.options);
  file.write_string_attribute("probes", meta.probes);
  file.write_int_attribute("prepend_bos", meta.prepend_bos);
  file.write_string_attribute("ablate", meta.ablate);
  file.write_int_attribute("batch", meta.batch);
  file.write_int_attribute("threads", meta.threads);
  file.write_int_attribute("per_query", meta.per_query);
}

// ---- reading -------------------------------------------------------------------------------

// Turns every failure while reading into one InputError line naming the file: a file we cannot
// read is the user's to fix (or to redo with --resume), not a crash of sinkscope.
class Reader {
 public:
  Reader(const std::string& path, const char* kind) : path_(path), kind_(kind) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw InputError("bad " + std::string(kind_) + " file " + path_ + ": " + what);
  }

  h5::File open() const {
    struct stat st {};
    if (::stat(path_.c_str(), &st) != 0) {
      throw InputError("cannot read " + std::string(kind_) + " file " + path_ + ": no such file");
    }
    // HDF5 opens the path itself: a FIFO there would block it forever.
    if (!S_ISREG(st.st_mode)) fail("it is " + file_kind(st.st_mode) + ", not a regular file");
    try {
      return h5::File::open_read(path_);
    } catch (const RuntimeFailure& e) {
      fail("not a readable HDF5 file (" + without_file_name(e) + ")");
    }
  }

  // Runs `body`, reporting an HDF5 failure inside it (a damaged chunk, a wrong type) as input.
  template <typename Body>
  auto guard(Body&& body) const {
    try {
      return body();
    } catch (const RuntimeFailure& e) {
      fail(without_file_name(e));
    }
  }

  void require_dataset(const h5::File& file, const std::string& name) const {
    if (!guard([&] { return file.has_dataset(name); })) fail("dataset /" + name + " is missing");
  }

  // Checks presence, element kind and shape, then reads. Scalars may be stored as rank 0 (the
  // schema) or as one-element rank-1 datasets (what some hand-written fixtures do).
  template <typename T>
  NdArray<T> read_array(const h5::File& file, const std::string& name,
                        const std::vector<size_t>& expected, const char* schema_dims) const {
    require_dataset(file, name);
    const h5::DatasetInfo info = guard([&] { return file.dataset_info(name); });
    const bool want_integer = std::is_integral_v<T>;
    const auto kind =
        want_integer ? h5::DatasetInfo::Kind::kInteger : h5::DatasetInfo::Kind::kFloat;
    if (info.kind != kind) {
      fail("dataset /" + name + " does not hold " + (want_integer ? "integers" : "floats"));
    }
    const bool scalar_ok = expected.empty() && NdArray<T>::count(info.shape) == 1;
    if (info.shape != expected && !scalar_ok) {
      fail("dataset /" + name + " has shape " + shape_text(info.shape) + ", expected " +
           shape_text(expected) + " (" + schema_dims + ")");
    }
    NdArray<T> array;
    array.data = guard([&] { return file.read_dataset<T>(name, &array.shape); });
    array.shape = expected;  // normalises a one-element rank-1 scalar
    array.dims = schema_dims;
    if (guard([&] { return file.has_attribute("dims", name); })) {
      array.dims = guard([&] { return file.read_string_attribute("dims", name); });
    }
    return array;
  }

  void require_attribute(const h5::File& file, const std::string& name) const {
    if (!guard([&] { return file.has_attribute(name); })) {
      fail("root attribute " + name + " is missing");
    }
  }
  std::string string_attribute(const h5::File& file, const std::string& name) const {
    require_attribute(file, name);
    return guard([&] { return file.read_string_attribute(name); });
  }
  int64_t int_attribute(const h5::File& file, const std::string& name) const {
    require_attribute(file, name);
    return guard([&] { return file.read_int_attribute(name); });
  }
  double double_attribute(const h5::File& file, const std::string& name) const {
    require_attribute(file, name);
    return guard([&] { return file.read_double_attribute(name); });
  }
  size_t size(int64_t value, const char* name) const {
    if (value < 0) fail(std::string("root attribute ") + name + " is negative");
    return static_cast<size_t>(value);
  }

 private:
  // The wrapper's message starts with the file name, which fail() already puts first.
  std::string without_file_name(const RuntimeFailure& e) const {
    const std::string message = e.what();
    const std::string prefix = h5::file_context_prefix(path_);
    return message.rfind(prefix, 0) == 0 ? message.substr(prefix.size()) : message;
  }

  std::string path_;
  const char* kind_;
};

// Reads every dataset of `specs` into `owner`; optional ones only when present.
template <typename Owner>
void read_datasets(const Reader& reader, const h5::File& file, Owner& owner,
                   const std::vector<DatasetSpec<Owner>>& specs, const Sizes& sizes,
                   ContentDigest* digest = nullptr) {
  for (const DatasetSpec<Owner>& spec : specs) {
    if (spec.when[0] != '\0' && !reader.guard([&] { return file.has_dataset(spec.name); }))
      continue;
    const std::vector<size_t> expected = expected_shape(spec.axes, sizes);
    const std::string dims = dims_text(spec.axes);
    std::visit(
        [&](auto pointer) {
          auto& value = owner.*pointer;
          using Value = std::decay_t<decltype(value)>;
          if constexpr (std::is_arithmetic_v<Value>) {
            using Stored = std::conditional_t<std::is_integral_v<Value>, Value, float>;
            value = static_cast<Value>(
                reader.template read_array<Stored>(file, spec.name, {}, kScalarDims).data.at(0));
          } else if constexpr (std::is_same_v<Value, std::vector<std::string>>) {
            reader.require_dataset(file, spec.name);
            value = reader.guard([&] { return file.read_strings(spec.name); });
            if (std::vector<size_t>{value.size()} != expected) {
              reader.fail("dataset /" + std::string(spec.name) + " has " +
                          std::to_string(value.size()) + " entries, expected " +
                          shape_text(expected));
            }
          } else if constexpr (std::is_same_v<Value, std::vector<int64_t>>) {
            value =
                reader.template read_array<int64_t>(file, spec.name, expected, dims.c_str()).data;
          } else {
            using Element = std::decay_t<decltype(value.data[0])>;
            value = reader.template read_array<Element>(file, spec.name, expected, dims.c_str());
          }
        },
        spec.member);
    if (digest) digest_value(*digest, owner, spec);
  }
}

std::string join(const std::vector<std::string>& parts, char separator) {
  std::string text;
  for (size_t i = 0; i < parts.size(); ++i) text += (i ? std::string(1, separator) : "") + parts[i];
  return text;
}

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  if (text.empty()) return parts;
  size_t start = 0;
  while (true) {
    const size_t end = text.find(separator, start);
    parts.push_back(text.substr(start, end - start));
    if (end == std::string::npos) return parts;
    start = end + 1;
  }
}

// ---- sweep.h5, contract 1.2: attributes and bootstrap intervals ------------------------------

// The quantities the sweep's bootstrap covers (docs/metrics.md "Scientific validity"), with the
// axes of one checkpoint's value: bootstrap/<name>/se has [checkpoint, axes...] and
// bootstrap/<name>/ci95 [checkpoint, axes..., bound].
struct BootstrapQuantity {
  const char* name;
  std::vector<Axis> axes;
  const char* long_name;
};
const std::vector<BootstrapQuantity>& bootstrap_quantities() {
  using A = Axis;
  static const std::vector<BootstrapQuantity> q = {
      {"sink_score", {A::kLayer, A::kHead}, "sink score"},
      {"max_sink_score", {}, "largest sink score"},
      {"sink_rate", {A::kLayer}, "sink rate"},
      {"h_ratio", {A::kLayerInput}, "position-0 norm ratio"},
      {"norm_gain_share", {A::kLayer}, "norm-gain share"},
      {"layer_share", {A::kEmbeddingOrLayer}, "layer share"},
      {"first2_share", {}, "share of layers 0 and 1"},
      {"causal_layer_share", {A::kEmbeddingOrLayer}, "causal layer share"},
      {"causal_first2_share", {}, "causal share of layers 0 and 1"},
  };
  return q;
}

// One interval's two datasets, written and read through the schema machinery above.
std::vector<DatasetSpec<Sweep::Interval>> bootstrap_specs(const BootstrapQuantity& q,
                                                          std::vector<std::string>& names,
                                                          std::vector<std::string>& titles) {
  names = {std::string("bootstrap/") + q.name + "/se",
           std::string("bootstrap/") + q.name + "/ci95"};
  titles = {std::string("standard error of ") + q.long_name,
            std::string("95% interval of ") + q.long_name};
  std::vector<Axis> se_axes{Axis::kCheckpoint};
  se_axes.insert(se_axes.end(), q.axes.begin(), q.axes.end());
  std::vector<Axis> ci_axes = se_axes;
  ci_axes.push_back(Axis::kBound);
  return {
      {names[0].c_str(), se_axes, titles[0].c_str(), "1",
       "bootstrap standard error over probes (metrics 1.2)", &Sweep::Interval::se, "--bootstrap"},
      {names[1].c_str(), ci_axes, titles[1].c_str(), "1",
       "2.5th and 97.5th percentiles of the bootstrap replicates (metrics 1.2)",
       &Sweep::Interval::ci95, "--bootstrap"}};
}

void write_sweep_v12(h5::File& file, const Sweep& s, const Sizes& sizes, const std::string& path,
                     std::set<Axis>& axes_done) {
  if (s.convergence_outcome.empty()) return;
  file.write_string_attribute("convergence_outcome", s.convergence_outcome);
  file.write_string_attribute("convergence_profile", s.convergence_profile);
  file.write_int_attribute("bootstrap_replicates", s.bootstrap_replicates);
  file.write_int_attribute("bootstrap_seed", s.bootstrap_seed);
  for (const Sweep::Interval& iv : s.bootstrap)
    for (const BootstrapQuantity& q : bootstrap_quantities())
      if (iv.name == q.name) {
        std::vector<std::string> names, titles;
        write_datasets(file, iv, bootstrap_specs(q, names, titles), sizes, path, axes_done);
      }
}

void read_sweep_v12(const h5::File& file, const Reader& reader, Sweep& s, const Sizes& sizes) {
  if (!reader.guard([&] { return file.has_attribute("convergence_outcome"); })) return;
  s.convergence_outcome = reader.string_attribute(file, "convergence_outcome");
  s.convergence_profile = reader.string_attribute(file, "convergence_profile");
  s.bootstrap_replicates = reader.int_attribute(file, "bootstrap_replicates");
  s.bootstrap_seed = reader.int_attribute(file, "bootstrap_seed");
  for (const BootstrapQuantity& q : bootstrap_quantities()) {
    std::vector<std::string> names, titles;
    const auto specs = bootstrap_specs(q, names, titles);
    if (!reader.guard([&] { return file.has_dataset(names[0]); })) continue;
    reader.require_dataset(file, names[1]);
    Sweep::Interval iv;
    iv.name = q.name;
    read_datasets(reader, file, iv, specs, sizes);
    s.bootstrap.push_back(std::move(iv));
  }
}

}  // namespace

void write_analysis(const std::string& path, const Analysis& a) {
  Sizes sizes = sizes_of(a.meta, path);
  // Ablation results come as a pair, K rows each, or not at all.
  const bool has_components = !a.ablation_components.empty();
  if (has_components != !a.ablation_delta_sink.empty()) {
    throw RuntimeFailure("cannot write " + path +
                         ": circuit/ablation needs both components and delta_sink_score");
  }
  if (has_components) {
    sizes.ablations = a.ablation_components.shape.empty() ? 0 : a.ablation_components.shape[0];
  }

  // A producer that did not stamp a version gets this build's.
  AnalysisMeta meta = a.meta;
  if (meta.sinkscope_version.empty()) meta.sinkscope_version = SINKSCOPE_VERSION;

  commit_atomically(path, [&](const std::string& tmp_path) {
    h5::File file = h5::File::create(tmp_path);
    write_meta(file, a.meta);
    // The digest covers the attributes as written: with this build's version and commit where
    // the producer stamped none (write_meta does the same).
    AnalysisMeta written = a.meta;
    if (written.sinkscope_version.empty()) written.sinkscope_version = SINKSCOPE_VERSION;
    if (written.git_commit.empty()) written.git_commit = SINKSCOPE_GIT_COMMIT;
    ContentDigest digest;
    digest_meta(digest, written);
    std::set<Axis> axes_done;
    write_datasets(file, a, analysis_datasets(), sizes, path, axes_done, &digest);
    file.write_string_attribute(kContentSha256, digest.hex());
    file.close();
  });
}

Analysis read_analysis(const std::string& path) {
  const Reader reader(path, "analysis");
  const h5::File file = reader.open();
  Analysis a;
  AnalysisMeta& m = a.meta;
  m.sinkscope_version = reader.string_attribute(file, "sinkscope_version");
  m.model_type = reader.string_attribute(file, "model_type");
  m.checkpoint = reader.string_attribute(file, "checkpoint");
  m.step = reader.int_attribute(file, "step");
  m.num_layers = reader.int_attribute(file, "num_layers");
  m.num_heads = reader.int_attribute(file, "num_heads");
  m.num_kv_heads = reader.int_attribute(file, "num_kv_heads");
  m.head_dim = reader.int_attribute(file, "head_dim");
  m.num_experts = reader.int_attribute(file, "num_experts");
  m.top_k = reader.int_attribute(file, "top_k");
  m.hidden_size = reader.int_attribute(file, "hidden_size");
  m.num_probes = reader.int_attribute(file, "num_probes");
  m.seq_len = reader.int_attribute(file, "seq_len");
  m.eps = reader.double_attribute(file, "eps");
  m.sink_rate = reader.double_attribute(file, "sink_rate");
  m.tp = reader.int_attribute(file, "tp");
  m.ep = reader.int_attribute(file, "ep");
  m.dp = reader.int_attribute(file, "dp");
  m.world_size = reader.int_attribute(file, "world_size");
  m.device = reader.string_attribute(file, "device");
  m.tokens_sha256 = reader.string_attribute(file, "tokens_sha256");
  m.created_utc = reader.string_attribute(file, "created_utc");
  // sinkscope additions to the schema (later format versions): tolerate files without them.
  auto has = [&](const char* name) {
    return reader.guard([&] { return file.has_attribute(name); });
  };
  m.format_version = has("format_version") ? reader.int_attribute(file, "format_version") : 1;
  for (auto [name, field] :
       {std::pair{"layout", &AnalysisMeta::layout},
        {"git_commit", &AnalysisMeta::git_commit},
        {"command_line", &AnalysisMeta::command_line},
        {"options", &AnalysisMeta::options},
        {"probes", &AnalysisMeta::probes},
        {"ablate", &AnalysisMeta::ablate},
        {"checkpoint_headers_sha256", &AnalysisMeta::checkpoint_headers_sha256}}) {
    if (has(name)) m.*field = reader.string_attribute(file, name);
  }
  for (auto [name, field] : {std::pair{"etp", &AnalysisMeta::etp},
                             {"prepend_bos", &AnalysisMeta::prepend_bos},
                             {"batch", &AnalysisMeta::batch},
                             {"threads", &AnalysisMeta::threads},
                             {"per_query", &AnalysisMeta::per_query}}) {
    if (has(name)) m.*field = reader.int_attribute(file, name);
  }
  if (has("circuit_identity_max_rel_err"))
    m.circuit_identity_max_rel_err = reader.double_attribute(file, "circuit_identity_max_rel_err");

  Sizes sizes;
  sizes.probes = reader.size(m.num_probes, "num_probes");
  sizes.positions = reader.size(m.seq_len, "seq_len");
  sizes.layers = reader.size(m.num_layers, "num_layers");
  sizes.heads = reader.size(m.num_heads, "num_heads");
  sizes.experts = reader.size(m.num_experts, "num_experts");

  // Ablation datasets are optional but come as a pair; K is the components' row count.
  constexpr const char* kComponents = "circuit/ablation/components";
  constexpr const char* kDelta = "circuit/ablation/delta_sink_score";
  const bool has_components = reader.guard([&] { return file.has_dataset(kComponents); });
  const bool has_delta = reader.guard([&] { return file.has_dataset(kDelta); });
  if (has_components != has_delta) {
    reader.fail(std::string("dataset /") + (has_components ? kDelta : kComponents) + " is missing");
  }
  if (has_components) {
    const h5::DatasetInfo info = reader.guard([&] { return file.dataset_info(kComponents); });
    if (info.shape.size() != 2) {
      reader.fail(std::string("dataset /") + kComponents + " has shape " + shape_text(info.shape) +
                  ", expected [K,3]");
    }
    sizes.ablations = info.shape[0];
  }
  // The digest of what is read, in the writer's order; compared with content_sha256 below.
  ContentDigest digest;
  digest_meta(digest, m);
  read_datasets(reader, file, a, analysis_datasets(), sizes, &digest);
  // Files of other writers and of earlier sinkscope versions have no checksum: read as they are;
  // `sweep --resume` does not trust them (analysis_file_matches).
  if (reader.guard([&] { return file.has_attribute(kContentSha256); })) {
    m.content_sha256 = reader.string_attribute(file, kContentSha256);
    if (digest.hex() != m.content_sha256)
      reader.fail(
          "content does not match its checksum (content_sha256): the file was changed or "
          "damaged after it was written");
  }
  return a;
}

void write_sweep(const std::string& path, const Sweep& s) {
  const size_t checkpoints = s.steps.size();
  // L and H come from sink_score [C, L, H]; every other dataset must agree with them.
  const std::vector<size_t>& score_shape = s.sink_score.shape;
  Sizes sizes;
  sizes.checkpoints = checkpoints;
  sizes.layers = score_shape.size() == 3 ? score_shape[1] : 0;
  sizes.heads = score_shape.size() == 3 ? score_shape[2] : 0;
  // Files assembled from analyses of format version 1 have no per-checkpoint provenance.
  Sweep filled = s;
  filled.checkpoint_paths.resize(checkpoints);
  filled.checkpoint_headers_sha256.resize(checkpoints);

  commit_atomically(path, [&](const std::string& tmp_path) {
    h5::File file = h5::File::create(tmp_path);
    file.write_string_attribute("sinkscope_version", SINKSCOPE_VERSION);
    file.write_int_attribute("format_version",
                             s.format_version > 0 ? s.format_version : kFormatVersion);
    file.write_string_attribute("git_commit",
                                s.git_commit.empty() ? SINKSCOPE_GIT_COMMIT : s.git_commit);
    file.write_string_attribute("command_line", s.command_line);
    file.write_string_attribute("options", s.options);
    file.write_string_attribute("tokens_sha256", s.tokens_sha256);
    file.write_double_attribute("eps", s.eps);
    file.write_double_attribute("tau", s.tau);
    // A comma-separated list: checkpoint names are folder names, which carry no commas.
    file.write_string_attribute("failed", join(s.failed, ','));
    std::set<Axis> axes_done;
    write_datasets(file, filled, sweep_datasets(), sizes, path, axes_done);
    write_sweep_v12(file, filled, sizes, path, axes_done);
    file.close();
  });
}

Sweep read_sweep(const std::string& path) {
  const Reader reader(path, "sweep");
  const h5::File file = reader.open();
  Sweep s;
  s.tau = reader.double_attribute(file, "tau");
  s.failed = split(reader.string_attribute(file, "failed"), ',');
  auto has = [&](const char* name) {
    return reader.guard([&] { return file.has_attribute(name); });
  };
  s.format_version = has("format_version") ? reader.int_attribute(file, "format_version") : 1;
  for (auto [name, field] : {std::pair{"git_commit", &Sweep::git_commit},
                             {"command_line", &Sweep::command_line},
                             {"options", &Sweep::options},
                             {"tokens_sha256", &Sweep::tokens_sha256}}) {
    if (has(name)) s.*field = reader.string_attribute(file, name);
  }
  if (has("eps")) s.eps = reader.double_attribute(file, "eps");

  reader.require_dataset(file, "steps");
  const h5::DatasetInfo steps_info = reader.guard([&] { return file.dataset_info("steps"); });
  if (steps_info.kind != h5::DatasetInfo::Kind::kInteger || steps_info.shape.size() != 1) {
    reader.fail("dataset /steps is not a 1-D integer dataset");
  }
  reader.require_dataset(file, "sink_score");
  const h5::DatasetInfo score = reader.guard([&] { return file.dataset_info("sink_score"); });
  if (score.shape.size() != 3) {
    reader.fail("dataset /sink_score has shape " + shape_text(score.shape) +
                ", expected [checkpoint,layer,head]");
  }
  Sizes sizes;
  sizes.checkpoints = steps_info.shape[0];
  sizes.layers = score.shape[1];
  sizes.heads = score.shape[2];
  std::vector<DatasetSpec<Sweep>> specs = sweep_datasets();
  if (s.format_version < 2) {  // per-checkpoint provenance arrived with format version 2
    specs.erase(std::remove_if(specs.begin(), specs.end(),
                               [](const DatasetSpec<Sweep>& spec) {
                                 return spec.member == Member<Sweep>(&Sweep::checkpoint_paths) ||
                                        spec.member ==
                                            Member<Sweep>(&Sweep::checkpoint_headers_sha256);
                               }),
                specs.end());
  }
  read_datasets(reader, file, s, specs, sizes);
  read_sweep_v12(file, reader, s, sizes);
  return s;
}

}  // namespace sinkscope
