// The analysis file and sweep.h5 of INTERFACE.md. Dataset and attribute names here are the
// contract: scripts, plots and other people's code read them. Add, never rename.
//
// One table per file kind lists every dataset with its schema axes, so the writer and the reader
// cannot drift apart, and both check shapes against the root attributes: a file that reads back
// is a file whose numbers line up with its own description (what `sweep --resume` relies on).
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>
#include <type_traits>
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
      {"circuit/ablation/delta_sink_score", "component,layer,head",
       {A::kAblation, A::kLayer, A::kHead}, &Analysis::ablation_delta_sink, true},
      {"profile/layer_share", "embedding_or_layer",
       {A::kLayerPlusOne}, &Analysis::layer_share, false},
      {"profile/norm_gain_share", "layer", {A::kLayer}, &Analysis::norm_gain_share, false},
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
      // Fields: source layer, kind (0 head, 1 expert, 2 embedding), index (METRICS.md 4).
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

std::string shape_text(const std::vector<size_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? "," : "") + std::to_string(shape[i]);
  return text + "]";
}

// ---- content checksum ------------------------------------------------------------------------

// Root attribute `content_sha256`: SHA-256 over every root attribute and every dataset (path,
// dims, shape, values) in the order of the tables above. The writer hashes what it writes, the
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
                 const std::string& final_path, ContentDigest* digest = nullptr) {
  const std::vector<size_t> shape = checked_write_shape(array, expected, final_path, name);
  const std::string dims = dims_for(array.dims, schema_dims, shape.size());
  file.write_dataset(name, array.ptr(), shape, dims);
  if (digest != nullptr) digest->array(name, dims, shape, array.ptr(), array.data.size());
}

template <typename T>
void write_scalar(h5::File& file, const char* name, T value, ContentDigest& digest) {
  file.write_scalar<T>(name, value);
  digest.array(name, kScalarDims, {}, &value, 1);
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
  file.write_string_attribute("sinkscope_version", meta.sinkscope_version);
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
    ContentDigest digest;
    write_meta(file, meta);
    digest_meta(digest, meta);
    for (const Field<int32_t>& field : int_fields()) {
      const IntArray& array = a.*field.member;
      if (field.optional && array.empty()) continue;
      write_array(file, field.name, array, expected_shape(field.axes, sizes), field.dims, path,
                  &digest);
    }
    for (const Field<float>& field : float_fields()) {
      const FloatArray& array = a.*field.member;
      if (field.optional && array.empty()) continue;
      write_array(file, field.name, array, expected_shape(field.axes, sizes), field.dims, path,
                  &digest);
    }
    write_scalar<float>(file, kFirst2Share, a.first2_share, digest);
    write_scalar<int32_t>(file, kPeakLayer, a.peak_layer, digest);
    write_scalar<float>(file, kEntropy, a.entropy, digest);
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

  // The digest of what is read, in the writer's order; compared with content_sha256 below.
  ContentDigest digest;
  digest_meta(digest, m);
  const auto add = [&](const char* name, const auto& array) {
    digest.array(name, array.dims, array.shape, array.ptr(), array.data.size());
  };
  for (const Field<int32_t>& field : int_fields()) {
    if (field.optional && !reader.guard([&] { return file.has_dataset(field.name); })) continue;
    a.*field.member =
        reader.read_array<int32_t>(file, field.name, expected_shape(field.axes, sizes), field.dims);
    add(field.name, a.*field.member);
  }
  for (const Field<float>& field : float_fields()) {
    // delta_sink_score is optional only together with components.
    const bool skip = field.optional && !reader.guard([&] { return file.has_dataset(field.name); });
    if (skip && !(has_components && field.member == &Analysis::ablation_delta_sink)) continue;
    a.*field.member =
        reader.read_array<float>(file, field.name, expected_shape(field.axes, sizes), field.dims);
    add(field.name, a.*field.member);
  }
  if (!has_components &&
      reader.guard([&] { return file.has_dataset("circuit/ablation/delta_sink_score"); })) {
    reader.fail(std::string("dataset /") + kAblationComponents + " is missing");
  }
  const FloatArray first2 = reader.read_array<float>(file, kFirst2Share, {}, kScalarDims);
  const IntArray peak = reader.read_array<int32_t>(file, kPeakLayer, {}, kScalarDims);
  const FloatArray entropy = reader.read_array<float>(file, kEntropy, {}, kScalarDims);
  add(kFirst2Share, first2);
  add(kPeakLayer, peak);
  add(kEntropy, entropy);
  a.first2_share = first2.data.at(0);
  a.peak_layer = peak.data.at(0);
  a.entropy = entropy.data.at(0);
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
  return s;
}

}  // namespace sinkscope
