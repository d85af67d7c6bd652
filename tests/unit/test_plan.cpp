// The planner's cost model (docs/planner.md): FLOPs by hand, parameters per rank from slice sizes
// computed here independently of the family table, time and fit decisions.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "sinkscope/config.hpp"
#include "sinkscope/plan.hpp"

using namespace sinkscope;

namespace {
// 2 layers, hidden 16, 4 heads / 2 KV of dim 8, 4 experts top-2 of width 12, vocab 32.
ModelConfig tiny() {
  return parse_model_config_text(R"({"model_type": "qwen3_moe", "vocab_size": 32,
    "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "intermediate_size": 24, "moe_intermediate_size": 12, "num_experts": 4,
    "num_experts_per_tok": 2, "norm_topk_prob": true, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0})",
                                 "tiny");
}
}  // namespace

TEST(PlanCostModel, FlopsPerTokenByHand) {
  const ForwardFlops f = forward_flops(tiny(), 9);
  // Per layer: q/k/v/o 2*16*(2*4*8 + 2*2*8) = 3072; attention 4*4*8*(9+1)/2 = 640; router
  // 2*16*4 = 128; experts 2 * 3 * 2*16*12 = 2304.
  EXPECT_DOUBLE_EQ(f.projections, 2 * 3072.0);
  EXPECT_DOUBLE_EQ(f.attention, 2 * 640.0);
  EXPECT_DOUBLE_EQ(f.router, 2 * 128.0);
  EXPECT_DOUBLE_EQ(f.experts, 2 * 2304.0);
  EXPECT_DOUBLE_EQ(f.dense_mlp, 0.0);
  EXPECT_DOUBLE_EQ(f.total(), 12288.0);
  // Attention grows with T (causal: (T + 1) / 2 keys per query on average).
  EXPECT_DOUBLE_EQ(forward_flops(tiny(), 99).attention, 2 * 4.0 * 4 * 8 * 50);
}

// The slices a rank holds, summed by hand: norms, its heads' q/o, its KV heads' k/v, the
// per-head q/k norms, the router, its experts' slice of the width.
int64_t held_by_hand(int tp, int ep, int etp) {
  const int64_t D = 16, d = 8, H = 4, KV = 2, E = 4, I = 12, L = 2;
  const int64_t Hl = H / tp, KVl = tp <= KV ? KV / tp : 1;
  const int64_t per_layer = 2 * D + Hl * d * D + 2 * KVl * d * D + D * Hl * d + 2 * d + E * D +
                            (E / ep) * 3 * (I / etp) * D;
  return L * per_layer + D;  // + final norm
}

TEST(PlanCostModel, ParametersPerRankAreTheSumOfSliceSizes) {
  const ModelConfig c = tiny();
  for (auto [tp, ep, etp] :
       {std::tuple{1, 1, 1}, {2, 1, 1}, {2, 2, 1}, {2, 2, 2}, {4, 2, 1}, {1, 4, 1}, {4, 4, 1}}) {
    const ShardParams s = shard_params(c, tp, ep, etp);
    EXPECT_EQ(s.held, held_by_hand(tp, ep, etp)) << "tp " << tp << " ep " << ep << " etp " << etp;
    EXPECT_EQ(s.embedding, 32 * 16);
  }
  // Whole model: everything of one rank plus embedding and lm_head.
  const ShardParams one = shard_params(c, 1, 1, 1);
  EXPECT_EQ(one.total_model, held_by_hand(1, 1, 1) + 2 * 32 * 16);
}

