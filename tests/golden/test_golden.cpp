// sinkscope against golden data written by HF transformers (tools/make_golden.py, float64
// reference; tests/golden/README.md). Tolerances are docs/metrics.md section 7's:
//   attention to P0: 1e-4 absolute (fp32 softmax of bf16-weight activations vs float64);
//   norms and ratios: 1e-3 relative;
//   attributions and shares: 1e-3 of the array's largest magnitude (entries near zero have no
//     meaningful relative error; the scale is what a reader compares them with);
//   routing frequencies: identical (routing is discrete; the fixtures have no exact ties).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "golden_data.hpp"
#include "sinkscope/analyze.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/model.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/shard_plan.hpp"

using namespace sinkscope;
namespace fs = std::filesystem;

namespace {

const std::string kGoldenDir = SINKSCOPE_GOLDEN_DIR;

using golden::expect_close;
using golden::Expected;
using golden::load_expected;

std::vector<float> ints_as_floats(const std::vector<int32_t>& v) { return {v.begin(), v.end()}; }

class Golden : public ::testing::TestWithParam<std::string> {};

TEST_P(Golden, MatchesTransformersFloat64Reference) {
  const std::string dir = kGoldenDir + "/" + GetParam();
  ASSERT_TRUE(fs::exists(dir + "/expected.safetensors")) << "golden fixture missing: " << dir;
  const Expected e = load_expected(dir + "/expected.safetensors");
  const IntArray tokens = load_tokens(dir + "/probes.npy");
  auto world = make_single_comm();
  for (int64_t batch : {1, 2, 64}) {
    SCOPED_TRACE("batch " + std::to_string(batch));
    AnalyzeOptions o;
    o.model = dir;
    o.per_query = true;
    o.batch = batch;
    const Analysis a = analyze_checkpoint(o, tokens, *world);
    // Section 1: attention to position zero, every probe, layer, head and query.
    expect_close("attn_p0", a.p0_per_query.data, e.values.at("attn_p0"), 1e-4, 0, 0);
    expect_close("sink_score", a.sink_score.data, e.values.at("sink_score"), 1e-4, 0, 0);
    expect_close("sink_rate", a.sink_rate.data, e.values.at("sink_rate"), 0, 0, 0);
    // Section 2: residual stream.
    for (const char* k : {"norm_p0", "norm_rest_median", "h_ratio"}) {
      const FloatArray& got = std::string(k) == "norm_p0"   ? a.norm_p0
                              : std::string(k) == "h_ratio" ? a.h_ratio
                                                            : a.norm_rest_median;
      expect_close(k, got.data, e.values.at(k), 0, 1e-3, 0);
    }
    expect_close("p0_cosine", a.p0_cosine.data, e.values.at("p0_cosine"), 1e-4, 1e-3, 0);
    expect_close("massive_p0", ints_as_floats(a.massive_p0.data), e.values.at("massive_p0"), 0, 0,
                 0);
    // Section 3: writes and routing.
    expect_close("attn_head_p0", a.attn_head_p0.data, e.values.at("attn_head_p0"), 0, 1e-3, 1e-6);
    expect_close("attn_head_rest", a.attn_head_rest.data, e.values.at("attn_head_rest"), 0, 1e-3,
                 1e-6);
    expect_close("moe_p0", a.moe_p0.data, e.values.at("moe_p0"), 0, 1e-3, 1e-6);
    expect_close("moe_rest", a.moe_rest.data, e.values.at("moe_rest"), 0, 1e-3, 1e-6);
    expect_close("expert_p0", a.expert_p0.data, e.values.at("expert_p0"), 0, 1e-3, 1e-6);
    expect_close("p0_topk_freq", a.p0_topk_freq.data, e.values.at("p0_topk_freq"), 1e-7, 0, 0);
    expect_close("rest_topk_freq", a.rest_topk_freq.data, e.values.at("rest_topk_freq"), 1e-7, 0,
                 0);
    // Section 4: the circuit map.
    for (const char* k : {"attr_embed", "attr_head", "attr_expert", "attr_mlp"}) {
      const std::string s(k);
      const FloatArray& got = s == "attr_embed"    ? a.attr_embed
                              : s == "attr_head"   ? a.attr_head
                              : s == "attr_expert" ? a.attr_expert
                                                   : a.attr_mlp;
      expect_close(k, got.data, e.values.at(k), 1e-7, 0, 1e-3);
    }
    // The identity of section 4: the per-component keys add up to the model's key at position 0.
    EXPECT_LT(a.meta.circuit_identity_max_rel_err, 1e-5);
    EXPECT_GE(a.meta.circuit_identity_max_rel_err, 0.0);
    // Section 5: the profile.
    expect_close("layer_share", a.layer_share.data, e.values.at("layer_share"), 1e-6, 0, 1e-3);
    expect_close("norm_gain_share", a.norm_gain_share.data, e.values.at("norm_gain_share"), 1e-6, 0,
                 1e-3);
    expect_close("first2_share", {a.first2_share}, e.values.at("first2_share"), 1e-3, 0, 0);
    EXPECT_EQ(a.peak_layer, static_cast<int32_t>(e.values.at("peak_layer")[0]));
    expect_close("entropy", {a.entropy}, e.values.at("entropy"), 1e-3, 0, 0);
  }
}

// The model's logits, a check of the whole forward pass beyond what the recorder sees.
TEST_P(Golden, LogitsMatch) {
  const std::string dir = kGoldenDir + "/" + GetParam();
  const Expected e = load_expected(dir + "/expected.safetensors");
  const IntArray tokens = load_tokens(dir + "/probes.npy");
  Checkpoint ck = Checkpoint::open(dir);
  auto world = make_single_comm();
  ForwardOptions fo;
  fo.want_logits = true;
  auto backend = make_cpu_backend(ck, ShardPlan::make(1, 0, 1, 1, ck.config()),
                                  {world.get(), world.get(), world.get()}, fo);
  ForwardObserver none;
  const FloatArray logits = backend->run(tokens, 0, none);
  expect_close("logits", logits.data, e.values.at("logits"), 2e-4, 1e-3, 0);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Golden, ::testing::Values("tiny_random", "tiny_trained"));

}  // namespace
