// sinkscope against the independent float64 reference (tests/reference), docs/metrics.md section 7:
// synthetic checkpoints of several shapes (GQA, MHA, dense layers via mlp_only_layers and
// decoder_sparse_step, a model without experts, norm_topk_prob false, head_dim != hidden/heads,
// top-1 and top-3 routing, exact router ties, massive activations, non-unit RMSNorm weights),
// micro-batches that do not divide the probe count, causal ablations of every component kind, and
// the planted circuit of `synth` (the circuit map and the causal ablation must find it, and agree
// with the reference). Each run prints the largest error per array over all cases.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "reference/reference.hpp"
#include "sinkscope/analysis.hpp"
#include "sinkscope/analyze.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/synth.hpp"

namespace sinkscope {
namespace {

namespace fs = std::filesystem;
using reference::Component;
using reference::ReferenceModel;
using reference::ReferenceResult;

// ---- tolerances of docs/metrics.md section 7 (CPU)
constexpr double kAttnAbs = 1e-4;      // attention to P0: absolute
constexpr double kRel = 1e-3;          // norms and attributions: relative
constexpr double kAblationAbs = 1e-3;  // ablation deltas (differences of sink scores): absolute
constexpr double kIdentityRel = 1e-9;  // sum_c K(c[0]) = k_0 in the float64 reference

// Largest error seen per array over every case, printed at the end (the numbers the report quotes).
struct Worst {
  double abs = 0, rel = 0;  // rel: |a - b| / |ref| over entries with |ref| > 1e-6
  double used = 0;          // largest fraction of the allowed bound used
};
std::map<std::string, Worst>& worst() {
  static std::map<std::string, Worst> w;
  return w;
}

class PrintWorst : public ::testing::Environment {
 public:
  void TearDown() override {
    std::printf("\nsinkscope vs float64 reference, largest errors over all cases:\n");
    std::printf("  %-22s %12s %12s %10s\n", "array", "max |d|", "max rel", "of bound");
    for (const auto& [name, w] : worst())
      std::printf("  %-22s %12.3e %12.3e %9.1f%%\n", name.c_str(), w.abs, w.rel, 100.0 * w.used);
  }
};
const auto* const kPrintWorst = ::testing::AddGlobalTestEnvironment(new PrintWorst);

// Compares every entry with bound(ref) = abs_tol + rel_tol * |ref| + scale_tol * max|ref of the
// array|; records the worst errors under `name`.
void compare(const std::string& what, const std::string& name, const FloatArray& got,
             const FloatArray& ref, double abs_tol, double rel_tol, double scale_tol = 0) {
  ASSERT_EQ(got.shape, ref.shape) << what << ": " << name << " has the wrong shape";
  double scale = 0;
  for (float v : ref.data) scale = std::max(scale, std::fabs(static_cast<double>(v)));
  Worst& w = worst()[name];
  int reported = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double a = got.data[i], b = ref.data[i], diff = std::fabs(a - b);
    const double bound = abs_tol + rel_tol * std::fabs(b) + scale_tol * scale;
    w.abs = std::max(w.abs, diff);
    if (std::fabs(b) > 1e-6) w.rel = std::max(w.rel, diff / std::fabs(b));
    w.used = std::max(w.used, diff / bound);
    if (!(diff <= bound) && reported++ < 5)
      ADD_FAILURE() << what << ": " << name << "[" << i << "] sinkscope " << a << " reference " << b
                    << " (|d| " << diff << " > " << bound << ")";
  }
}

void compare_scalar(const std::string& what, const std::string& name, double got, double ref,
                    double abs_tol) {
  FloatArray g({1}, "x"), r({1}, "x");
  g.data[0] = static_cast<float>(got);
  r.data[0] = static_cast<float>(ref);
  compare(what, name, g, r, abs_tol, 0);
}

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "sinkscope_test_reference_XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

 private:
  fs::path dir_;
};

struct Shape {
  int64_t layers = 3, heads = 4, kv_heads = 2, head_dim = 8, hidden = 32;
  int64_t experts = 4, top_k = 2, moe_inter = 16, dense_inter = 40, vocab = 64;
  bool norm_topk_prob = true;
  int64_t sparse_step = 1;
  std::vector<int64_t> mlp_only;
  double rope_theta = 10000.0, rms_eps = 1e-6;
  std::string model_type = "qwen3_moe";
};

