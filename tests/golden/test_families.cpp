// Every supported family against its transformers reference (tools/make_family_goldens.py,
// float64 eager; tests/golden/families/README.md). Tolerances are docs/metrics.md section 7's:
// attention to P0 within 1e-4 absolute, norms within 1e-3 relative; routing identical; logits
// within 1e-3 of their largest magnitude. The circuit identity (section 4) must hold on every
// family, whatever its norms, biases and residual wiring.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>

#include "golden_data.hpp"
#include "sinkscope/analyze.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/family.hpp"
#include "sinkscope/model.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/shard_plan.hpp"
#include "sinkscope/synth.hpp"

using namespace sinkscope;
namespace fs = std::filesystem;

namespace {

const std::string kFamiliesDir = std::string(SINKSCOPE_GOLDEN_DIR) + "/families";

using golden::expect_close;
using golden::Expected;
using golden::load_expected;

// DeepSeek-V3's routing from the reference's raw router logits, written independently of the
// backend: sigmoid scores (float32, as transformers computes the router), selection on score + bias
// restricted to the topk_group groups with the largest sum of their two best corrected scores
// (other groups' corrected scores become 0), ties to the lower index.
std::vector<int64_t> deepseek_selection(const double* lr, const std::vector<float>& bias,
                                        const ModelConfig& c) {
  const int64_t E = c.num_experts, G = c.n_group, per = E / G;
  std::vector<float> choice(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e)
    choice[e] = 1.f / (1.f + std::exp(-static_cast<float>(lr[e]))) + bias[e];
  std::vector<std::pair<float, int64_t>> groups;
  for (int64_t g = 0; g < G; ++g) {
    std::vector<float> v(choice.begin() + g * per, choice.begin() + (g + 1) * per);
    std::sort(v.rbegin(), v.rend());
    groups.push_back({v[0] + v[1], g});
  }
  std::stable_sort(groups.begin(), groups.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  for (int64_t g = c.topk_group; g < G; ++g)
    for (int64_t e = 0; e < per; ++e) choice[groups[g].second * per + e] = 0.f;
  std::vector<int64_t> order(static_cast<size_t>(E));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return choice[a] > choice[b]; });
  order.resize(static_cast<size_t>(c.top_k));
  return order;
}

// Routing frequencies implied by the reference's raw router logits, with sinkscope's tie rule
// (the lower expert index first). Softmax is monotonic, so both router kinds select the top-k
// logits.
void expected_routing(const Expected& e, const Checkpoint& ck, int64_t N, int64_t T,
                      std::vector<double>* p0, std::vector<double>* rest) {
  const ModelConfig& c = ck.config();
  const auto& logits = e.values.at("router_logits");
  const auto& layers = e.values.at("moe_layers");
  const int64_t Lm = static_cast<int64_t>(layers.size()), E = c.num_experts, K = c.top_k,
                L = c.num_layers;
  std::vector<std::vector<float>> bias(static_cast<size_t>(L));
  if (c.router == RouterKind::kSigmoidGroupTopK) {
    for (int64_t l = 0; l < L; ++l)
      if (c.is_moe_layer(l)) {
        bias[l].resize(static_cast<size_t>(E));
        ck.read_rows(tensor_name(c, Role::kRouterScoreBias, l), 0, E, bias[l].data());
      }
  }
  p0->assign(static_cast<size_t>(L * E), 0.0);
  rest->assign(static_cast<size_t>(L * E), 0.0);
  std::vector<int64_t> order(static_cast<size_t>(E));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < Lm; ++m)
      for (int64_t i = 0; i < T; ++i) {
        const double* lr = logits.data() + ((n * Lm + m) * T + i) * E;
        const int64_t l = static_cast<int64_t>(layers[static_cast<size_t>(m)]);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](int64_t a, int64_t b) { return lr[a] > lr[b]; });
        if (c.router == RouterKind::kSigmoidGroupTopK) {
          const auto sel = deepseek_selection(lr, bias[l], c);
          std::copy(sel.begin(), sel.end(), order.begin());
        }
        for (int64_t k = 0; k < K; ++k) {
          const size_t at = static_cast<size_t>(l * E + order[static_cast<size_t>(k)]);
          if (i == 0)
            (*p0)[at] += 1.0 / static_cast<double>(N);
          else
            (*rest)[at] += 1.0 / static_cast<double>(N * (T - 1));
        }
      }
}

