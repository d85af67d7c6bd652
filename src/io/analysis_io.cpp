// The analysis file and sweep.h5 of INTERFACE.md. Dataset and attribute names here are the
// contract: scripts, plots and other people's code read them. Add, never rename.
//
// One table per file kind lists every dataset with its schema axes, so the writer and the reader
// cannot drift apart, and both check shapes against the root attributes: a file that reads back
// is a file whose numbers line up with its own description (what `sweep --resume` relies on).
#include <algorithm>
#include <filesystem>
#include <string>
#include <type_traits>
#include <vector>

#include "io/hdf5_file.hpp"
#include "sinkscope/analysis.hpp"
#include "sinkscope/build_config.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/io.hpp"

namespace sinkscope {

namespace {

constexpr const char* kScalarDims = "scalar";

// The sizes every analysis dataset is made of, taken from the root attributes.
struct Sizes {
  size_t probes = 0;     // N
  size_t positions = 0;  // T
  size_t layers = 0;     // L
  size_t heads = 0;      // H
  size_t experts = 0;    // E
  size_t ablations = 0;  // K: not an attribute; taken from circuit/ablation/components
};

// Axes of the schema, resolved against Sizes.
enum class Axis { kProbe, kPosition, kLayer, kLayerPlusOne, kHead, kExpert, kAblation, kThree };

size_t extent(Axis axis, const Sizes& s) {
  switch (axis) {
    case Axis::kProbe:
      return s.probes;
    case Axis::kPosition:
      return s.positions;
    case Axis::kLayer:
      return s.layers;
    case Axis::kLayerPlusOne:
      return s.layers + 1;
    case Axis::kHead:
      return s.heads;
    case Axis::kExpert:
      return s.experts;
    case Axis::kAblation:
      return s.ablations;
    case Axis::kThree:
      return 3;
  }
  return 0;
}

template <typename T>
struct Field {
  const char* name;        // dataset path, INTERFACE.md
  const char* dims;        // axis names written when the array does not name its own
  std::vector<Axis> axes;  // expected shape
  NdArray<T> Analysis::*member;
  bool optional;  // written only when non-empty (--per-query, --ablate)
};

// Axis names: "layer_input" indexes the residual stream x_0..x_L (x_l enters layer l, x_L is the
// final residual); "embedding_or_layer" indexes layer_share (0 = embedding, 1 + l = layer l).
const std::vector<Field<float>>& float_fields() {
  using A = Axis;
  // One dataset per line: the table reads like INTERFACE.md's.
  // clang-format off
  static const std::vector<Field<float>> fields = {
      {"attention/sink_score", "layer,head", {A::kLayer, A::kHead}, &Analysis::sink_score, false},
      {"attention/sink_rate", "layer", {A::kLayer}, &Analysis::sink_rate, false},
      {"attention/p0_per_query", "probe,layer,head,query",
       {A::kProbe, A::kLayer, A::kHead, A::kPosition}, &Analysis::p0_per_query, true},
      {"residual/norm_p0", "probe,layer_input",
       {A::kProbe, A::kLayerPlusOne}, &Analysis::norm_p0, false},
      {"residual/norm_rest_median", "probe,layer_input",
       {A::kProbe, A::kLayerPlusOne}, &Analysis::norm_rest_median, false},
      {"residual/h_ratio", "layer_input", {A::kLayerPlusOne}, &Analysis::h_ratio, false},
      {"residual/p0_cosine", "layer_input", {A::kLayerPlusOne}, &Analysis::p0_cosine, false},
      {"writes/attn_head_p0", "layer,head", {A::kLayer, A::kHead}, &Analysis::attn_head_p0, false},
      {"writes/attn_head_rest", "layer,head",
       {A::kLayer, A::kHead}, &Analysis::attn_head_rest, false},
      {"writes/moe_p0", "layer", {A::kLayer}, &Analysis::moe_p0, false},
      {"writes/moe_rest", "layer", {A::kLayer}, &Analysis::moe_rest, false},
      {"writes/expert_p0", "layer,expert", {A::kLayer, A::kExpert}, &Analysis::expert_p0, false},
      {"routing/p0_topk_freq", "layer,expert",
       {A::kLayer, A::kExpert}, &Analysis::p0_topk_freq, false},
      {"routing/rest_topk_freq", "layer,expert",
       {A::kLayer, A::kExpert}, &Analysis::rest_topk_freq, false},
      {"circuit/attr_embed", "target_layer,target_head",
       {A::kLayer, A::kHead}, &Analysis::attr_embed, false},
      {"circuit/attr_head", "target_layer,target_head,source_layer,source_head",
       {A::kLayer, A::kHead, A::kLayer, A::kHead}, &Analysis::attr_head, false},
      {"circuit/attr_expert", "target_layer,target_head,source_layer,source_expert",
       {A::kLayer, A::kHead, A::kLayer, A::kExpert}, &Analysis::attr_expert, false},
      {"circuit/attr_mlp", "target_layer,target_head,source_layer",
       {A::kLayer, A::kHead, A::kLayer}, &Analysis::attr_mlp, false},
      // Format 1.1: families with a shared expert (absent from 1.0 files: read as empty).
      {"circuit/attr_shared_expert", "target_layer,target_head,source_layer",
       {A::kLayer, A::kHead, A::kLayer}, &Analysis::attr_shared_expert, true},
      {"circuit/ablation/delta_sink_score", "component,layer,head",
       {A::kAblation, A::kLayer, A::kHead}, &Analysis::ablation_delta_sink, true},
      {"profile/layer_share", "embedding_or_layer",
       {A::kLayerPlusOne}, &Analysis::layer_share, false},
      {"profile/norm_gain_share", "layer", {A::kLayer}, &Analysis::norm_gain_share, false},
      // Contract 1.2 (docs/metrics.md "Scientific validity"): per-probe records for the sweep's
      // bootstrap, the causal layer profile (--causal-profile) and the ablation search.
      {"attention/sink_score_per_probe", "probe,layer,head",
       {A::kProbe, A::kLayer, A::kHead}, &Analysis::sink_score_per_probe, true},
      {"profile/attr_layer_per_probe", "probe,embedding_or_layer",
       {A::kProbe, A::kLayerPlusOne}, &Analysis::attr_layer_per_probe, true},
      {"profile/causal_drop", "embedding_or_layer",
       {A::kLayerPlusOne}, &Analysis::causal_drop, true},
      {"profile/causal_drop_attention", "layer", {A::kLayer}, &Analysis::causal_drop_attention, true},
      {"profile/causal_drop_ffn", "layer", {A::kLayer}, &Analysis::causal_drop_ffn, true},
      {"profile/causal_drop_per_probe", "probe,embedding_or_layer",
       {A::kProbe, A::kLayerPlusOne}, &Analysis::causal_drop_per_probe, true},
      {"profile/causal_layer_share", "embedding_or_layer",
       {A::kLayerPlusOne}, &Analysis::causal_layer_share, true},
      {"circuit/search/layer_drop", "embedding_or_layer",
       {A::kLayerPlusOne}, &Analysis::search_layer_drop, true},
      {"circuit/search/effect", "component", {A::kAblation}, &Analysis::search_effect, true},
  };
  // clang-format on
  return fields;
}

const std::vector<Field<int32_t>>& int_fields() {
  using A = Axis;
  // clang-format off
  static const std::vector<Field<int32_t>> fields = {
      {"tokens", "probe,position", {A::kProbe, A::kPosition}, &Analysis::tokens, false},
      {"residual/massive_p0", "layer_input", {A::kLayerPlusOne}, &Analysis::massive_p0, false},
      // Fields: source layer, kind (ComponentKind: 0 head, 1 expert, 2 embedding, 3 dense MLP,
      // 4 shared expert), index (docs/metrics.md section 4).
      {"circuit/ablation/components", "component,field",
       {A::kAblation, A::kThree}, &Analysis::ablation_components, true},
  };
  // clang-format on
  return fields;
}

constexpr const char* kFirst2Share = "profile/first2_share";
constexpr const char* kPeakLayer = "profile/peak_layer";
constexpr const char* kEntropy = "profile/entropy";
constexpr const char* kAblationComponents = "circuit/ablation/components";
constexpr const char* kCausalFirst2Share = "profile/causal_first2_share";
constexpr const char* kCausalPeakLayer = "profile/causal_peak_layer";
constexpr const char* kSearchSelected = "circuit/search/selected";
constexpr const char* kSearchShare = "circuit/search/share";

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

size_t axis_count(const std::string& dims) {
  if (dims.empty()) return 0;
  return static_cast<size_t>(std::count(dims.begin(), dims.end(), ',')) + 1;
}

// The array's own axis names when they fit its rank (producers may be more specific than the
// schema), otherwise the schema's: every dataset gets a usable `dims` either way.
std::string dims_for(const std::string& own, const char* schema, size_t rank) {
  if (rank == 0) return kScalarDims;
  return axis_count(own) == rank ? own : schema;
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

template <typename T>
void write_array(h5::File& file, const char* name, const NdArray<T>& array,
                 const std::vector<size_t>& expected, const char* schema_dims,
                 const std::string& final_path) {
  const std::vector<size_t> shape = checked_write_shape(array, expected, final_path, name);
  file.write_dataset(name, array.ptr(), shape, dims_for(array.dims, schema_dims, shape.size()));
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
  file.write_string_attribute("model_type", meta.model_type);
  file.write_string_attribute("checkpoint", meta.checkpoint);
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
    std::error_code error;
    if (!std::filesystem::exists(path_, error)) {
      throw InputError("cannot read " + std::string(kind_) + " file " + path_ + ": no such file");
    }
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

// ---- sweep.h5 ------------------------------------------------------------------------------

struct SweepField {
  const char* name;
  const char* dims;
  FloatArray Sweep::*member;
};

// Sweep shapes in terms of C (checkpoints), L and H: see expected_sweep_shape.
const std::vector<SweepField>& sweep_fields() {
  static const std::vector<SweepField> fields = {
      {"sink_rate", "checkpoint,layer", &Sweep::sink_rate},
      {"sink_score", "checkpoint,layer,head", &Sweep::sink_score},
      {"h_ratio", "checkpoint,layer_input", &Sweep::h_ratio},
      {"layer_share", "checkpoint,embedding_or_layer", &Sweep::layer_share},
      {"first2_share", "checkpoint", &Sweep::first2_share},
      {"norm_gain_share", "checkpoint,layer", &Sweep::norm_gain_share},
      // tv[i] compares checkpoint i with checkpoint i + 1.
      {"convergence/tv", "checkpoint_pair", &Sweep::convergence_tv},
  };
  return fields;
}

std::vector<size_t> expected_sweep_shape(const std::string& name, size_t c, size_t l, size_t h) {
  if (name == "sink_rate" || name == "norm_gain_share") return {c, l};
  if (name == "sink_score") return {c, l, h};
  if (name == "h_ratio" || name == "layer_share") return {c, l + 1};
  if (name == "first2_share") return {c};
  return {c == 0 ? 0 : c - 1};  // convergence/tv
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

// ---- sweep.h5, contract 1.2 (docs/metrics.md "Scientific validity") --------------------------

// The 1.2 datasets of a sweep that have a fixed shape in C and L: name, dims, member, extents
// (0: C, 1: C - 1, 2: L + 1).
struct SweepV12Field {
  const char* name;
  const char* dims;
  FloatArray Sweep::*member;
  std::vector<int> axes;
};

const std::vector<SweepV12Field>& sweep_v12_fields() {
  static const std::vector<SweepV12Field> fields = {
      {"max_sink_score", "checkpoint", &Sweep::max_sink_score, {0}},
      {"causal_layer_share", "checkpoint,embedding_or_layer", &Sweep::causal_layer_share, {0, 2}},
      {"causal_first2_share", "checkpoint", &Sweep::causal_first2_share, {0}},
      {"bootstrap/noise_floor", "checkpoint", &Sweep::noise_floor, {0}},
      {"convergence/distance", "checkpoint_pair", &Sweep::convergence_distance, {1}},
      {"convergence/distance_per_doubling",
       "checkpoint_pair",
       &Sweep::convergence_distance_per_doubling,
       {1}},
      {"convergence/threshold", "checkpoint_pair", &Sweep::convergence_threshold, {1}},
  };
  return fields;
}

std::vector<size_t> v12_shape(const std::vector<int>& axes, size_t c, size_t l) {
  std::vector<size_t> shape;
  for (int a : axes) shape.push_back(a == 0 ? c : a == 1 ? (c == 0 ? 0 : c - 1) : l + 1);
  return shape;
}

void write_sweep_v12(h5::File& file, const Sweep& s, size_t checkpoints, size_t layers) {
  const std::string path = "sweep.h5";
  for (const SweepV12Field& f : sweep_v12_fields()) {
    const FloatArray& array = s.*f.member;
    if (array.empty()) continue;
    write_array(file, f.name, array, v12_shape(f.axes, checkpoints, layers), f.dims, path);
  }
  if (!s.convergence_still.empty())
    write_array(file, "convergence/still", s.convergence_still,
                {checkpoints == 0 ? 0 : checkpoints - 1}, "checkpoint_pair", path);
  if (s.convergence_outcome.empty()) return;
  file.write_string_attribute("convergence_outcome", s.convergence_outcome);
  file.write_string_attribute("convergence_profile", s.convergence_profile);
  file.write_scalar<int64_t>("convergence/converged_step", s.converged_step);
  file.write_int_attribute("bootstrap_replicates", s.bootstrap_replicates);
  file.write_int_attribute("bootstrap_seed", s.bootstrap_seed);
  for (const Sweep::Interval& iv : s.bootstrap) {
    std::string dims = "checkpoint";
    if (iv.se.shape.size() >= 2) dims += iv.se.shape.size() == 3 ? ",layer,head" : ",layer_index";
    file.write_dataset("bootstrap/" + iv.name + "/se", iv.se.ptr(), iv.se.shape, dims);
    file.write_dataset("bootstrap/" + iv.name + "/ci95", iv.ci95.ptr(), iv.ci95.shape,
                       dims + ",bound");
  }
}

void read_sweep_v12(const h5::File& file, const Reader& reader, Sweep& s, size_t checkpoints,
                    size_t layers) {
  for (const SweepV12Field& f : sweep_v12_fields())
    if (reader.guard([&] { return file.has_dataset(f.name); }))
      s.*f.member =
          reader.read_array<float>(file, f.name, v12_shape(f.axes, checkpoints, layers), f.dims);
  if (reader.guard([&] { return file.has_dataset("convergence/still"); }))
    s.convergence_still = reader.read_array<int32_t>(
        file, "convergence/still", {checkpoints == 0 ? 0 : checkpoints - 1}, "checkpoint_pair");
  if (!reader.guard([&] { return file.has_attribute("convergence_outcome"); })) return;
  s.convergence_outcome = reader.string_attribute(file, "convergence_outcome");
  s.convergence_profile = reader.string_attribute(file, "convergence_profile");
  s.converged_step =
      reader.guard([&] { return file.read_dataset<int64_t>("convergence/converged_step"); }).at(0);
  s.bootstrap_replicates = reader.int_attribute(file, "bootstrap_replicates");
  s.bootstrap_seed = reader.int_attribute(file, "bootstrap_seed");
  for (const char* name :
       {"sink_score", "max_sink_score", "sink_rate", "h_ratio", "norm_gain_share", "layer_share",
        "first2_share", "causal_layer_share", "causal_first2_share"}) {
    const std::string se = std::string("bootstrap/") + name + "/se";
    if (!reader.guard([&] { return file.has_dataset(se); })) continue;
    Sweep::Interval iv;
    iv.name = name;
    iv.se.data = reader.guard([&] { return file.read_dataset<float>(se, &iv.se.shape); });
    const std::string ci = std::string("bootstrap/") + name + "/ci95";
    reader.require_dataset(file, ci);
    iv.ci95.data = reader.guard([&] { return file.read_dataset<float>(ci, &iv.ci95.shape); });
    s.bootstrap.push_back(iv);
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

  commit_atomically(path, [&](const std::string& tmp_path) {
    h5::File file = h5::File::create(tmp_path);
    write_meta(file, a.meta);
    for (const Field<int32_t>& field : int_fields()) {
      const IntArray& array = a.*field.member;
      if (field.optional && array.empty()) continue;
      write_array(file, field.name, array, expected_shape(field.axes, sizes), field.dims, path);
    }
    for (const Field<float>& field : float_fields()) {
      const FloatArray& array = a.*field.member;
      if (field.optional && array.empty()) continue;
      write_array(file, field.name, array, expected_shape(field.axes, sizes), field.dims, path);
    }
    file.write_scalar<float>(kFirst2Share, a.first2_share);
    file.write_scalar<int32_t>(kPeakLayer, a.peak_layer);
    file.write_scalar<float>(kEntropy, a.entropy);
    if (a.has_causal_profile()) {
      file.write_scalar<float>(kCausalFirst2Share, a.causal_first2_share);
      file.write_scalar<int32_t>(kCausalPeakLayer, a.causal_peak_layer);
    }
    if (!a.search_effect.empty()) {
      file.write_scalar<int32_t>(kSearchSelected, a.search_selected);
      file.write_scalar<float>(kSearchShare, a.search_share);
    }
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
  // `layout` is a sinkscope addition to the schema: tolerate files from other writers.
  if (reader.guard([&] { return file.has_attribute("layout"); })) {
    m.layout = reader.string_attribute(file, "layout");
  }
  if (reader.guard([&] { return file.has_attribute("etp"); }))
    m.etp = reader.int_attribute(file, "etp");
  if (reader.guard([&] { return file.has_attribute("circuit_identity_max_rel_err"); }))
    m.circuit_identity_max_rel_err = reader.double_attribute(file, "circuit_identity_max_rel_err");

  Sizes sizes;
  sizes.probes = reader.size(m.num_probes, "num_probes");
  sizes.positions = reader.size(m.seq_len, "seq_len");
  sizes.layers = reader.size(m.num_layers, "num_layers");
  sizes.heads = reader.size(m.num_heads, "num_heads");
  sizes.experts = reader.size(m.num_experts, "num_experts");

  // Ablation datasets are optional but come as a pair; K is the components' row count.
  const bool has_components = reader.guard([&] { return file.has_dataset(kAblationComponents); });
  if (has_components) {
    const h5::DatasetInfo info =
        reader.guard([&] { return file.dataset_info(kAblationComponents); });
    if (info.shape.size() != 2) {
      reader.fail(std::string("dataset /") + kAblationComponents + " has shape " +
                  shape_text(info.shape) + ", expected [K,3]");
    }
    sizes.ablations = info.shape[0];
  }

  for (const Field<int32_t>& field : int_fields()) {
    if (field.optional && !reader.guard([&] { return file.has_dataset(field.name); })) continue;
    a.*field.member =
        reader.read_array<int32_t>(file, field.name, expected_shape(field.axes, sizes), field.dims);
  }
  for (const Field<float>& field : float_fields()) {
    // delta_sink_score is optional only together with components.
    const bool skip = field.optional && !reader.guard([&] { return file.has_dataset(field.name); });
    if (skip && !(has_components && field.member == &Analysis::ablation_delta_sink)) continue;
    a.*field.member =
        reader.read_array<float>(file, field.name, expected_shape(field.axes, sizes), field.dims);
  }
  if (!has_components &&
      reader.guard([&] { return file.has_dataset("circuit/ablation/delta_sink_score"); })) {
    reader.fail(std::string("dataset /") + kAblationComponents + " is missing");
  }
  a.first2_share = reader.read_array<float>(file, kFirst2Share, {}, kScalarDims).data.at(0);
  a.peak_layer = reader.read_array<int32_t>(file, kPeakLayer, {}, kScalarDims).data.at(0);
  a.entropy = reader.read_array<float>(file, kEntropy, {}, kScalarDims).data.at(0);
  if (a.has_causal_profile()) {
    a.causal_first2_share =
        reader.read_array<float>(file, kCausalFirst2Share, {}, kScalarDims).data.at(0);
    a.causal_peak_layer =
        reader.read_array<int32_t>(file, kCausalPeakLayer, {}, kScalarDims).data.at(0);
  }
  if (!a.search_effect.empty()) {
    a.search_selected =
        reader.read_array<int32_t>(file, kSearchSelected, {}, kScalarDims).data.at(0);
    a.search_share = reader.read_array<float>(file, kSearchShare, {}, kScalarDims).data.at(0);
  }
  return a;
}

void write_sweep(const std::string& path, const Sweep& s) {
  const size_t checkpoints = s.steps.size();
  if (s.names.size() != checkpoints) {
    throw RuntimeFailure("cannot write " + path + ": " + std::to_string(s.names.size()) +
                         " names for " + std::to_string(checkpoints) + " steps");
  }
  // L and H come from sink_score [C, L, H]; every other dataset must agree with them.
  const std::vector<size_t>& score_shape = s.sink_score.shape;
  const size_t layers = score_shape.size() == 3 ? score_shape[1] : 0;
  const size_t heads = score_shape.size() == 3 ? score_shape[2] : 0;

  commit_atomically(path, [&](const std::string& tmp_path) {
    h5::File file = h5::File::create(tmp_path);
    file.write_string_attribute("sinkscope_version", SINKSCOPE_VERSION);
    file.write_double_attribute("tau", s.tau);
    // A comma-separated list: checkpoint names are folder names, which carry no commas.
    file.write_string_attribute("failed", join(s.failed, ','));
    file.write_dataset("steps", s.steps.data(), {checkpoints}, "checkpoint");
    file.write_strings("names", s.names, "checkpoint");
    for (const SweepField& field : sweep_fields()) {
      write_array(file, field.name, s.*field.member,
                  expected_sweep_shape(field.name, checkpoints, layers, heads), field.dims, path);
    }
    file.write_scalar<int64_t>("convergence/step", s.convergence_step);
    write_sweep_v12(file, s, checkpoints, layers);
    file.close();
  });
}

Sweep read_sweep(const std::string& path) {
  const Reader reader(path, "sweep");
  const h5::File file = reader.open();
  Sweep s;
  s.tau = reader.double_attribute(file, "tau");
  s.failed = split(reader.string_attribute(file, "failed"), ',');

  reader.require_dataset(file, "steps");
  const h5::DatasetInfo steps_info = reader.guard([&] { return file.dataset_info("steps"); });
  if (steps_info.kind != h5::DatasetInfo::Kind::kInteger || steps_info.shape.size() != 1) {
    reader.fail("dataset /steps is not a 1-D integer dataset");
  }
  s.steps = reader.guard([&] { return file.read_dataset<int64_t>("steps"); });
  const size_t checkpoints = s.steps.size();

  reader.require_dataset(file, "names");
  s.names = reader.guard([&] { return file.read_strings("names"); });
  if (s.names.size() != checkpoints) {
    reader.fail("dataset /names has " + std::to_string(s.names.size()) + " entries for " +
                std::to_string(checkpoints) + " steps");
  }

  reader.require_dataset(file, "sink_score");
  const h5::DatasetInfo score = reader.guard([&] { return file.dataset_info("sink_score"); });
  if (score.shape.size() != 3) {
    reader.fail("dataset /sink_score has shape " + shape_text(score.shape) +
                ", expected [checkpoint,layer,head]");
  }
  const size_t layers = score.shape[1];
  const size_t heads = score.shape[2];
  for (const SweepField& field : sweep_fields()) {
    s.*field.member = reader.read_array<float>(
        file, field.name, expected_sweep_shape(field.name, checkpoints, layers, heads), field.dims);
  }
  reader.require_dataset(file, "convergence/step");
  const h5::DatasetInfo step_info =
      reader.guard([&] { return file.dataset_info("convergence/step"); });
  if (step_info.kind != h5::DatasetInfo::Kind::kInteger || IntArray::count(step_info.shape) != 1) {
    reader.fail("dataset /convergence/step is not an integer scalar");
  }
  s.convergence_step =
      reader.guard([&] { return file.read_dataset<int64_t>("convergence/step"); }).front();
  read_sweep_v12(file, reader, s, checkpoints, layers);
  return s;
}

}  // namespace sinkscope