ModelConfig make_config(const Shape& s) {
  ModelConfig c;
  c.model_type = s.model_type;
  c.vocab_size = s.vocab;
  c.hidden_size = s.hidden;
  c.num_layers = s.layers;
  c.num_heads = s.heads;
  c.num_kv_heads = s.kv_heads;
  c.head_dim = s.head_dim;
  c.intermediate_size = s.dense_inter;
  c.moe_intermediate_size = s.moe_inter;
  c.num_experts = s.experts;
  c.top_k = s.top_k;
  c.norm_topk_prob = s.norm_topk_prob;
  c.decoder_sparse_step = s.sparse_step;
  c.mlp_only_layers = s.mlp_only;
  c.rms_norm_eps = s.rms_eps;
  c.rope.theta = s.rope_theta;
  c.dtype = "bfloat16";
  return c;
}

// Rewrites the checkpoint in `dir` (bf16), letting `edit` change any tensor's values.
template <class Edit>
void rewrite_checkpoint(const std::string& dir, Edit edit) {
  std::vector<TensorInfo> infos;
  std::vector<std::vector<float>> values;
  {
    const Checkpoint ck =
        Checkpoint::open(dir);  // mapped: read everything before rewriting the file
    for (const TensorInfo& t : ck.tensors()) {
      int64_t count = 1;
      for (int64_t d : t.shape) count *= d;
      const int64_t rows = t.shape.size() <= 1 ? count : count / t.shape.back();
      std::vector<float> v(static_cast<size_t>(count));
      ck.read_rows(t.name, 0, rows, v.data());
      edit(t, v);
      infos.push_back(t);
      values.push_back(std::move(v));
    }
  }
  std::vector<TensorToWrite> tw;
  for (size_t i = 0; i < infos.size(); ++i)
    tw.push_back({infos[i].name, DType::BF16, infos[i].shape, values[i].data()});
  write_safetensors((fs::path(dir) / "model.safetensors").string(), tw);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// `synth` writes every RMSNorm weight as 1, which would leave a misuse of gamma_in, gamma_post,
// gamma_q or gamma_k (e.g. in K(v) of docs/metrics.md section 4) unseen: rewrite them as 1 + 0.3
// N(0, 1).
void randomize_norm_weights(const std::string& dir, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  rewrite_checkpoint(dir, [&](const TensorInfo& t, std::vector<float>& v) {
    if (ends_with(t.name, "norm.weight"))
      for (auto& x : v) x = 1.f + 0.3f * normal(rng);
  });
}

// Router row 1 := router row 0 in every MoE layer: experts 0 and 1 get identical logits, so every
// token where they meet at the top-k boundary is an exact tie, decided by "ties -> lower index".
void tie_router_rows(const std::string& dir) {
  rewrite_checkpoint(dir, [&](const TensorInfo& t, std::vector<float>& v) {
    if (!ends_with(t.name, "mlp.gate.weight")) return;
    const size_t D = static_cast<size_t>(t.shape.back());
    std::copy_n(v.begin(), D, v.begin() + static_cast<long>(D));
  });
}

// Massive activations (Sun et al.) for massive_p0: the embedding row of `token` gets channels
// 4096 and -2048 (counted: > 100 and > 1000 x the median |x| ~ 0.7) and 512 (> 100 but not
// > 1000 x the median: not counted). Values exact in bf16.
void plant_massive_embedding(const std::string& dir, int32_t token) {
  rewrite_checkpoint(dir, [&](const TensorInfo& t, std::vector<float>& v) {
    if (t.name != "model.embed_tokens.weight") return;
    float* row = v.data() + static_cast<size_t>(token) * static_cast<size_t>(t.shape.back());
    row[3] = 4096.f;
    row[7] = -2048.f;
    row[11] = 512.f;
  });
}

Analysis run_sinkscope(const std::string& model, const IntArray& tokens, int64_t batch,
                       const std::string& ablate, bool causal_profile = false) {
  AnalyzeOptions opt;
  opt.model = model;
  opt.batch = batch;
  opt.per_query = true;
  opt.ablate = ablate;
  opt.causal_profile = causal_profile;
  opt.threads = 1;
  auto comm = make_single_comm();
  return analyze_checkpoint(opt, tokens, *comm);
}

// Every array of docs/metrics.md sections 1-5 against the reference.
void compare_analysis(const std::string& what, const Analysis& s, const ReferenceResult& R,
                      const ModelConfig& cfg) {
  const Analysis& r = R.analysis;
  const size_t L = static_cast<size_t>(cfg.num_layers), E = static_cast<size_t>(cfg.num_experts);
  const double N = static_cast<double>(r.meta.num_probes), T = static_cast<double>(r.meta.seq_len);

  // The reference itself: the decomposition of section 4 is exact up to float64 rounding.
  EXPECT_LT(R.identity_max_rel_err, kIdentityRel)
      << what << ": sum_c K(c[0]) != k_0 in the reference";
  worst()["(ref identity)"].abs = std::max(worst()["(ref identity)"].abs, R.identity_max_rel_err);
  // Well-posedness of the case: no router near-tie and no sink score at eps, where fp32 and
  // float64 may legitimately disagree about a discrete choice.
  // (Router logits are O(1) here and fp32 gets them right to ~1e-6, so a logit gap of 1e-5 is
  // resolved; a sink score farther than the attention tolerance from eps must be classified the
  // same.)
  if (R.exact_routing_ties > 0)
    std::printf("%s: %lld tokens with an exact router tie at the top-k boundary\n", what.c_str(),
                static_cast<long long>(R.exact_routing_ties));
  ASSERT_GT(R.min_routing_gap, 1e-5) << what << ": a router near-tie; pick another seed";
  ASSERT_GT(R.min_sink_eps_gap, kAttnAbs)
      << what << ": a sink score sits at eps; pick another seed";

  // Section 1: attention to position zero, absolute.
  compare(what, "sink_score", s.sink_score, r.sink_score, kAttnAbs, 0);
  compare(what, "p0_per_query", s.p0_per_query, r.p0_per_query, kAttnAbs, 0);
  compare(what, "sink_rate", s.sink_rate, r.sink_rate, 0,
          0);  // identical away from eps (checked above)
  EXPECT_EQ(s.meta.sink_rate, r.meta.sink_rate) << what;

  // Section 2: norms, relative (a tiny absolute floor for values that are exactly zero).
  compare(what, "norm_p0", s.norm_p0, r.norm_p0, 1e-7, kRel);
  compare(what, "norm_rest_median", s.norm_rest_median, r.norm_rest_median, 1e-7, kRel);
  compare(what, "h_ratio", s.h_ratio, r.h_ratio, 1e-7, kRel);
  // A cosine is bounded by 1 and can sit near 0, where a relative bound means nothing: 1e-3
  // absolute.
  compare(what, "p0_cosine", s.p0_cosine, r.p0_cosine, kRel, 0);
  ASSERT_EQ(s.massive_p0.shape, r.massive_p0.shape);
  EXPECT_EQ(s.massive_p0.data, r.massive_p0.data) << what << ": massive_p0";
  if (std::any_of(r.massive_p0.data.begin(), r.massive_p0.data.end(),
                  [](int32_t m) { return m > 0; })) {
    std::printf("%s: massive_p0 = [", what.c_str());
    for (int32_t m : r.massive_p0.data) std::printf(" %d", m);
    std::printf(" ]\n");
  }

  // Section 3: write norms, relative; routing frequencies identical (compared as exact counts).
  compare(what, "attn_head_p0", s.attn_head_p0, r.attn_head_p0, 1e-7, kRel);
  compare(what, "attn_head_rest", s.attn_head_rest, r.attn_head_rest, 1e-7, kRel);
  compare(what, "moe_p0", s.moe_p0, r.moe_p0, 1e-7, kRel);
  compare(what, "moe_rest", s.moe_rest, r.moe_rest, 1e-7, kRel);
  compare(what, "expert_p0", s.expert_p0, r.expert_p0, 1e-7, kRel);
  ASSERT_EQ(s.p0_topk_freq.shape, r.p0_topk_freq.shape);
  ASSERT_EQ(s.rest_topk_freq.shape, r.rest_topk_freq.shape);
  for (size_t i = 0; i < L * E; ++i) {
    EXPECT_EQ(std::llround(s.p0_topk_freq.data[i] * N), R.p0_routed_count[i])
        << what << ": p0_topk_freq[layer " << i / E << ", expert " << i % E << "]";
    EXPECT_EQ(std::llround(s.rest_topk_freq.data[i] * N * (T - 1)), R.rest_routed_count[i])
        << what << ": rest_topk_freq[layer " << i / E << ", expert " << i % E << "]";
    EXPECT_NEAR(s.p0_topk_freq.data[i], r.p0_topk_freq.data[i], 1e-7) << what;
    EXPECT_NEAR(s.rest_topk_freq.data[i], r.rest_topk_freq.data[i], 1e-7) << what;
  }

  // Section 4: attributions, 1e-3 relative to the largest |attribution| of the array (plus a
  // tiny floor). Why not per entry: attr = qbar . (K(c[0]) - K(cbar)) / sqrt(d) is a difference
  // and a dot product whose terms are as large as the array's large entries; sinkscope forms it
  // in fp32, so its rounding error scales with those terms, not with the (possibly cancelling,
  // near-zero) result. A per-entry relative bound would fail on entries that are zero to
  // rounding; a bound relative to the array's scale is the "1e-3 relative" of section 7 for a map.
  compare(what, "attr_embed", s.attr_embed, r.attr_embed, 1e-7, 0, kRel);
  compare(what, "attr_head", s.attr_head, r.attr_head, 1e-7, 0, kRel);
  compare(what, "attr_expert", s.attr_expert, r.attr_expert, 1e-7, 0, kRel);
  compare(what, "attr_mlp", s.attr_mlp, r.attr_mlp, 1e-7, 0, kRel);

  // Section 5: shares are fractions of 1 (1e-3 of the total), entropy 1e-3 nats.
  compare(what, "layer_share", s.layer_share, r.layer_share, kRel, 0);
  compare(what, "norm_gain_share", s.norm_gain_share, r.norm_gain_share, kRel, 0);
  compare_scalar(what, "first2_share", s.first2_share, r.first2_share, kRel);
  compare_scalar(what, "entropy", s.entropy, r.entropy, kRel);
  {
    // peak_layer: identical unless the two largest layer shares are within the tolerance.
    std::vector<float> sh(r.layer_share.data.begin() + 1, r.layer_share.data.end());
    std::sort(sh.rbegin(), sh.rend());
    if (sh.size() < 2 || sh[0] - sh[1] > 2 * kRel) {
      EXPECT_EQ(s.peak_layer, r.peak_layer) << what << ": peak_layer";
    }
  }
}

// Ablation deltas of sinkscope (components as it chose them) against the reference's reruns.
void compare_ablation(const std::string& what, const Analysis& s, const ReferenceModel& ref,
                      const IntArray& tokens, const ModelConfig& cfg) {
  const size_t K = s.ablation_components.shape.empty() ? 0 : s.ablation_components.shape[0];
  const size_t L = static_cast<size_t>(cfg.num_layers), H = static_cast<size_t>(cfg.num_heads);
  ASSERT_GT(K, 0u) << what << ": no ablations recorded";
  ASSERT_EQ(s.ablation_delta_sink.shape, (std::vector<size_t>{K, L, H}));
  const std::vector<double> clean = ref.sink_scores(tokens, {});
  FloatArray got({K, L, H}, "component,layer,head"), want({K, L, H}, "component,layer,head");
  for (size_t k = 0; k < K; ++k) {
    const Component c{s.ablation_components.at(k, 0), s.ablation_components.at(k, 1),
                      s.ablation_components.at(k, 2)};
    const std::vector<double> ablated = ref.sink_scores(tokens, {c});
    for (size_t i = 0; i < L * H; ++i) {
      got.data[k * L * H + i] = s.ablation_delta_sink.data[k * L * H + i];
      want.data[k * L * H + i] = static_cast<float>(ablated[i] - clean[i]);
    }
  }
  compare(what, "ablation_delta_sink", got, want, kAblationAbs, 0);
}

struct Case {
  std::string name;
  Shape shape;
  int64_t probes, positions, batch;
  uint64_t seed;
  std::string ablate;  // "" = no ablation run
  bool tie_router = false;
  bool massive = false;  // massive activations in probe 0's first token (massive_p0 > 0)
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class ReferenceShapes : public ::testing::TestWithParam<Case> {};

TEST_P(ReferenceShapes, MatchesFloat64Reference) {
  const Case& k = GetParam();
  TempDir tmp;
  const std::string dir = tmp.path("model");
  const ModelConfig cfg = make_config(k.shape);
  synthesize(cfg, dir, false, k.seed);
  randomize_norm_weights(dir, k.seed + 2);
  if (k.tie_router) tie_router_rows(dir);
  const IntArray tokens =
      make_probes("random:" + std::to_string(k.probes) + ":" + std::to_string(k.positions) + ":" +
                      std::to_string(k.seed + 1),
                  cfg.vocab_size);
  if (k.massive) plant_massive_embedding(dir, tokens.at(0, 0));
  const Analysis s = run_sinkscope(dir, tokens, k.batch, k.ablate);
  const ReferenceModel ref(dir);
  const ReferenceResult R = ref.analyze(tokens, 0.3);
  compare_analysis(k.name, s, R, ref.config());
  if (!k.ablate.empty()) compare_ablation(k.name, s, ref, tokens, ref.config());
}

std::vector<Case> cases() {
  std::vector<Case> v;
  {                                                 // GQA: 4 query heads on 2 KV heads
    Case c{"gqa", {}, 4, 17, 4, 11, "layers=0-0"};  // T odd: an even count for the rest median
    c.massive = true;
    v.push_back(c);
  }
  {  // MHA, larger RoPE base, batch 2 of 3 probes
    Case c{"mha", {}, 3, 8, 2, 23, ""};
    c.shape.layers = 4;
    c.shape.kv_heads = 4;
    c.shape.experts = 6;
    c.shape.moe_inter = 24;
    c.shape.vocab = 80;
    c.shape.rope_theta = 1e6;
    v.push_back(c);
  }
  {  // a dense layer via mlp_only_layers, top-1 routing, one KV head; every component ablated
     // (top=K beyond the component count: the embedding, every head, expert and the dense MLP)
    Case c{"dense_mlp_only", {}, 5, 24, 2, 37, "top=1000"};
    c.shape.layers = 4;
    c.shape.heads = 2;
    c.shape.kv_heads = 1;
    c.shape.hidden = 24;
    c.shape.head_dim = 12;
    c.shape.top_k = 1;
    c.shape.mlp_only = {2};
    v.push_back(c);
  }
  {  // decoder_sparse_step 2 (layers 1 and 3 MoE, 0, 2, 4 dense), norm_topk_prob false,
     // head_dim 16 != hidden / heads = 8, T = 40, micro-batch larger than N
    Case c{"sparse_step2", {}, 3, 40, 5, 41, "layers=0-1"};
    c.shape.layers = 5;
    c.shape.head_dim = 16;
    c.shape.sparse_step = 2;
    c.shape.norm_topk_prob = false;
    c.shape.rms_eps = 1e-5;
    v.push_back(c);
  }
  {  // norm_topk_prob false, top-3 of 8, head_dim 16 != 48 / 4, batch 2 with N = 5
    Case c{"headdim_topk3", {}, 5, 13, 2, 53, ""};
    c.shape.hidden = 48;
    c.shape.head_dim = 16;
    c.shape.experts = 8;
    c.shape.top_k = 3;
    c.shape.norm_topk_prob = false;
    c.shape.vocab = 100;
    c.massive = true;
    v.push_back(c);
  }
  {  // no experts at all (model_type qwen3): every layer is a dense MLP
    Case c{"dense_qwen3", {}, 3, 10, 2, 71, "layers=1-1"};
    c.shape.experts = 0;
    c.shape.top_k = 0;
    c.shape.model_type = "qwen3";
    v.push_back(c);
  }
  {  // exact router ties (experts 0 and 1 share a router row): the lower index must win. This
     // checks the tie rule sinkscope documents (forward.cpp), beyond docs/metrics.md section 7,
     // which exempts exact ties; it relies on identical router rows giving bit-identical fp32
     // logits.
    Case c{"router_ties", {}, 4, 16, 3, 61, ""};
    c.tie_router = true;
    v.push_back(c);
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(Shapes, ReferenceShapes, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

// ---- the planted circuit of `synth --plant-circuit`
TEST(ReferencePlanted, FindsAndMatchesThePlantedCircuit) {
  TempDir tmp;
  const std::string dir = tmp.path("planted");
  Shape sh;
  sh.layers = 4;
  const ModelConfig cfg = make_config(sh);
  const PlantedCircuit pc = synthesize(cfg, dir, true, 7);
  const int64_t N = 5, T = 16, H = cfg.num_heads, E = cfg.num_experts;

  // Probes start with the BOS token and never contain it elsewhere: ids in [2, vocab).
  IntArray tokens({static_cast<size_t>(N), static_cast<size_t>(T)}, "probe,position");
  std::mt19937_64 rng(99);
  std::uniform_int_distribution<int32_t> ids(2, static_cast<int32_t>(cfg.vocab_size - 1));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < T; ++i) tokens.at(n, i) = i == 0 ? pc.bos_token_id : ids(rng);
  ASSERT_EQ(pc.bos_token_id, 1);

  const Analysis s = run_sinkscope(dir, tokens, 2, "layers=0-1");  // batch 2 does not divide N = 5
  const ReferenceModel ref(dir);
  const ReferenceResult R = ref.analyze(tokens, 0.3);
  compare_analysis("planted", s, R, ref.config());

  // (a) the sink head is a sink, and the strongest one.
  const float sink = s.sink_score.at(pc.sink_layer, pc.sink_head);
  EXPECT_GT(sink, 0.9f);
  for (size_t i = 0; i < s.sink_score.size(); ++i)
    if (i != static_cast<size_t>(pc.sink_layer * H + pc.sink_head)) {
      EXPECT_LT(s.sink_score.data[i], sink) << "sink_score[" << i / H << ", " << i % H << "]";
    }

  // (b) the planted expert carries the largest positive attribution to the sink head, and more
  // than half of all positive attribution to it.
  const size_t t = static_cast<size_t>(pc.sink_layer), h = static_cast<size_t>(pc.sink_head);
  const double planted = s.attr_expert.at(t, h, pc.expert_layer, pc.expert);
  double positive = std::max(0.f, s.attr_embed.at(t, h)), largest_other = s.attr_embed.at(t, h);
  for (size_t l = 0; l < t; ++l) {
    for (size_t j = 0; j < static_cast<size_t>(H); ++j) {
      positive += std::max(0.f, s.attr_head.at(t, h, l, j));
      largest_other = std::max<double>(largest_other, s.attr_head.at(t, h, l, j));
    }
    for (size_t e = 0; e < static_cast<size_t>(E); ++e) {
      positive += std::max(0.f, s.attr_expert.at(t, h, l, e));
      if (!(l == static_cast<size_t>(pc.expert_layer) && e == static_cast<size_t>(pc.expert)))
        largest_other = std::max<double>(largest_other, s.attr_expert.at(t, h, l, e));
    }
    positive += std::max(0.f, s.attr_mlp.at(t, h, l));
    largest_other = std::max<double>(largest_other, s.attr_mlp.at(t, h, l));
  }
  EXPECT_GT(planted, 0.0);
  EXPECT_GT(planted, largest_other) << "the planted expert is not the strongest source";
  EXPECT_GT(planted, 0.5 * positive) << "planted " << planted << " of positive total " << positive;
  std::printf(
      "planted: sink score %.4f; expert attribution %.4f of positive total %.4f (next largest "
      "%.4f)\n",
      sink, planted, positive, largest_other);

  // (c) mean-ablating head A or the expert at P0 removes the sink; nothing else in layers 0-1 does.
  const size_t K = s.ablation_components.shape.at(0);
  bool saw_head = false, saw_expert = false;
  float largest_other_delta = 0;
  for (size_t k = 0; k < K; ++k) {
    const int32_t layer = s.ablation_components.at(k, 0), kind = s.ablation_components.at(k, 1),
                  index = s.ablation_components.at(k, 2);
    const float delta = s.ablation_delta_sink.at(k, t, h);
    const bool is_head = layer == pc.head_layer && kind == 0 && index == pc.head;
    const bool is_expert = layer == pc.expert_layer && kind == 1 && index == pc.expert;
    saw_head |= is_head;
    saw_expert |= is_expert;
    if (is_head || is_expert) {
      EXPECT_LT(delta, -0.5f) << "ablating planted component (" << layer << ", " << kind << ", "
                              << index << ")";
    } else {
      largest_other_delta = std::max(largest_other_delta, std::fabs(delta));
      EXPECT_LT(std::fabs(delta), 0.2f) << "ablating non-planted component (" << layer << ", "
                                        << kind << ", " << index << ") moved the sink by " << delta;
    }
    if (is_head || is_expert)
      std::printf("planted: ablating (%d, %d, %d) changes the sink score by %.4f\n", layer, kind,
                  index, delta);
  }
  EXPECT_TRUE(saw_head && saw_expert) << "layers=0-1 did not ablate the planted components";
  std::printf(
      "planted: largest |delta| on the sink head from a non-planted component of layers 0-1: "
      "%.4f\n",
      largest_other_delta);

  // (d) the ablation deltas agree with the reference's reruns.
  compare_ablation("planted", s, ref, tokens, ref.config());
}

// Probes of the planted circuit: BOS first, never elsewhere (ids in [2, vocab)).
IntArray planted_probes(const ModelConfig& cfg, const PlantedCircuit& pc, int64_t N, int64_t T,
                        uint64_t seed) {
  IntArray tokens({static_cast<size_t>(N), static_cast<size_t>(T)}, "probe,position");
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> ids(2, static_cast<int32_t>(cfg.vocab_size - 1));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < T; ++i) tokens.at(n, i) = i == 0 ? pc.bos_token_id : ids(rng);
  return tokens;
}

// ---- contract 1.2: the causal layer profile against the reference's own layer ablations
// (every component of a layer, enumerated from the reference's weights, in one float64 run).
void compare_causal(const std::string& what, const Analysis& s, const ReferenceModel& ref,
                    const IntArray& tokens) {
  ASSERT_TRUE(s.has_causal_profile()) << what;
  std::vector<double> per_probe;
  const std::vector<double> both = ref.causal_drop(tokens, 2, &per_probe);
  const std::vector<double> heads = ref.causal_drop(tokens, 0), ffn = ref.causal_drop(tokens, 1);
  const size_t L = both.size() - 1;
  auto as_array = [](const std::vector<double>& v, std::vector<size_t> shape) {
    FloatArray f(shape, "");
    for (size_t i = 0; i < v.size(); ++i) f.data[i] = static_cast<float>(v[i]);
    return f;
  };
  compare(what, "causal_drop", s.causal_drop, as_array(both, {L + 1}), kAblationAbs, 0);
  compare(what, "causal_drop_per_probe", s.causal_drop_per_probe,
          as_array(per_probe, {per_probe.size() / (L + 1), L + 1}), kAblationAbs, 0);
  compare(what, "causal_drop_attention", s.causal_drop_attention,
          as_array(std::vector<double>(heads.begin() + 1, heads.end()), {L}), kAblationAbs, 0);
  compare(what, "causal_drop_ffn", s.causal_drop_ffn,
          as_array(std::vector<double>(ffn.begin() + 1, ffn.end()), {L}), kAblationAbs, 0);
  // The share is docs/metrics.md section 5's normalisation of the reference's drops.
  double total = 0;
  for (double d : both) total += std::max(0.0, d);
  for (size_t i = 0; i <= L; ++i)
    EXPECT_NEAR(s.causal_layer_share.data[i], total > 0 ? std::max(0.0, both[i]) / total : 0.0,
                1e-3)
        << what << ": causal_layer_share[" << i << "]";
}

TEST(ReferenceCausal, LayerDropsOfRandomModelMatchReference) {
  TempDir tmp;
  const std::string dir = tmp.path("random");
  Shape sh;
  sh.layers = 4;
  sh.mlp_only = {2};  // a dense layer among MoE layers
  const ModelConfig cfg = make_config(sh);
  synthesize(cfg, dir, false, 11);
  const IntArray tokens = make_probes("random:5:12:4", cfg.vocab_size);
  const Analysis s = run_sinkscope(dir, tokens, 2, "", true);
  compare_causal("random", s, ReferenceModel(dir), tokens);
}

TEST(ReferenceCausal, PlantedCircuitLivesInTheEmbeddingAndLayersZeroAndOne) {
  TempDir tmp;
  const std::string dir = tmp.path("planted");
  Shape sh;
  sh.layers = 4;
  const ModelConfig cfg = make_config(sh);
  const PlantedCircuit pc = synthesize(cfg, dir, true, 7);
  const IntArray tokens = planted_probes(cfg, pc, 5, 16, 99);
  const Analysis s = run_sinkscope(dir, tokens, 2, "", true);
  compare_causal("planted", s, ReferenceModel(dir), tokens);
  // Head A (layer 0) and the expert (layer 1) build the sink of layer 2; ablating layer 2 or 3
  // at position 0 cannot reach it. The causal share of layers 0-1 is therefore most of it.
  EXPECT_GT(s.causal_drop.data[1 + pc.head_layer], 0.1f);
  EXPECT_GT(s.causal_drop.data[1 + pc.expert_layer], 0.1f);
  EXPECT_NEAR(s.causal_drop.data[1 + 3], 0.f, 1e-3f);
  EXPECT_GT(s.causal_first2_share, 0.5f);
  std::printf(
      "planted: causal_drop emb %.4f, layers %.4f %.4f %.4f %.4f; causal_first2_share %.3f\n",
      s.causal_drop.data[0], s.causal_drop.data[1], s.causal_drop.data[2], s.causal_drop.data[3],
      s.causal_drop.data[4], s.causal_first2_share);
}

// --ablate search recovers both blocks of the planted circuit, which top=K misses (its first
// stage, head A, has almost no direct attribution).
TEST(ReferencePlanted, SearchFindsBothBlocks) {
  TempDir tmp;
  const std::string dir = tmp.path("planted");
  Shape sh;
  sh.layers = 4;
  const ModelConfig cfg = make_config(sh);
  const PlantedCircuit pc = synthesize(cfg, dir, true, 7);
  const IntArray tokens = planted_probes(cfg, pc, 5, 16, 99);
  auto chosen = [&](const Analysis& a, int64_t count, int32_t layer, int32_t kind, int32_t index) {
    for (int64_t k = 0; k < count; ++k)
      if (a.ablation_components.at(k, 0) == layer && a.ablation_components.at(k, 1) == kind &&
          a.ablation_components.at(k, 2) == index)
        return true;
    return false;
  };
  const Analysis top = run_sinkscope(dir, tokens, 2, "top=2");
  EXPECT_FALSE(
      chosen(top, 2, static_cast<int32_t>(pc.head_layer), 0, static_cast<int32_t>(pc.head)))
      << "top=2 now finds head A: the search's reason to exist has gone, update docs/metrics.md";

  const Analysis s = run_sinkscope(dir, tokens, 2, "search");
  ASSERT_FALSE(s.search_effect.empty());
  const int64_t selected = s.search_selected;
  ASSERT_GT(selected, 0);
  EXPECT_TRUE(
      chosen(s, selected, static_cast<int32_t>(pc.head_layer), 0, static_cast<int32_t>(pc.head)))
      << "head A is not in the selected set";
  EXPECT_TRUE(chosen(s, selected, static_cast<int32_t>(pc.expert_layer), 1,
                     static_cast<int32_t>(pc.expert)))
      << "the planted expert is not in the selected set";
  // Ranked by causal effect, and nothing outside the circuit (and the embedding, which carries
  // the BOS feature) is selected.
  for (size_t k = 1; k < s.search_effect.size(); ++k)
    EXPECT_GE(s.search_effect.data[k - 1], s.search_effect.data[k]);
  EXPECT_LE(selected, 3);
  // The effects agree with the reference's reruns of each component.
  const ReferenceModel ref(dir);
  for (int64_t k = 0; k < selected; ++k) {
    Component c{s.ablation_components.at(k, 0), s.ablation_components.at(k, 1),
                s.ablation_components.at(k, 2)};
    const std::vector<double> delta = ref.ablation_delta(tokens, c);
    for (size_t i = 0; i < delta.size(); ++i)
      EXPECT_NEAR(s.ablation_delta_sink.data[k * delta.size() + i], delta[i], kAblationAbs);
  }
  std::printf("planted: search selected %lld of %zu components (share %.2f)\n",
              static_cast<long long>(selected), s.search_effect.size(), s.search_share);
}

}  // namespace
}  // namespace sinkscope