// The family's analysis against its transformers reference: attention to P0 per query, norms,
// routing, the circuit identity, the profile; and (learned sinks) the sink mass per query.
void check_reference(const std::string& dir) {
  const Expected e = load_expected(dir + "/expected.safetensors");
  const IntArray tokens = load_tokens(dir + "/probes.npy");
  const int64_t N = static_cast<int64_t>(tokens.shape[0]),
                T = static_cast<int64_t>(tokens.shape[1]);
  auto world = make_single_comm();
  for (int64_t batch : {1, 3}) {
    SCOPED_TRACE("batch " + std::to_string(batch));
    AnalyzeOptions o;
    o.model = dir;
    o.per_query = true;
    o.batch = batch;
    const Analysis a = analyze_checkpoint(o, tokens, *world);
    expect_close("attn_p0", a.p0_per_query.data, e.values.at("attn_p0"), 1e-4, 0, 0);
    expect_close("norm_p0", a.norm_p0.data, e.values.at("norm_p0"), 0, 1e-3, 0);
    expect_close("norm_rest_median", a.norm_rest_median.data, e.values.at("norm_rest_median"), 0,
                 1e-3, 0);
    // Whatever the family's norms, biases and wiring, the components' keys add up to k_0.
    EXPECT_LT(a.meta.circuit_identity_max_rel_err, 1e-4);
    const Checkpoint ck = Checkpoint::open(dir);
    if (e.values.count("router_logits")) {
      std::vector<double> p0, rest;
      expected_routing(e, ck, N, T, &p0, &rest);
      expect_close("p0_topk_freq", a.p0_topk_freq.data, p0, 1e-6, 0, 0);
      expect_close("rest_topk_freq", a.rest_topk_freq.data, rest, 1e-6, 0, 0);
    }
    if (e.values.count("sink_mass")) {
      // Learned sinks (metrics 1.4): the mass per query, and sink_score / learned_sink_mass as
      // the mean over probes and the queries that see position 0 (i < window on sliding layers).
      const ModelConfig& c = ck.config();
      const auto& mass = e.values.at("sink_mass");
      const auto& p0 = e.values.at("attn_p0");
      expect_close("sink_mass", a.learned_sink_mass_per_query.data, mass, 1e-4, 0, 0);
      const int64_t L = c.num_layers, H = c.num_heads;
      std::vector<double> score(static_cast<size_t>(L * H), 0.0), sm(score.size(), 0.0);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t nq = c.window(l) > 0 ? std::min(T, c.window(l)) : T;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t h = 0; h < H; ++h)
            for (int64_t i = 0; i < nq; ++i) {
              const size_t at = static_cast<size_t>(((n * L + l) * H + h) * T + i);
              score[static_cast<size_t>(l * H + h)] += p0[at] / static_cast<double>(N * nq);
              sm[static_cast<size_t>(l * H + h)] += mass[at] / static_cast<double>(N * nq);
            }
      }
      expect_close("sink_score", a.sink_score.data, score, 1e-4, 0, 0);
      expect_close("learned_sink_mass", a.learned_sink_mass.data, sm, 1e-4, 0, 0);
    }
    // The profile is a distribution over the embedding and the layers.
    double total = 0;
    for (float s : a.layer_share.data) total += s;
    EXPECT_NEAR(total, 1.0, 1e-5);
  }
}

void check_logits(const std::string& dir) {
  const Expected e = load_expected(dir + "/expected.safetensors");
  const IntArray tokens = load_tokens(dir + "/probes.npy");
  Checkpoint ck = Checkpoint::open(dir);
  validate_checkpoint(ck);
  auto world = make_single_comm();
  ForwardOptions fo;
  fo.want_logits = true;
  auto backend = make_cpu_backend(ck, ShardPlan::make(1, 0, 1, 1, ck.config()),
                                  {world.get(), world.get(), world.get()}, fo);
  ForwardObserver none;
  const FloatArray logits = backend->run(tokens, 0, none);
  expect_close("logits", logits.data, e.values.at("logits"), 0, 0, 1e-3);
}

class Family : public ::testing::TestWithParam<std::string> {};

TEST_P(Family, MatchesTransformersReference) {
  const std::string dir = kFamiliesDir + "/" + GetParam();
  ASSERT_TRUE(fs::exists(dir + "/expected.safetensors")) << "golden fixture missing: " << dir;
  check_reference(dir);
}