TEST(PlanCostModel, MemoryAndTimeOfALayout) {
  PlanRequest r;
  r.cfg = tiny();
  r.probes = 8;
  r.seq_len = 9;
  r.batch = 2;
  r.ranks_per_node = 4;
  r.nodes = 1;
  r.node_mem_gib = 100;
  r.ablation_passes = 3;
  PlanCoefficients k = default_coefficients("cpu");
  k.gemm_half_m = 0;  // one GEMM rate at every size
  k.gemm_gflops = 2;
  k.attention_gflops = 1;
  k.record_fraction = 0.5;
  k.startup_s = 1;
  k.load_gbps = 1e-6;  // 1 kB/s
  const LayoutPlan one = predict_layout(r, k, 1, 1, 1);
  const double GiB = 1024.0 * 1024 * 1024;
  EXPECT_DOUBLE_EQ(one.weight_gib, held_by_hand(1, 1, 1) * 4.0 / GiB);
  EXPECT_NEAR(one.host_gib, one.weight_gib * 1.5 + one.scratch_gib + k.base_mib / 1024, 1e-12);
  const ForwardFlops f = forward_flops(r.cfg, 9);
  const double tokens = 8 * 9;
  EXPECT_NEAR(one.forward_s, tokens * (f.total() - f.attention) / 2e9 + tokens * f.attention / 1e9,
              1e-15);
  EXPECT_DOUBLE_EQ(one.record_s, 0.5 * one.forward_s);
  EXPECT_DOUBLE_EQ(one.exchange_s, 0.0);
  EXPECT_DOUBLE_EQ(one.ablation_s, 3 * (one.forward_s + one.record_s));
  EXPECT_NEAR(one.load_s, held_by_hand(1, 1, 1) * 2.0 / 1e3, 1e-9);
  EXPECT_NEAR(one.checkpoint_s, 1 + one.load_s + 4 * (one.forward_s + one.record_s), 1e-12);
  // Four ranks, tp 2 ep 2: the shard is smaller, there is exchange, dp 2 halves the tokens.
  const LayoutPlan four = predict_layout(r, k, 4, 2, 2);
  EXPECT_EQ(four.dp, 2);
  EXPECT_EQ(four.etp, 2);  // the CPU default
  EXPECT_DOUBLE_EQ(four.weight_gib, held_by_hand(2, 2, 2) * 4.0 / GiB);
  EXPECT_GT(four.exchange_s, 0.0);
  EXPECT_LT(four.forward_s, one.forward_s);
}

TEST(PlanCostModel, ALayoutThatCannotFitIsReportedWithTheSmallestThatDoes) {
  PlanRequest r;
  r.cfg = tiny();
  r.probes = 8;
  r.seq_len = 9;
  r.ranks_per_node = 4;
  r.nodes = 1;
  PlanCoefficients k = default_coefficients("cpu");
  k.base_mib = 0;
  // Node memory between what 4 ranks of tp 1 need and what 4 ranks of tp 4 ep 4 need.
  const LayoutPlan full = predict_layout(r, k, 4, 1, 1), split = predict_layout(r, k, 4, 4, 4);
  ASSERT_LT(split.host_gib, full.host_gib);
  r.node_mem_gib = 4 * (split.host_gib + full.host_gib) / 2;
  const Plan p = make_plan(r, k);
  bool saw_refused = false;
  for (const auto& l : p.layouts)
    if (l.world == 4 && l.tp == 1 && l.ep == 1) {
      EXPECT_FALSE(l.fits);
      EXPECT_NE(l.why_not.find("host memory"), std::string::npos);
      saw_refused = true;
    }
  EXPECT_TRUE(saw_refused);
  ASSERT_GE(p.recommended, 0);
  EXPECT_TRUE(p.layouts[static_cast<size_t>(p.recommended)].fits);
  ASSERT_GE(p.smallest_fitting, 0);
  EXPECT_EQ(p.layouts[static_cast<size_t>(p.smallest_fitting)].world, 1);  // one rank: 1 x memory
  r.node_mem_gib = split.host_gib / 2;                                     // nothing fits
  const Plan none = make_plan(r, k);
  EXPECT_EQ(none.recommended, -1);
  EXPECT_NE(format_plan(none).find("none within 4 rank(s)"), std::string::npos);
  EXPECT_EQ(format_plan_shell(none, 2), "PLAN_FITS=0\n");
}

TEST(PlanCostModel, SiteFileCoefficientsRoundTrip) {
  const std::string path =
      (std::filesystem::temp_directory_path() / "sinkscope_plan_test.env").string();
  {
    std::ofstream out(path);
    out << "# a site\nSITE_NODES=2\nSITE_GPUS_PER_NODE=4  # per "
           "node\nSINKSCOPE_PLAN_GEMM_GFLOPS=1\n";
  }
  PlanCoefficients k = default_coefficients("cpu");
  k.gemm_gflops = 123.5;
  k.attention_gflops = 7.25;
  write_coefficients(path, k, "cpu");
  const auto kv = read_site_file(path);
  EXPECT_EQ(kv.at("SITE_NODES"), "2");
  EXPECT_EQ(kv.at("SITE_GPUS_PER_NODE"), "4");
  const PlanCoefficients back = coefficients_from(kv, "cpu");
  EXPECT_DOUBLE_EQ(back.gemm_gflops, 123.5);
  EXPECT_DOUBLE_EQ(back.attention_gflops, 7.25);
  // The CUDA keys are apart: H200 defaults stay.
  EXPECT_DOUBLE_EQ(coefficients_from(kv, "cuda").gemm_gflops,
                   default_coefficients("cuda").gemm_gflops);
  PlanRequest r;
  apply_site_defaults(kv, &r);
  EXPECT_EQ(r.nodes, 2);
  EXPECT_EQ(r.ranks_per_node, 4);
  std::filesystem::remove(path);
}
