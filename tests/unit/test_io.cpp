// src/io: the HDF5 schema of docs/schema.md (names, dims, attribute types), round trips, and the
// failure paths users meet: a wrong --out folder, a damaged or incomplete analysis file, a writer
// that fails half way (nothing may be left behind).
#include <gtest/gtest.h>
#include <hdf5.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/hdf5_file.hpp"
#include "io/isolated.hpp"
#include "sinkscope/analysis.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/io.hpp"

namespace sinkscope {
namespace {

namespace fs = std::filesystem;

// Sizes small enough to be fast, all different so a swapped axis cannot go unnoticed.
constexpr size_t kProbes = 3, kPositions = 5, kLayers = 4, kHeads = 2, kExperts = 6, kAblations = 2;

class IoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "sinkscope_test_io_XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // Names in the test folder that look like a commit's temporary (".<name>.<random>.tmp").
  std::vector<std::string> leftover_temporaries() const {
    std::vector<std::string> found;
    for (const auto& entry : fs::directory_iterator(dir_)) {
      const std::string name = entry.path().filename().string();
      if (name.find(".tmp") != std::string::npos) found.push_back(name);
    }
    return found;
  }

  fs::path dir_;
};

template <typename T>
NdArray<T> random_array(std::mt19937& rng, std::vector<size_t> shape, std::string dims) {
  NdArray<T> array(std::move(shape), std::move(dims));
  if constexpr (std::is_integral_v<T>) {
    std::uniform_int_distribution<T> values(-1000, 1000);
    for (T& v : array.data) v = values(rng);
  } else {
    std::uniform_real_distribution<T> values(-2, 2);
    for (T& v : array.data) v = values(rng);
  }
  return array;
}

// Every part filled, optional ones included, with distinct random values.
Analysis full_analysis(unsigned seed = 7) {
  std::mt19937 rng(seed);
  const size_t n = kProbes, t = kPositions, l = kLayers, h = kHeads, e = kExperts, k = kAblations;
  Analysis a;
  AnalysisMeta& m = a.meta;
  m.sinkscope_version = "9.9.9-test";
  m.model_type = "qwen3_moe";
  m.checkpoint = "runs/toy/step00512";
  m.step = 512;
  m.num_layers = l;
  m.num_heads = h;
  m.num_kv_heads = 1;
  m.head_dim = 32;
  m.num_experts = e;
  m.top_k = 2;
  m.hidden_size = 128;
  m.num_probes = n;
  m.seq_len = t;
  m.eps = 0.3;
  m.sink_rate = 0.123456789012345;  // checks that the double survives at full precision
  m.tp = 2;
  m.ep = 3;
  m.dp = 1;
  m.world_size = 6;
  m.device = "cpu";
  m.tokens_sha256 = std::string(64, 'a');
  m.created_utc = "2026-11-28T12:00:00Z";
  m.layout = "tp=2 ep=3 dp=1 (heads 0-0|1-1)";

  a.tokens = random_array<int32_t>(rng, {n, t}, "probe,position");
  a.sink_score = random_array<float>(rng, {l, h}, "layer,head");
  a.sink_rate = random_array<float>(rng, {l}, "layer");
  a.p0_per_query = random_array<float>(rng, {n, l, h, t}, "probe,layer,head,query");
  a.norm_p0 = random_array<float>(rng, {n, l + 1}, "probe,layer_input");
  a.norm_rest_median = random_array<float>(rng, {n, l + 1}, "probe,layer_input");
  a.h_ratio = random_array<float>(rng, {l + 1}, "layer_input");
  a.p0_cosine = random_array<float>(rng, {l + 1}, "layer_input");
  a.massive_p0 = random_array<int32_t>(rng, {l + 1}, "layer_input");
  a.attn_head_p0 = random_array<float>(rng, {l, h}, "layer,head");
  a.attn_head_rest = random_array<float>(rng, {l, h}, "layer,head");
  a.moe_p0 = random_array<float>(rng, {l}, "layer");
  a.moe_rest = random_array<float>(rng, {l}, "layer");
  a.expert_p0 = random_array<float>(rng, {l, e}, "layer,expert");
  a.p0_topk_freq = random_array<float>(rng, {l, e}, "layer,expert");
  a.rest_topk_freq = random_array<float>(rng, {l, e}, "layer,expert");
  a.attr_embed = random_array<float>(rng, {l, h}, "target_layer,target_head");
  a.attr_head =
      random_array<float>(rng, {l, h, l, h}, "target_layer,target_head,source_layer,source_head");
  a.attr_expert =
      random_array<float>(rng, {l, h, l, e}, "target_layer,target_head,source_layer,source_expert");
  a.attr_mlp = random_array<float>(rng, {l, h, l}, "target_layer,target_head,source_layer");
  a.ablation_components = random_array<int32_t>(rng, {k, 3}, "component,field");
  a.ablation_delta_sink = random_array<float>(rng, {k, l, h}, "component,layer,head");
  a.layer_share = random_array<float>(rng, {l + 1}, "embedding_or_layer");
  a.first2_share = 0.625f;
  a.norm_gain_share = random_array<float>(rng, {l}, "layer");
  a.peak_layer = 3;
  a.entropy = 1.25f;
  return a;
}

Sweep full_sweep(size_t checkpoints = 3) {
  std::mt19937 rng(11);
  const size_t c = checkpoints, l = kLayers, h = kHeads;
  Sweep s;
  for (size_t i = 0; i < c; ++i) {
    s.steps.push_back(i == 0 ? 0 : int64_t{1} << (7 + i));
    s.names.push_back("step" + std::to_string(s.steps.back()) + (i == 1 ? "-é" : ""));
  }
  s.sink_rate = random_array<float>(rng, {c, l}, "checkpoint,layer");
  s.sink_score = random_array<float>(rng, {c, l, h}, "checkpoint,layer,head");
  s.h_ratio = random_array<float>(rng, {c, l + 1}, "checkpoint,layer_input");
  s.layer_share = random_array<float>(rng, {c, l + 1}, "checkpoint,embedding_or_layer");
  s.first2_share = random_array<float>(rng, {c}, "checkpoint");
  s.norm_gain_share = random_array<float>(rng, {c, l}, "checkpoint,layer");
  s.convergence_tv = random_array<float>(rng, {c == 0 ? 0 : c - 1}, "checkpoint_pair");
  s.convergence_step = c > 1 ? s.steps[1] : -1;
  s.tau = 0.07;
  s.failed = {"step64", "step96"};
  for (size_t i = 0; i < c; ++i) {
    s.checkpoint_paths.push_back("/runs/a/step" + std::to_string(i));
    s.checkpoint_headers_sha256.push_back(std::string(64, static_cast<char>('a' + i)));
  }
  s.tokens_sha256 = std::string(64, 'f');
  s.eps = 0.25;
  s.command_line = "sinkscope sweep --models-glob 'runs/a/step*'";
  s.options = "tau=0.07";
  return s;
}

template <typename T>
void expect_same_array(const NdArray<T>& expected, const NdArray<T>& actual, const char* what) {
  EXPECT_EQ(expected.shape, actual.shape) << what;
  EXPECT_EQ(expected.dims, actual.dims) << what;
  EXPECT_EQ(expected.data, actual.data) << what;  // float32 stored as float32: exact
}

void expect_same_meta(const AnalysisMeta& e, const AnalysisMeta& a) {
  EXPECT_EQ(e.sinkscope_version, a.sinkscope_version);
  EXPECT_EQ(e.model_type, a.model_type);
  EXPECT_EQ(e.checkpoint, a.checkpoint);
  EXPECT_EQ(e.step, a.step);
  EXPECT_EQ(e.num_layers, a.num_layers);
  EXPECT_EQ(e.num_heads, a.num_heads);
  EXPECT_EQ(e.num_kv_heads, a.num_kv_heads);
  EXPECT_EQ(e.head_dim, a.head_dim);
  EXPECT_EQ(e.num_experts, a.num_experts);
  EXPECT_EQ(e.top_k, a.top_k);
  EXPECT_EQ(e.hidden_size, a.hidden_size);
  EXPECT_EQ(e.num_probes, a.num_probes);
  EXPECT_EQ(e.seq_len, a.seq_len);
  EXPECT_EQ(e.eps, a.eps);
  EXPECT_EQ(e.sink_rate, a.sink_rate);
  EXPECT_EQ(e.tp, a.tp);
  EXPECT_EQ(e.ep, a.ep);
  EXPECT_EQ(e.dp, a.dp);
  EXPECT_EQ(e.world_size, a.world_size);
  EXPECT_EQ(e.device, a.device);
  EXPECT_EQ(e.tokens_sha256, a.tokens_sha256);
  EXPECT_EQ(e.created_utc, a.created_utc);
  EXPECT_EQ(e.layout, a.layout);
}

void expect_same_analysis(const Analysis& e, const Analysis& a) {
  expect_same_meta(e.meta, a.meta);
  expect_same_array(e.tokens, a.tokens, "tokens");
  expect_same_array(e.sink_score, a.sink_score, "sink_score");
  expect_same_array(e.sink_rate, a.sink_rate, "sink_rate");
  expect_same_array(e.p0_per_query, a.p0_per_query, "p0_per_query");
  expect_same_array(e.norm_p0, a.norm_p0, "norm_p0");
  expect_same_array(e.norm_rest_median, a.norm_rest_median, "norm_rest_median");
  expect_same_array(e.h_ratio, a.h_ratio, "h_ratio");
  expect_same_array(e.p0_cosine, a.p0_cosine, "p0_cosine");
  expect_same_array(e.massive_p0, a.massive_p0, "massive_p0");
  expect_same_array(e.attn_head_p0, a.attn_head_p0, "attn_head_p0");
  expect_same_array(e.attn_head_rest, a.attn_head_rest, "attn_head_rest");
  expect_same_array(e.moe_p0, a.moe_p0, "moe_p0");
  expect_same_array(e.moe_rest, a.moe_rest, "moe_rest");
  expect_same_array(e.expert_p0, a.expert_p0, "expert_p0");
  expect_same_array(e.p0_topk_freq, a.p0_topk_freq, "p0_topk_freq");
  expect_same_array(e.rest_topk_freq, a.rest_topk_freq, "rest_topk_freq");
  expect_same_array(e.attr_embed, a.attr_embed, "attr_embed");
  expect_same_array(e.attr_head, a.attr_head, "attr_head");
  expect_same_array(e.attr_expert, a.attr_expert, "attr_expert");
  expect_same_array(e.attr_mlp, a.attr_mlp, "attr_mlp");
  expect_same_array(e.ablation_components, a.ablation_components, "ablation_components");
  expect_same_array(e.ablation_delta_sink, a.ablation_delta_sink, "ablation_delta_sink");
  expect_same_array(e.layer_share, a.layer_share, "layer_share");
  expect_same_array(e.norm_gain_share, a.norm_gain_share, "norm_gain_share");
  EXPECT_EQ(e.first2_share, a.first2_share);
  EXPECT_EQ(e.peak_layer, a.peak_layer);
  EXPECT_EQ(e.entropy, a.entropy);
}

// ---- Independent reads through the raw C API (the wrapper is what is under test) -----------

struct RawFile {
  explicit RawFile(const std::string& path, unsigned flags = H5F_ACC_RDONLY)
      : id(H5Fopen(path.c_str(), flags, H5P_DEFAULT)) {}
  ~RawFile() {
    if (id >= 0) H5Fclose(id);
  }
  hid_t id;
};

// The string attribute `name` of `object`, read with the raw API; "<missing>" when absent.
std::string raw_string_attribute(hid_t file, const std::string& object, const std::string& name) {
  if (H5Aexists_by_name(file, object.c_str(), name.c_str(), H5P_DEFAULT) <= 0) return "<missing>";
  const hid_t attribute =
      H5Aopen_by_name(file, object.c_str(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT);
  const hid_t type = H5Aget_type(attribute);
  std::string value = "<not a variable-length UTF-8 string>";
  if (H5Tget_class(type) == H5T_STRING && H5Tis_variable_str(type) > 0 &&
      H5Tget_cset(type) == H5T_CSET_UTF8) {
    char* text = nullptr;
    if (H5Aread(attribute, type, &text) >= 0 && text != nullptr) {
      value = text;
      H5free_memory(text);
    }
  }
  H5Tclose(type);
  H5Aclose(attribute);
  return value;
}

// (class, size in bytes) of a root attribute's stored type.
std::pair<H5T_class_t, size_t> raw_attribute_type(hid_t file, const std::string& name) {
  const hid_t attribute = H5Aopen_by_name(file, "/", name.c_str(), H5P_DEFAULT, H5P_DEFAULT);
  if (attribute < 0) return {H5T_NO_CLASS, 0};
  const hid_t type = H5Aget_type(attribute);
  const std::pair<H5T_class_t, size_t> result{H5Tget_class(type), H5Tget_size(type)};
  H5Tclose(type);
  H5Aclose(attribute);
  return result;
}

// ---- Analysis round trips -------------------------------------------------------------------

TEST_F(IoTest, FullAnalysisRoundTrips) {
  const Analysis written = full_analysis();
  write_analysis(path("a.h5"), written);
  expect_same_analysis(written, read_analysis(path("a.h5")));
  EXPECT_TRUE(leftover_temporaries().empty());
}

TEST_F(IoTest, OptionalDatasetsAreWrittenOnlyWhenPresent) {
  Analysis written = full_analysis();
  written.p0_per_query = FloatArray();
  written.ablation_components = IntArray();
  written.ablation_delta_sink = FloatArray();
  write_analysis(path("a.h5"), written);

  const h5::File file = h5::File::open_read(path("a.h5"));
  EXPECT_FALSE(file.has_dataset("attention/p0_per_query"));
  EXPECT_FALSE(file.has_dataset("circuit/ablation/components"));
  EXPECT_FALSE(file.has_dataset("circuit/ablation/delta_sink_score"));
  EXPECT_TRUE(file.has_dataset("attention/sink_score"));
  expect_same_analysis(written, read_analysis(path("a.h5")));
}

TEST_F(IoTest, EveryDatasetCarriesItsDimsAndDimensionScales) {
  Analysis written = full_analysis();
  written.h_ratio.dims = "";                     // no names of its own: the schema's are written
  written.sink_score.dims = "layer,query_head";  // the schema's names win: they are the scales'
  write_analysis(path("a.h5"), written);

  const std::vector<std::pair<std::string, std::string>> expected = {
      {"tokens", "probe,position"},
      {"attention/sink_score", "layer,head"},
      {"attention/sink_rate", "layer"},
      {"attention/p0_per_query", "probe,layer,head,query"},
      {"residual/norm_p0", "probe,layer_input"},
      {"residual/norm_rest_median", "probe,layer_input"},
      {"residual/h_ratio", "layer_input"},
      {"residual/p0_cosine", "layer_input"},
      {"residual/massive_p0", "layer_input"},
      {"writes/attn_head_p0", "layer,head"},
      {"writes/attn_head_rest", "layer,head"},
      {"writes/moe_p0", "layer"},
      {"writes/moe_rest", "layer"},
      {"writes/expert_p0", "layer,expert"},
      {"routing/p0_topk_freq", "layer,expert"},
      {"routing/rest_topk_freq", "layer,expert"},
      {"circuit/attr_embed", "target_layer,target_head"},
      {"circuit/attr_head", "target_layer,target_head,source_layer,source_head"},
      {"circuit/attr_expert", "target_layer,target_head,source_layer,source_expert"},
      {"circuit/attr_mlp", "target_layer,target_head,source_layer"},
      {"circuit/ablation/components", "component,field"},
      {"circuit/ablation/delta_sink_score", "component,layer,head"},
      {"profile/layer_share", "embedding_or_layer"},
      {"profile/first2_share", "scalar"},
      {"profile/norm_gain_share", "layer"},
      {"profile/peak_layer", "scalar"},
      {"profile/entropy", "scalar"},
  };
  RawFile raw(path("a.h5"));
  ASSERT_GE(raw.id, 0);
  for (const auto& [name, dims] : expected) {
    EXPECT_EQ(raw_string_attribute(raw.id, name, "dims"), dims) << name;
  }
  // Every axis has the dimension scale of the same name attached (what netCDF tools read), and
  // each scale is a coordinate 0..n-1 of the axis' length.
  const h5::File file = h5::File::open_read(path("a.h5"));
  for (const auto& [name, dims] : expected) {
    if (dims == "scalar") continue;
    std::string attached;
    for (const std::string& scale : file.attached_scales(name))
      attached += (attached.empty() ? "" : ",") + scale;
    EXPECT_EQ(attached, dims) << name;
  }
  const std::vector<int64_t> layer_input = file.read_dataset<int64_t>("layer_input");
  ASSERT_EQ(layer_input.size(), kLayers + 1);
  EXPECT_EQ(layer_input.back(), static_cast<int64_t>(kLayers));
  EXPECT_EQ(file.read_dataset<int64_t>("layer").size(), kLayers);
  EXPECT_EQ(file.read_strings("field"),
            (std::vector<std::string>{"source_layer", "kind", "index"}));
  EXPECT_EQ(file.read_string_attribute("units", "attention/sink_score"), "1");
  EXPECT_NE(file.read_string_attribute("long_name", "circuit/attr_head"), "");
  EXPECT_NE(file.read_string_attribute("description", "attention/p0_per_query").find("--per-query"),
            std::string::npos);
}

TEST_F(IoTest, ProvenanceRoundTrips) {
  Analysis written = full_analysis();
  AnalysisMeta& m = written.meta;
  m.command_line = "sinkscope analyze --model m --probes random:2:4:1 --eps 0.25";
  m.options = "eps=0.25\nbatch=4";
  m.probes = "--probes random:2:4:1";
  m.prepend_bos = 7;
  m.ablate = "layers=0-1";
  m.batch = 4;
  m.threads = 2;
  m.per_query = 1;
  m.git_commit = "0123abcd";
  m.checkpoint_headers_sha256 = std::string(64, 'b');
  write_analysis(path("a.h5"), written);
  const AnalysisMeta read = read_analysis(path("a.h5")).meta;
  EXPECT_EQ(read.format_version, kFormatVersion);
  EXPECT_EQ(read.command_line, m.command_line);
  EXPECT_EQ(read.options, m.options);
  EXPECT_EQ(read.probes, m.probes);
  EXPECT_EQ(read.prepend_bos, 7);
  EXPECT_EQ(read.ablate, m.ablate);
  EXPECT_EQ(read.batch, 4);
  EXPECT_EQ(read.threads, 2);
  EXPECT_EQ(read.per_query, 1);
  EXPECT_EQ(read.git_commit, "0123abcd");
  EXPECT_EQ(read.checkpoint_headers_sha256, m.checkpoint_headers_sha256);
}

TEST_F(IoTest, AnalysisAttributesHaveTheSchemaTypes) {
  write_analysis(path("a.h5"), full_analysis());
  RawFile raw(path("a.h5"));
  ASSERT_GE(raw.id, 0);
  for (const char* name :
       {"step", "num_layers", "num_heads", "num_kv_heads", "head_dim", "num_experts", "top_k",
        "hidden_size", "num_probes", "seq_len", "tp", "ep", "dp", "world_size"}) {
    EXPECT_EQ(raw_attribute_type(raw.id, name), std::make_pair(H5T_INTEGER, size_t{8})) << name;
  }
  for (const char* name : {"eps", "sink_rate"}) {
    EXPECT_EQ(raw_attribute_type(raw.id, name), std::make_pair(H5T_FLOAT, size_t{8})) << name;
  }
  EXPECT_EQ(raw_string_attribute(raw.id, "/", "model_type"), "qwen3_moe");
  EXPECT_EQ(raw_string_attribute(raw.id, "/", "layout"), "tp=2 ep=3 dp=1 (heads 0-0|1-1)");
  EXPECT_EQ(raw_string_attribute(raw.id, "/", "sinkscope_version"), "9.9.9-test");

  // Dataset element types: tokens and massive_p0 int32, the profile peak an int32 scalar.
  h5::File file = h5::File::open_read(path("a.h5"));
  const h5::DatasetInfo tokens = file.dataset_info("tokens");
  EXPECT_EQ(tokens.kind, h5::DatasetInfo::Kind::kInteger);
  EXPECT_EQ(tokens.element_bytes, 4u);
  const h5::DatasetInfo peak = file.dataset_info("profile/peak_layer");
  EXPECT_EQ(peak.kind, h5::DatasetInfo::Kind::kInteger);
  EXPECT_TRUE(peak.shape.empty());
  const h5::DatasetInfo entropy = file.dataset_info("profile/entropy");
  EXPECT_EQ(entropy.kind, h5::DatasetInfo::Kind::kFloat);
  EXPECT_EQ(entropy.element_bytes, 4u);
}

TEST_F(IoTest, WriterRefusesAShapeThatContradictsTheAttributes) {
  Analysis written = full_analysis();
  written.sink_score = FloatArray({kLayers + 1, kHeads}, "layer,head");
  EXPECT_THROW(write_analysis(path("a.h5"), written), RuntimeFailure);
  EXPECT_FALSE(fs::exists(path("a.h5")));
  EXPECT_TRUE(leftover_temporaries().empty());
}

// ---- Sweep ----------------------------------------------------------------------------------

TEST_F(IoTest, SweepRoundTrips) {
  const Sweep written = full_sweep();
  write_sweep(path("sweep.h5"), written);
  const Sweep read = read_sweep(path("sweep.h5"));
  EXPECT_EQ(written.steps, read.steps);
  EXPECT_EQ(written.names, read.names);
  expect_same_array(written.sink_rate, read.sink_rate, "sink_rate");
  expect_same_array(written.sink_score, read.sink_score, "sink_score");
  expect_same_array(written.h_ratio, read.h_ratio, "h_ratio");
  expect_same_array(written.layer_share, read.layer_share, "layer_share");
  expect_same_array(written.first2_share, read.first2_share, "first2_share");
  expect_same_array(written.norm_gain_share, read.norm_gain_share, "norm_gain_share");
  expect_same_array(written.convergence_tv, read.convergence_tv, "convergence_tv");
  EXPECT_EQ(written.convergence_step, read.convergence_step);
  EXPECT_EQ(written.tau, read.tau);
  EXPECT_EQ(written.failed, read.failed);
  EXPECT_EQ(written.checkpoint_paths, read.checkpoint_paths);
  EXPECT_EQ(written.checkpoint_headers_sha256, read.checkpoint_headers_sha256);
  EXPECT_EQ(written.tokens_sha256, read.tokens_sha256);
  EXPECT_EQ(written.eps, read.eps);
  EXPECT_EQ(written.command_line, read.command_line);
  EXPECT_EQ(written.options, read.options);
  EXPECT_EQ(read.format_version, kFormatVersion);

  RawFile raw(path("sweep.h5"));
  ASSERT_GE(raw.id, 0);
  EXPECT_EQ(raw_string_attribute(raw.id, "/", "failed"), "step64,step96");
  EXPECT_NE(raw_string_attribute(raw.id, "/", "sinkscope_version"), "<missing>");
  const std::vector<std::pair<std::string, std::string>> dims = {
      {"steps", "checkpoint"},
      {"names", "checkpoint"},
      {"sink_rate", "checkpoint,layer"},
      {"sink_score", "checkpoint,layer,head"},
      {"h_ratio", "checkpoint,layer_input"},
      {"layer_share", "checkpoint,embedding_or_layer"},
      {"first2_share", "checkpoint"},
      {"norm_gain_share", "checkpoint,layer"},
      {"convergence/tv", "checkpoint_pair"},
      {"convergence/step", "scalar"},
  };
  for (const auto& [name, expected] : dims) {
    EXPECT_EQ(raw_string_attribute(raw.id, name, "dims"), expected) << name;
  }
  h5::File file = h5::File::open_read(path("sweep.h5"));
  EXPECT_EQ(file.dataset_info("steps").element_bytes, 8u);
  EXPECT_EQ(file.dataset_info("names").kind, h5::DatasetInfo::Kind::kString);
  EXPECT_EQ(file.dataset_info("convergence/step").element_bytes, 8u);
}

TEST_F(IoTest, SweepWithoutCheckpointsStillWritesAWellFormedFile) {
  // Every checkpoint failed: the assemble step still records which ones.
  Sweep written;
  written.failed = {"step0", "step128"};
  write_sweep(path("sweep.h5"), written);
  const Sweep read = read_sweep(path("sweep.h5"));
  EXPECT_TRUE(read.steps.empty());
  EXPECT_TRUE(read.names.empty());
  EXPECT_EQ(read.convergence_tv.shape, std::vector<size_t>{0});
  EXPECT_EQ(read.convergence_step, -1);
  EXPECT_EQ(read.failed, written.failed);
}

TEST_F(IoTest, SweepNamesCountMustMatchSteps) {
  Sweep written = full_sweep();
  written.names.pop_back();
  EXPECT_THROW(write_sweep(path("sweep.h5"), written), RuntimeFailure);
  EXPECT_FALSE(fs::exists(path("sweep.h5")));
}

// ---- Bad output folders -------------------------------------------------------------------------

TEST_F(IoTest, MissingFolderIsAnInputErrorAndLeavesNothing) {
  const std::string target = path("no/such/folder/a.h5");
  try {
    write_analysis(target, full_analysis());
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_EQ(std::string(e.what()),
              "cannot write " + target + ": folder " + path("no/such/folder") + " does not exist");
  }
  EXPECT_FALSE(fs::exists(path("no")));
  EXPECT_TRUE(leftover_temporaries().empty());
}

TEST_F(IoTest, UnwritableFolderIsAnInputError) {
  fs::create_directory(path("locked"));
  fs::permissions(path("locked"), fs::perms::owner_read | fs::perms::owner_exec |
                                      fs::perms::group_read | fs::perms::group_exec |
                                      fs::perms::others_read | fs::perms::others_exec);
  auto attempt = [&] {
    try {
      write_sweep(path("locked/sweep.h5"), full_sweep());
    } catch (const InputError& e) {
      return std::string(e.what()).find("is not writable") != std::string::npos;
    }
    return false;
  };
  if (::geteuid() != 0) {
    EXPECT_TRUE(attempt());
  } else {
    // Root may write anywhere: run the attempt in a child that drops to an unprivileged user.
    fs::permissions(dir_, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                              fs::perms::others_read | fs::perms::others_exec);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      const bool dropped = ::setgid(65534) == 0 && ::setuid(65534) == 0;
      ::_exit(dropped && attempt() ? 0 : 1);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "an unprivileged writer was not refused";
  }
  fs::permissions(path("locked"), fs::perms::owner_all);
  EXPECT_TRUE(fs::is_empty(path("locked")));
}

// ---- commit_atomically --------------------------------------------------------------------------

TEST_F(IoTest, FailingCallbackLeavesNoTemporaryAndKeepsThePreviousFile) {
  const std::string target = path("out.txt");
  std::ofstream(target) << "previous";
  std::string seen_tmp;
  EXPECT_THROW(commit_atomically(target,
                                 [&](const std::string& tmp) {
                                   seen_tmp = tmp;
                                   std::ofstream(tmp) << "half";
                                   throw std::runtime_error("writer died");
                                 }),
               std::runtime_error);
  // A hidden name in the output's folder: ".out.txt.<8 random characters>.tmp".
  const std::string prefix = path(".out.txt.");
  EXPECT_EQ(seen_tmp.rfind(prefix, 0), 0u) << seen_tmp;
  EXPECT_EQ(seen_tmp.size(), prefix.size() + 8 + 4) << seen_tmp;
  EXPECT_EQ(seen_tmp.substr(seen_tmp.size() - 4), ".tmp");
  EXPECT_FALSE(fs::exists(seen_tmp));
  EXPECT_TRUE(leftover_temporaries().empty());
  std::string content;
  std::ifstream(target) >> content;
  EXPECT_EQ(content, "previous");
}

TEST_F(IoTest, CommitReplacesTheFileWhole) {
  const std::string target = path("out.txt");
  std::ofstream(target) << "previous";
  commit_atomically(target, [](const std::string& tmp) { std::ofstream(tmp) << "new"; });
  std::string content;
  std::ifstream(target) >> content;
  EXPECT_EQ(content, "new");
  EXPECT_TRUE(leftover_temporaries().empty());
}

TEST_F(IoTest, FailingHdf5WriteLeavesNothing) {
  // The wrapper fails mid-file (a dataset written twice): temporary removed, no output.
  EXPECT_THROW(commit_atomically(path("x.h5"),
                                 [](const std::string& tmp) {
                                   h5::File file = h5::File::create(tmp);
                                   const float value = 1;
                                   file.write_scalar("a/b", value);
                                   file.write_scalar("a/b", value);
                                 }),
               RuntimeFailure);
  EXPECT_FALSE(fs::exists(path("x.h5")));
  EXPECT_TRUE(leftover_temporaries().empty());
}

TEST_F(IoTest, ClosingWithAnObjectStillOpenFailsInsteadOfCommittingAnUnfinishedFile) {
  // A handle left open would complete the file only after the rename; the close must fail.
  EXPECT_THROW(
      commit_atomically(path("x.h5"),
                        [](const std::string& tmp) {
                          h5::File file = h5::File::create(tmp);
                          const float value = 1;
                          file.write_scalar("a", value);
                          // Hold dataset "a" open through the file's own id (the
                          // only HDF5 file open in this process).
                          hid_t file_id = H5I_INVALID_HID;
                          ASSERT_EQ(H5Fget_obj_ids(H5F_OBJ_ALL, H5F_OBJ_FILE, 1, &file_id), 1);
                          const h5::Handle open_set(H5Dopen2(file_id, "a", H5P_DEFAULT), H5Dclose);
                          ASSERT_TRUE(open_set);
                          file.close();
                        }),
      RuntimeFailure);
  EXPECT_FALSE(fs::exists(path("x.h5")));
  EXPECT_TRUE(leftover_temporaries().empty());
}

// ---- Damaged and incomplete analysis files ------------------------------------------------------

// read_analysis must fail with one InputError line naming the file (and `detail` when given).
void expect_input_error(const std::string& file, const std::string& detail) {
  try {
    read_analysis(file);
    ADD_FAILURE() << "expected InputError for " << file;
  } catch (const InputError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(file), std::string::npos) << message;
    EXPECT_NE(message.find(detail), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
}

TEST_F(IoTest, TruncatedFileIsAnInputError) {
  write_analysis(path("a.h5"), full_analysis());
  fs::resize_file(path("a.h5"), fs::file_size(path("a.h5")) / 2);
  expect_input_error(path("a.h5"), "not a readable HDF5 file");
}

// A file cut anywhere (every 1% of its length, and one byte short) is refused as bad input,
// never read as a complete analysis and never a crash.
TEST_F(IoTest, FileCutAnywhereIsAnInputError) {
  write_analysis(path("full.h5"), full_analysis());
  const auto size = fs::file_size(path("full.h5"));
  std::vector<uintmax_t> cuts = {size - 1};
  for (int pct = 1; pct < 100; ++pct) cuts.push_back(size * static_cast<uintmax_t>(pct) / 100);
  for (uintmax_t cut : cuts) {
    fs::copy_file(path("full.h5"), path("cut.h5"), fs::copy_options::overwrite_existing);
    fs::resize_file(path("cut.h5"), cut);
    EXPECT_THROW(read_analysis(path("cut.h5")), InputError) << "cut at " << cut << " of " << size;
  }
}

TEST_F(IoTest, NonHdf5FileIsAnInputError) {
  std::ofstream(path("a.h5")) << "this is not HDF5\n";
  expect_input_error(path("a.h5"), "not a readable HDF5 file");
}

TEST_F(IoTest, AbsentFileIsAnInputError) { expect_input_error(path("a.h5"), "no such file"); }

TEST_F(IoTest, MissingDatasetIsNamed) {
  write_analysis(path("a.h5"), full_analysis());
  {
    RawFile raw(path("a.h5"), H5F_ACC_RDWR);
    ASSERT_GE(raw.id, 0);
    ASSERT_GE(H5Ldelete(raw.id, "residual/h_ratio", H5P_DEFAULT), 0);
  }
  expect_input_error(path("a.h5"), "dataset /residual/h_ratio is missing");
}

TEST_F(IoTest, MissingAttributeIsNamed) {
  write_analysis(path("a.h5"), full_analysis());
  {
    RawFile raw(path("a.h5"), H5F_ACC_RDWR);
    ASSERT_GE(raw.id, 0);
    ASSERT_GE(H5Adelete(raw.id, "num_heads"), 0);
  }
  expect_input_error(path("a.h5"), "root attribute num_heads is missing");
}

TEST_F(IoTest, HalfAnAblationPairIsAnInputError) {
  write_analysis(path("a.h5"), full_analysis());
  {
    RawFile raw(path("a.h5"), H5F_ACC_RDWR);
    ASSERT_GE(raw.id, 0);
    ASSERT_GE(H5Ldelete(raw.id, "circuit/ablation/delta_sink_score", H5P_DEFAULT), 0);
  }
  expect_input_error(path("a.h5"), "dataset /circuit/ablation/delta_sink_score is missing");
}

TEST_F(IoTest, DatasetOfTheWrongShapeIsAnInputError) {
  write_analysis(path("a.h5"), full_analysis());
  {
    RawFile raw(path("a.h5"), H5F_ACC_RDWR);
    ASSERT_GE(raw.id, 0);
    const int64_t layers = kLayers + 1;  // attributes now disagree with every [L, ...] dataset
    const hid_t attribute = H5Aopen(raw.id, "num_layers", H5P_DEFAULT);
    ASSERT_GE(H5Awrite(attribute, H5T_NATIVE_INT64, &layers), 0);
    H5Aclose(attribute);
  }
  expect_input_error(path("a.h5"), "has shape");
}

// ---- The HDF5 wrapper itself --------------------------------------------------------------------

TEST_F(IoTest, WrapperErrorCarriesCallLocationAndHdf5Message) {
  testing::internal::CaptureStderr();
  try {
    h5::File::open_read(path("absent.h5"));
    ADD_FAILURE() << "expected RuntimeFailure";
  } catch (const RuntimeFailure& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("H5Fopen failed at "), std::string::npos) << message;
    EXPECT_NE(message.find("hdf5_file.cpp:"), std::string::npos) << message;
    EXPECT_NE(message.find(path("absent.h5")), std::string::npos) << message;
    EXPECT_NE(message.find("unable to open file"), std::string::npos) << message;
  }
  // HDF5's automatic stack dump is off: errors reach users only through the exception.
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
}

TEST_F(IoTest, StringDatasetsReadBackVariableAndFixedLength) {
  const std::vector<std::string> names = {"step0", "", "checkpoint-1024", "ünïcode"};
  {
    h5::File file = h5::File::create(path("s.h5"));
    file.write_strings("group/names", names, "checkpoint");
    file.close();
  }
  {
    // Fixed-length strings as other writers (numpy 'S' arrays, MATLAB) store them.
    RawFile raw(path("s.h5"), H5F_ACC_RDWR);
    ASSERT_GE(raw.id, 0);
    const hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, 8);
    H5Tset_strpad(type, H5T_STR_SPACEPAD);
    const hsize_t count = 2;
    const hid_t space = H5Screate_simple(1, &count, nullptr);
    const hid_t set =
        H5Dcreate2(raw.id, "fixed", type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    const char data[] = "ab      step1024";
    ASSERT_GE(H5Dwrite(set, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), 0);
    H5Dclose(set);
    H5Sclose(space);
    H5Tclose(type);
  }
  const h5::File file = h5::File::open_read(path("s.h5"));
  EXPECT_EQ(file.read_strings("group/names"), names);
  EXPECT_EQ(file.read_strings("fixed"), (std::vector<std::string>{"ab", "step1024"}));
  EXPECT_EQ(file.read_string_attribute("dims", "group/names"), "checkpoint");
  EXPECT_TRUE(file.has_dataset("/group/names"));
  EXPECT_FALSE(file.has_dataset("group"));         // a group, not a dataset
  EXPECT_FALSE(file.has_dataset("nothing/here"));  // missing intermediate group
  EXPECT_THROW(file.read_dataset<float>("group/names"), RuntimeFailure);
}

TEST_F(IoTest, LargeDatasetsAreCompressedAndReadBack) {
  // Above the compression threshold: chunked + deflate, still exactly the same numbers.
  std::mt19937 rng(3);
  const FloatArray big = random_array<float>(rng, {7, 33, 500}, "a,b,c");
  {
    h5::File file = h5::File::create(path("big.h5"));
    file.write_dataset("big", big.ptr(), big.shape, big.dims);
    file.close();
  }
  const h5::File file = h5::File::open_read(path("big.h5"));
  std::vector<size_t> shape;
  EXPECT_EQ(file.read_dataset<float>("big", &shape), big.data);
  EXPECT_EQ(shape, big.shape);
  EXPECT_EQ(file.read_string_attribute("dims", "big"), "a,b,c");
}

// ---- Reliability II: full disk, outputs that are not files, names, the content checksum
// ----------

TEST_F(IoTest, FullDiskEndsInOneErrorWithoutCrashOrLeftovers) {
  // A write that runs out of room (here: past RLIMIT_FSIZE, as on a full disk) used to end in a
  // segfault in HDF5's exit handler. The child writes, checks, then exits through exit(): every
  // exit handler runs, as at the end of the command line tool.
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::signal(SIGXFSZ, SIG_IGN);  // what main() does: EFBIG instead of the signal
    const rlimit limit{64 << 10, 64 << 10};
    if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) ::_exit(10);
    std::mt19937 rng(5);
    const FloatArray noise = random_array<float>(rng, {512, 1024}, "a,b");  // 2 MB, incompressible
    int code = 0;
    try {
      commit_atomically(path("full.h5"), [&](const std::string& tmp) {
        h5::File file = h5::File::create(tmp);
        file.write_dataset("noise", noise.ptr(), noise.shape, noise.dims);
        file.close();
      });
      code = 11;  // the write cannot have fitted
    } catch (const RuntimeFailure& e) {
      const std::string message = e.what();
      if (message.find("File too large") == std::string::npos || message.find('\n') != message.npos)
        code = 12;
    } catch (...) {
      code = 13;
    }
    if (code == 0 && (fs::exists(path("full.h5")) || !leftover_temporaries().empty())) code = 14;
    std::exit(code);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "the writer died of signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "10 setrlimit, 11 no failure, 12 message, 13 exception "
                                       "type, 14 output or temporary left";
}

TEST_F(IoTest, OutputThatIsNotARegularFileIsRefusedAndKept) {
  bool filled = false;
  const auto fill = [&](const std::string& tmp) {
    filled = true;
    std::ofstream(tmp) << "x";
  };
  const std::string fifo = path("out.h5");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  try {
    commit_atomically(fifo, fill);
    FAIL() << "a FIFO was replaced";
  } catch (const InputError& e) {
    EXPECT_EQ(std::string(e.what()),
              "cannot write " + fifo + ": it exists and is a FIFO, not a regular file");
  }
  struct stat st {};
  ASSERT_EQ(::stat(fifo.c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  EXPECT_THROW(commit_atomically("/dev/null", fill), InputError);
  fs::create_directory(path("folder.h5"));
  EXPECT_THROW(commit_atomically(path("folder.h5"), fill), InputError);
  EXPECT_THROW(commit_atomically(path("folder.h5") + "/", fill), InputError);
  EXPECT_FALSE(filled);
  EXPECT_THROW(check_output_path("/dev/null/x.h5", "--out "), InputError);
}

TEST_F(IoTest, EveryNameTheFilesystemAllowsCanBeWritten) {
  // The temporary used to be "<name>.tmp.<host>.<pid>": a legal 251-character name failed at
  // the very end with ENAMETOOLONG. Now the longest legal name works and a longer one is refused
  // before any work.
  const long name_max = ::pathconf(dir_.c_str(), _PC_NAME_MAX);
  ASSERT_GT(name_max, 10);
  const std::string longest = path(std::string(static_cast<size_t>(name_max) - 3, 'n') + ".h5");
  std::string seen_tmp;
  commit_atomically(longest, [&](const std::string& tmp) {
    seen_tmp = tmp;
    std::ofstream(tmp) << "x";
  });
  // The temporary keeps as much of the name as fits.
  EXPECT_EQ(fs::path(seen_tmp).filename().string().size(), static_cast<size_t>(name_max));
  write_analysis(longest, full_analysis());
  expect_same_analysis(full_analysis(), read_analysis(longest));
  EXPECT_TRUE(leftover_temporaries().empty());
  const std::string too_long = path(std::string(static_cast<size_t>(name_max) - 2, 'n') + ".h5");
  bool filled = false;
  try {
    commit_atomically(too_long, [&](const std::string&) { filled = true; });
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("more than the filesystem's limit of " +
                                         std::to_string(name_max)),
              std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(filled);
}

namespace {

// Offset in the file of a contiguous dataset's data (HADDR_UNDEF for chunked ones).
haddr_t data_offset(const std::string& file, const std::string& dataset) {
  RawFile raw(file);
  const hid_t set = H5Dopen2(raw.id, dataset.c_str(), H5P_DEFAULT);
  const haddr_t offset = H5Dget_offset(set);
  H5Dclose(set);
  return offset;
}

std::string read_bytes(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void flip_byte(const std::string& file, uint64_t offset) {
  std::string bytes = read_bytes(file);
  bytes.at(offset) = static_cast<char>(bytes.at(offset) ^ 0x5a);
  std::ofstream(file, std::ios::binary | std::ios::trunc).write(bytes.data(), bytes.size());
}

}  // namespace

TEST_F(IoTest, ContentChecksumNoticesAChangedByteAnywhereInTheContent) {
  write_analysis(path("a.h5"), full_analysis());
  const Analysis clean = read_analysis(path("a.h5"));
  EXPECT_EQ(clean.meta.content_sha256.size(), 64u);
  // One byte of each dataset's values: every one of them read back "fine" before.
  int flipped = 0;
  for (const char* name :
       {"tokens", "attention/sink_score", "residual/norm_p0", "circuit/attr_head",
        "circuit/ablation/components", "profile/entropy", "profile/peak_layer"}) {
    const haddr_t offset = data_offset(path("a.h5"), name);
    ASSERT_NE(offset, HADDR_UNDEF) << name;
    fs::copy_file(path("a.h5"), path("b.h5"), fs::copy_options::overwrite_existing);
    flip_byte(path("b.h5"), offset + 1);
    expect_input_error(path("b.h5"), "content does not match its checksum (content_sha256)");
    ++flipped;
  }
  EXPECT_EQ(flipped, 7);
  // A string attribute's value (variable-length strings live in the file's global heap).
  const std::string bytes = read_bytes(path("a.h5"));
  const size_t at = bytes.find("runs/toy/step00512");
  ASSERT_NE(at, std::string::npos);
  fs::copy_file(path("a.h5"), path("c.h5"), fs::copy_options::overwrite_existing);
  flip_byte(path("c.h5"), at + 5);
  expect_input_error(path("c.h5"), "content does not match its checksum");
  // A number rewritten through the HDF5 API, as a tool would: the file is valid HDF5 throughout.
  fs::copy_file(path("a.h5"), path("d.h5"), fs::copy_options::overwrite_existing);
  {
    RawFile raw(path("d.h5"), H5F_ACC_RDWR);
    const hid_t attribute = H5Aopen_by_name(raw.id, "/", "sink_rate", H5P_DEFAULT, H5P_DEFAULT);
    const double changed = 0.5;
    ASSERT_GE(H5Awrite(attribute, H5T_NATIVE_DOUBLE, &changed), 0);
    H5Aclose(attribute);
  }
  expect_input_error(path("d.h5"), "content does not match its checksum");
}

TEST_F(IoTest, FileWithoutChecksumStillReads) {
  // Files of other writers (and earlier versions) carry no content_sha256: read as before.
  write_analysis(path("a.h5"), full_analysis());
  {
    RawFile raw(path("a.h5"), H5F_ACC_RDWR);
    ASSERT_GE(H5Adelete(raw.id, "content_sha256"), 0);
  }
  const Analysis a = read_analysis(path("a.h5"));
  EXPECT_TRUE(a.meta.content_sha256.empty());
  expect_same_analysis(full_analysis(), a);
}

TEST_F(IoTest, AFifoInPlaceOfAnAnalysisFileIsRefusedWithoutBlocking) {
  ASSERT_EQ(::mkfifo(path("a.h5").c_str(), 0600), 0);
  const std::string answer = run_isolated(
                                 [&]() -> std::string {
                                   try {
                                     read_analysis(path("a.h5"));
                                   } catch (const InputError& e) {
                                     return e.what();
                                   }
                                   return "read";
                                 },
                                 20)
                                 .answer;
  EXPECT_EQ(answer, "bad analysis file " + path("a.h5") + ": it is a FIFO, not a regular file");
}

TEST(Isolated, ReportsAnswersCrashesTimeoutsAndMemoryBounds) {
  const IsolatedResult fine = run_isolated([] { return std::string("fine"); }, 10);
  EXPECT_TRUE(fine.completed);
  EXPECT_EQ(fine.answer, "fine");
  EXPECT_EQ(run_isolated([]() -> std::string { throw InputError("bad input"); }, 10).answer,
            "bad input");
  const IsolatedResult crashed = run_isolated(
      []() -> std::string {
        std::raise(SIGSEGV);
        return "survived";
      },
      10);
  EXPECT_FALSE(crashed.completed);
  EXPECT_EQ(crashed.answer.rfind("reading it crashed (signal 11", 0), 0u) << crashed.answer;
  // The child's stderr does not reach ours (glibc's abort messages would break the one line).
  testing::internal::CaptureStderr();
  const IsolatedResult aborted = run_isolated(
      []() -> std::string {
        std::fputs("free(): invalid pointer\n", stderr);
        std::abort();
      },
      10);
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
  EXPECT_FALSE(aborted.completed);
  // A runaway allocation fails inside the budget instead of taking the machine's memory.
  const IsolatedResult bounded = run_isolated(
      []() -> std::string {
        std::vector<char> huge(size_t{8} << 30, 1);
        return "allocated " + std::to_string(huge.size());
      },
      60, uint64_t{256} << 20);
  EXPECT_TRUE(bounded.completed);
  EXPECT_EQ(bounded.answer, "std::bad_alloc");
  const auto start = std::chrono::steady_clock::now();
  const IsolatedResult slow = run_isolated(
      []() -> std::string {
        ::pause();
        return "woke";
      },
      1);
  EXPECT_FALSE(slow.completed);
  EXPECT_EQ(slow.answer, "reading it did not finish within 1 s");
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

}  // namespace
}  // namespace sinkscope