TEST_P(Family, LogitsMatch) { check_logits(kFamiliesDir + "/" + GetParam()); }

// Mean-ablating every component of layer 0 at position 0 moves layer 1's keys, and the
// shared expert (Qwen2-MoE) is a component of its own: ablating it alone changes sink scores.
TEST(FamilyComponents, SharedExpertIsAnAblatableComponent) {
  const std::string dir = kFamiliesDir + "/qwen2_moe";
  const IntArray tokens = load_tokens(dir + "/probes.npy");
  auto world = make_single_comm();
  AnalyzeOptions o;
  o.model = dir;
  o.ablate = "layers=0-0";
  const Analysis a = analyze_checkpoint(o, tokens, *world);
  const Checkpoint ck = Checkpoint::open(dir);
  const ModelConfig& c = ck.config();
  ASSERT_TRUE(c.has_shared_expert());
  ASSERT_EQ(a.attr_shared_expert.shape, (std::vector<size_t>{3, 4, 3}));
  int64_t shared_row = -1;
  for (size_t k = 0; k < a.ablation_components.shape[0]; ++k)
    if (a.ablation_components.at(k, 1) == static_cast<int32_t>(ComponentKind::kSharedExpert))
      shared_row = static_cast<int64_t>(k);
  ASSERT_GE(shared_row, 0) << "layers=0-0 must list layer 0's shared expert";
  double moved = 0, nonzero_attr = 0;
  const size_t L = 3, H = 4;
  for (size_t i = 0; i < L * H; ++i)
    moved = std::max<double>(moved, std::fabs(a.ablation_delta_sink.data[shared_row * L * H + i]));
  for (float v : a.attr_shared_expert.data)
    nonzero_attr = std::max<double>(nonzero_attr, std::fabs(v));
  EXPECT_GT(moved, 1e-6);
  EXPECT_GT(nonzero_attr, 1e-6);
}

// A temporary folder, removed at the end of the test.
struct TempDir {
  TempDir() {
    char tmpl[] = "/tmp/sinkscope_family_XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string path;
};

// `synth` writes a checkpoint of every family that validates and analyses, with the circuit
// identity holding (the family table drives both the writer and the reader).
TEST_P(Family, SynthWritesAnAnalysableCheckpoint) {
  const ModelConfig shape = parse_model_config(kFamiliesDir + "/" + GetParam() + "/config.json");
  TempDir tmp;
  synthesize(shape, tmp.path, false, 3);
  const Checkpoint ck = Checkpoint::open(tmp.path);
  EXPECT_EQ(ck.config().model_type, shape.model_type);
  validate_checkpoint(ck);
  auto world = make_single_comm();
  AnalyzeOptions o;
  o.model = tmp.path;
  const Analysis a = analyze_checkpoint(o, make_probes("random:2:12:5", shape.vocab_size), *world);
  EXPECT_EQ(a.meta.model_type, shape.model_type);
  EXPECT_LT(a.meta.circuit_identity_max_rel_err, 1e-4);
  EXPECT_EQ(a.sink_score.shape, (std::vector<size_t>{static_cast<size_t>(shape.num_layers),
                                                     static_cast<size_t>(shape.num_heads)}));
}

// `synth` writes gpt_oss checkpoints (bf16 experts) that validate and analyse with probes longer
// than the sliding window; the learned sink mass is recorded and sink mass plus A[i, 0] stay <= 1.
TEST(FamilySynth, GptOss) {
  const ModelConfig shape =
      parse_model_config(std::string(SINKSCOPE_GOLDEN_DIR) + "/../data/tiny_gpt_oss.json");
  TempDir tmp;
  synthesize(shape, tmp.path, false, 3);
  const Checkpoint ck = Checkpoint::open(tmp.path);
  validate_checkpoint(ck);
  EXPECT_EQ(ck.config().window(0), 8);
  EXPECT_EQ(ck.config().window(1), 0);
  auto world = make_single_comm();
  AnalyzeOptions o;
  o.model = tmp.path;
  o.per_query = true;
  const Analysis a = analyze_checkpoint(o, make_probes("random:2:20:5", shape.vocab_size), *world);
  EXPECT_LT(a.meta.circuit_identity_max_rel_err, 1e-4);
  ASSERT_EQ(a.learned_sink_mass.shape, (std::vector<size_t>{3, 4}));
  ASSERT_EQ(a.learned_sink_mass_per_query.shape, (std::vector<size_t>{2, 3, 4, 20}));
  double lo = 1, hi = 0;
  for (size_t i = 0; i < a.p0_per_query.size(); ++i) {
    const float m = a.learned_sink_mass_per_query.data[i], p = a.p0_per_query.data[i];
    lo = std::min<double>(lo, m);
    hi = std::max<double>(hi, m + p);
  }
  EXPECT_GT(lo, 0.0);
  EXPECT_LE(hi, 1.0 + 1e-6);
  // Sliding layers 0 and 2: queries i >= 8 cannot see position 0; the full layer 1 can.
  EXPECT_EQ(a.p0_per_query.at(0, 0, 0, 8), 0.f);
  EXPECT_EQ(a.p0_per_query.at(1, 2, 3, 19), 0.f);
  EXPECT_GT(a.p0_per_query.at(0, 1, 0, 19), 0.f);
  EXPECT_GT(a.p0_per_query.at(0, 0, 0, 7), 0.f);
}

// The planted two-block circuit (docs/synth.md) in families without q/k norms: the sink head is
// the strongest sink, and mean-ablating the first-stage head or the planted expert at position 0
// removes most of it.
class PlantedFamily : public ::testing::TestWithParam<std::string> {};

TEST_P(PlantedFamily, CircuitIsFoundAndCausal) {
  ModelConfig shape = parse_model_config(kFamiliesDir + "/" + GetParam() + "/config.json");
  shape.mlp_only_layers.clear();
  TempDir tmp;
  const PlantedCircuit pc = synthesize(shape, tmp.path, true, 7);
  IntArray tokens = prepend_bos(make_probes("random:4:15:9", shape.vocab_size), pc.bos_token_id);
  for (size_t n = 0; n < tokens.shape[0]; ++n)
    for (size_t i = 1; i < tokens.shape[1]; ++i)
      if (tokens.at(n, i) == pc.bos_token_id) tokens.at(n, i) = pc.bos_token_id + 1;
  auto world = make_single_comm();
  AnalyzeOptions o;
  o.model = tmp.path;
  o.ablate = "layers=0-1";
  const Analysis a = analyze_checkpoint(o, tokens, *world);
  const size_t H = static_cast<size_t>(shape.num_heads);
  const float sink = a.sink_score.at(pc.sink_layer, pc.sink_head);
  std::printf("%s planted: sink score %.4f\n", GetParam().c_str(), sink);
  EXPECT_GT(sink, 0.6f);
  for (size_t i = 0; i < a.sink_score.size(); ++i) {
    if (i != static_cast<size_t>(pc.sink_layer) * H + static_cast<size_t>(pc.sink_head)) {
      EXPECT_LT(a.sink_score.data[i], sink) << "sink_score[" << i / H << ", " << i % H << "]";
    }
  }
  bool saw_head = false, saw_expert = false;
  for (size_t k = 0; k < a.ablation_components.shape[0]; ++k) {
    const int32_t layer = a.ablation_components.at(k, 0), kind = a.ablation_components.at(k, 1),
                  index = a.ablation_components.at(k, 2);
    const float delta = a.ablation_delta_sink.at(k, pc.sink_layer, pc.sink_head);
    const bool head = layer == pc.head_layer && kind == 0 && index == pc.head;
    const bool expert = layer == pc.expert_layer && kind == 1 && index == pc.expert;
    saw_head |= head;
    saw_expert |= expert;
    if (head || expert) {
      std::printf("%s planted: ablating (%d, %d, %d) moves the sink by %.4f\n", GetParam().c_str(),
                  layer, kind, index, delta);
      EXPECT_LT(delta, -0.5f * sink) << "ablating planted component " << layer << "/" << kind;
    }
  }
  EXPECT_TRUE(saw_head && saw_expert);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PlantedFamily, ::testing::Values("mixtral", "qwen2_moe"));

INSTANTIATE_TEST_SUITE_P(Fixtures, Family,
                         ::testing::Values("olmoe", "mixtral", "qwen2_moe", "llama", "qwen3",
                                           "olmo2", "gpt_neox", "qwen3_moe_fused", "deepseek_v3",
                                           "deepseek_v3_fp8", "gpt_oss", "gpt_oss_mxfp4",
                                           "llama_mlp_bias"));

}  // namespace
