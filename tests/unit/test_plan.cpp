// The planner's cost model (docs/planner.md): FLOPs by hand, parameters per rank from slice sizes
// computed here independently of the family table, time and fit decisions.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <tuple>

#include "cpu/weights.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/plan.hpp"
#include "sinkscope/shard_plan.hpp"

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

// The tiny model, 8 probes of 9 tokens, on one node of `ranks` ranks.
PlanRequest tiny_request(int ranks) {
  PlanRequest r;
  r.cfg = tiny();
  r.probes = 8;
  r.seq_len = 9;
  r.ranks_per_node = ranks;
  r.nodes = 1;
  return r;
}

TEST(PlanCostModel, MemoryAndTimeOfALayout) {
  PlanRequest r = tiny_request(4);
  r.batch = 2;
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
  // Products, attention, and the shard (fp32) streamed from memory once per micro-batch (4).
  EXPECT_NEAR(one.weights_s, 4 * held_by_hand(1, 1, 1) * 4.0 / (k.mem_gbps * 1e9), 1e-15);
  EXPECT_NEAR(one.forward_s,
              tokens * (f.total() - f.attention) / 2e9 + tokens * f.attention / 1e9 + one.weights_s,
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
  PlanRequest r = tiny_request(4);
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
  // The collectives' keys; a zero rate or a word is refused by name, a zero latency is not.
  const PlanCoefficients c = coefficients_from({{"SINKSCOPE_PLAN_A2A_GBPS", "2.5"},
                                                {"SINKSCOPE_PLAN_INTRA_LATENCY_US", "0"},
                                                {"SINKSCOPE_PLAN_CORES", "6"}},
                                               "cpu");
  EXPECT_DOUBLE_EQ(c.a2a_gbps, 2.5);
  EXPECT_DOUBLE_EQ(c.intra_latency_us, 0.0);
  EXPECT_DOUBLE_EQ(c.cores, 6.0);
  for (const char* bad : {"SINKSCOPE_PLAN_INTRA_GBPS", "SINKSCOPE_PLAN_GEMM_GFLOPS"}) {
    try {
      coefficients_from({{bad, "0"}}, "cpu");
      ADD_FAILURE() << bad << "=0 accepted";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(std::string(bad) + "=0: a rate must be positive"),
                std::string::npos)
          << e.what();
    }
  }
  EXPECT_THROW(coefficients_from({{"SINKSCOPE_PLAN_CORES", "many"}}, "cpu"), InputError);
}

namespace {
// DeepSeek-V3 shape: 3 layers (the first dense, width 36), hidden 40, 4 heads of multi-head latent
// attention (q rank 24, kv rank 20, nope 8 + rope 4, v 6), 8 routed experts top-2 of width 12 in
// 4 groups, one shared expert, vocab 64; FP8 projections (128 x 128 blocks) when asked.
ModelConfig tiny_deepseek(bool fp8) {
  return parse_model_config_text(
      std::string(R"({"model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 40,
    "intermediate_size": 36, "moe_intermediate_size": 12, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "q_lora_rank": 24, "kv_lora_rank": 20, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4, "v_head_dim": 6, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "torch_dtype": "bfloat16")") +
          (fp8 ? R"(, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
    "weight_block_size": [128, 128]}})"
               : "}"),
      "tiny_deepseek");
}

// gpt-oss shape (the gpt_oss_mxfp4 fixture's): 3 layers sliding / full / sliding with a window of
// 8, hidden 64, 4 query / 2 KV heads of 16 with biases and sinks, 4 experts top-2 of width 32 with
// biases, vocab 128, MXFP4 experts.
ModelConfig tiny_gpt_oss() {
  return parse_model_config_text(R"({"model_type": "gpt_oss", "vocab_size": 128,
    "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
    "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention",
    "sliding_attention"], "rope_theta": 150000.0, "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"}})",
                                 "tiny_gpt_oss");
}

// Keys a query attends to, averaged over the T queries, by counting.
double keys_by_counting(int64_t window, int64_t T) {
  double sum = 0;
  for (int64_t i = 0; i < T; ++i)
    sum += static_cast<double>(window > 0 ? std::min(i + 1, window) : i + 1);
  return sum / static_cast<double>(T);
}

// GEMM and attention seconds of a layout at 1 GFLOP/s each are its FLOPs per rank / 1e9.
LayoutPlan unit_rates(const ModelConfig& c, int world, int tp, int ep, int64_t probes, int64_t T) {
  PlanRequest r;
  r.cfg = c;
  r.probes = probes;
  r.seq_len = T;
  r.batch = probes;
  r.ranks_per_node = world;
  r.nodes = 1;
  r.node_mem_gib = 1e6;
  PlanCoefficients k = default_coefficients("cpu");
  k.gemm_gflops = 1;
  k.gemm_half_m = 0;
  k.attention_gflops = 1;
  k.elementwise_ns = 0;
  return predict_layout(r, k, world, tp, ep);
}
}  // namespace

TEST(PlanCostModel, MeanKeysOfASlidingWindowByCounting) {
  for (int64_t T : {1, 2, 7, 8, 9, 32, 4096})
    for (int64_t W : {0, 1, 8, 128})
      EXPECT_NEAR(mean_keys(W, T), keys_by_counting(W, T), 1e-12) << "T " << T << " W " << W;
}

TEST(PlanCostModel, DeepseekV3FlopsByHand) {
  const ModelConfig c = tiny_deepseek(false);
  const ForwardFlops f = forward_flops(c, 9);
  // Per layer: q_a 2*40*24, kv_a 2*40*(20+4), per head q_b 2*24*(8+4), kv_b 2*20*(8+6),
  // o 2*6*40; attention 2*4*((8+4) + 6) keys, (9+1)/2 keys per query.
  const double proj =
      2.0 * 40 * 24 + 2.0 * 40 * 24 + 4 * (2.0 * 24 * 12 + 2.0 * 20 * 14 + 2.0 * 6 * 40);
  EXPECT_DOUBLE_EQ(f.projections, 3 * proj);
  EXPECT_DOUBLE_EQ(f.attention, 3 * 2.0 * 4 * 18 * 5);
  // Layer 0 dense (SwiGLU of 36); layers 1-2: router 2*40*8, 2 experts 3*2*40*12, one ungated
  // shared expert of width 12.
  EXPECT_DOUBLE_EQ(f.dense_mlp, 3 * 2.0 * 40 * 36);
  EXPECT_DOUBLE_EQ(f.router, 2 * 2.0 * 40 * 8);
  EXPECT_DOUBLE_EQ(f.experts, 2 * 2 * 3 * 2.0 * 40 * 12);
  EXPECT_DOUBLE_EQ(f.shared_experts, 2 * 3 * 2.0 * 40 * 12);
}

// A DeepSeek-V3 rank's slices by hand: replicated norms, latent down-projections and their norms,
// its heads' rows of q_b and kv_b and columns of o, the dense MLP, router and score bias, its
// experts' slice of the width, the shared expert whole.
int64_t deepseek_held_by_hand(int tp, int ep, int etp) {
  const int64_t D = 40, H = 4, Hl = H / tp;
  const int64_t attention =
      2 * D + 24 * D + 24 + Hl * 12 * 24 + 24 * D + 20 + Hl * 14 * 20 + D * Hl * 6;
  const int64_t dense = 3 * 36 * D, router = 8 * D + 8, shared = 3 * 12 * D;
  const int64_t experts = (8 / ep) * 3 * (12 / etp) * D;
  return 3 * attention + dense + 2 * (router + experts + shared) + D;
}

TEST(PlanCostModel, DeepseekV3ParametersPerRankAreTheSumOfSliceSizes) {
  const ModelConfig c = tiny_deepseek(true);
  for (auto [tp, ep, etp] :
       {std::tuple{1, 1, 1}, {2, 1, 1}, {2, 2, 1}, {2, 2, 2}, {4, 2, 1}, {4, 4, 1}}) {
    const ShardParams s = shard_params(c, tp, ep, etp);
    EXPECT_EQ(s.held, deepseek_held_by_hand(tp, ep, etp))
        << "tp " << tp << " ep " << ep << " etp " << etp;
    // FP8: every projection 1 byte + a float32 scale per 128 x 128 block; norms, router and its
    // bias bf16.
    const int64_t D = 40, Hl = 4 / tp;
    const int64_t wide = 3 * (2 * D + 24 + 20) + 2 * (8 * D + 8) + D;
    const double bytes = static_cast<double>(wide) * 2 +
                         static_cast<double>(s.held - wide) * (1 + 4.0 / (128 * 128));
    EXPECT_NEAR(s.held_stored_bytes, bytes, 1e-9 * bytes) << "tp " << tp << " Hl " << Hl;
  }
  EXPECT_EQ(shard_params(c, 1, 1, 1).total_model, deepseek_held_by_hand(1, 1, 1) + 2 * 64 * 40);
  // Without quantization_config every parameter is 2 bytes.
  EXPECT_DOUBLE_EQ(shard_params(tiny_deepseek(false), 2, 2, 1).held_stored_bytes,
                   2.0 * static_cast<double>(deepseek_held_by_hand(2, 2, 1)));
}

TEST(PlanCostModel, DeepseekV3FlopsPerRank) {
  const ModelConfig c = tiny_deepseek(false);
  // 4 ranks, tp 2 ep 2: dp 2, etp 2 (the CPU default); 8 probes of 9 tokens.
  const LayoutPlan l = unit_rates(c, 4, 2, 2, 8, 9);
  ASSERT_EQ(l.dp, 2);
  ASSERT_EQ(l.etp, 2);
  const double dp_tokens = 4 * 9, all_tokens = 8 * 9;
  // Each rank: the latent down-projections whole and its 2 heads' up-projections and o over its
  // dp group's tokens; its quarter of every routed pair; the router, shared expert and the dense
  // MLP over its half of the dp group's tokens.
  const double proj =
      3 * (2.0 * 40 * 24 + 2.0 * 40 * 24 + 2 * (2.0 * 24 * 12 + 2.0 * 20 * 14 + 2.0 * 6 * 40));
  const double routed = 2 * 2 * 3 * 2.0 * 40 * 12;
  const double mlp = 3 * 2.0 * 40 * 36 + 2 * (2.0 * 40 * 8 + 3 * 2.0 * 40 * 12);
  EXPECT_NEAR(l.gemm_s * 1e9, dp_tokens * proj + all_tokens / 4 * routed + dp_tokens / 2 * mlp,
              1e-3);
  EXPECT_NEAR(l.attention_s * 1e9, dp_tokens * 3 * 2.0 * 2 * 18 * 5, 1e-6);
}

TEST(PlanCostModel, GptOssFlopsByHand) {
  const ModelConfig c = tiny_gpt_oss();
  const int64_t T = 32;
  const ForwardFlops f = forward_flops(c, T);
  EXPECT_DOUBLE_EQ(f.projections, 3 * 2.0 * 64 * (2 * 4 * 16 + 2 * 2 * 16));
  // Sliding layers 0 and 2 see at most 8 keys; layer 1 every earlier one.
  EXPECT_NEAR(f.attention, 4.0 * 4 * 16 * (2 * keys_by_counting(8, T) + keys_by_counting(0, T)),
              1e-9);
  EXPECT_DOUBLE_EQ(f.router, 3 * 2.0 * 64 * 4);
  EXPECT_DOUBLE_EQ(f.experts, 3 * 2 * 3 * 2.0 * 64 * 32);
  EXPECT_DOUBLE_EQ(f.shared_experts, 0.0);
  EXPECT_DOUBLE_EQ(f.dense_mlp, 0.0);
  // Probes within the window: every layer is causal.
  EXPECT_DOUBLE_EQ(forward_flops(c, 8).attention, 3 * 4.0 * 4 * 16 * 4.5);
}

// A gpt-oss rank's slices by hand: norms, its heads' q (and bias) and o columns, its KV heads'
// k/v (and biases), its heads' sinks, o's bias and the router with its bias replicated, its
// experts' gate_up [D, 2I] and down [I, D] slices with their biases.
int64_t gpt_oss_held_by_hand(int tp, int ep, int etp) {
  const int64_t D = 64, d = 16, I = 32, Hl = 4 / tp, KVl = tp <= 2 ? 2 / tp : 1, El = 4 / ep;
  const int64_t attention = 2 * D + Hl * d * (D + 1) + 2 * KVl * d * (D + 1) + D * Hl * d + D + Hl;
  const int64_t router = 4 * D + 4;
  const int64_t experts = El * (D * 2 * I / etp + 2 * I / etp + I / etp * D + D);
  return 3 * (attention + router + experts) + D;
}

TEST(PlanCostModel, GptOssParametersPerRankAreTheSumOfSliceSizes) {
  const ModelConfig c = tiny_gpt_oss();
  for (auto [tp, ep, etp] :
       {std::tuple{1, 1, 1}, {2, 1, 1}, {2, 2, 1}, {2, 2, 2}, {4, 2, 1}, {4, 4, 1}}) {
    const ShardParams s = shard_params(c, tp, ep, etp);
    EXPECT_EQ(s.held, gpt_oss_held_by_hand(tp, ep, etp))
        << "tp " << tp << " ep " << ep << " etp " << etp;
    // MXFP4: gate_up and down 17 bytes per 32 weights (e2m1 pairs and one e8m0 scale); the rest
    // bf16.
    const int64_t packed = 3 * (4 / ep) * (64 * 64 + 32 * 64) / etp;
    EXPECT_DOUBLE_EQ(s.held_stored_bytes, static_cast<double>(packed) * 17 / 32 +
                                              2.0 * static_cast<double>(s.held - packed));
  }
  EXPECT_EQ(shard_params(c, 1, 1, 1).total_model, gpt_oss_held_by_hand(1, 1, 1) + 2 * 128 * 64);
}

TEST(PlanCostModel, GptOssFlopsPerRank) {
  const ModelConfig c = tiny_gpt_oss();
  // 2 ranks, tp 2 ep 2 (etp 1): one dp group; each rank its 2 query heads and KV head.
  const LayoutPlan l = unit_rates(c, 2, 2, 2, 4, 32);
  ASSERT_EQ(l.dp, 1);
  const double tokens = 4 * 32;
  const double proj = 3 * 2.0 * 64 * (2 * 2 * 16 + 2 * 1 * 16);
  const double routed = 3 * 2 * 3 * 2.0 * 64 * 32, router = 3 * 2.0 * 64 * 4;
  EXPECT_NEAR(l.gemm_s * 1e9, tokens * proj + tokens / 2 * routed + tokens / 2 * router, 1e-3);
  EXPECT_NEAR(l.attention_s * 1e9,
              tokens * 4.0 * 2 * 16 * (2 * keys_by_counting(8, 32) + keys_by_counting(0, 32)),
              1e-6);
}

// The stored bytes of a rank's shard are what the CPU loader reads for that rank (its planned
// reads of the checkpoint): MXFP4 blocks and scales, FP8 weights (the loader does not count their
// block scales, a 1/4096 part), bf16 / f32 tensors.
TEST(PlanCostModel, StoredBytesAreWhatTheCpuLoaderReads) {
  for (const char* fixture : {"gpt_oss_mxfp4", "deepseek_v3_fp8", "qwen3_moe_fused"}) {
    const std::string dir =
        std::string(SINKSCOPE_TEST_SOURCE_DIR) + "/tests/golden/families/" + fixture;
    ASSERT_TRUE(std::filesystem::exists(dir + "/model.safetensors")) << dir;
    const Checkpoint ck = Checkpoint::open(dir);
    const ModelConfig& c = ck.config();
    for (auto [tp, ep] : {std::pair{1, 1}, {2, 1}, {2, 2}, {1, 2}}) {
      if (c.num_heads % tp != 0 || c.num_experts % ep != 0) continue;
      const ShardPlan plan = ShardPlan::make(tp * ep, 0, tp, ep, c, 1);
      const double read = static_cast<double>(planned_load_bytes(ck, plan, false));
      EXPECT_NEAR(shard_params(c, tp, ep, 1).held_stored_bytes, read, 1e-3 * read)
          << fixture << " tp " << tp << " ep " << ep;
    }
  }
}

// The exchange of the tiny model on 2 ranks (tp 2, ep 1: etp 2, so the expert group is both
// ranks) by hand: per layer and micro-batch an fp32 all-reduce of the attention output with the
// heads' position-0 vectors, one of the MLP block's output with the slots' sums and routing
// counts, and the all-to-all of the routed pairs out and back; each collective 2 (n - 1) steps of
// latency, the all-reduce moving 2 (n - 1) / n of its bytes, the all-to-all (n - 1) / n.
TEST(PlanCostModel, ExchangeIsLatencyPerStepPlusBytesOverBandwidth) {
  PlanRequest r = tiny_request(2);
  r.batch = 2;
  r.node_mem_gib = 100;
  PlanCoefficients k = default_coefficients("cpu");
  k.intra_gbps = 1;
  k.intra_latency_us = 1;
  k.a2a_gbps = 2;
  k.a2a_latency_us = 3;
  const LayoutPlan l = predict_layout(r, k, 2, 2, 1);
  ASSERT_EQ(l.etp, 2);
  const double micro = 4, tokens = 8 * 9, D = 16, H = 4, E = 4;
  const double attention = 4 * (tokens * D + 8 * H * 2 * D);
  const double mlp = 4 * (tokens * D + 8 * (2 * E * D + E + E) + micro * E);
  const double pairs = 2 * tokens / 2 * 2 * 2 * 4 * (D + 1);  // out and back, top-2, etp 2
  const double per_layer = (attention + mlp) / 1e9 + 2 * micro * 2 * 1e-6 +  // ring of 2
                           pairs / 2 / 2e9 + 2 * micro * 2 * 3e-6;           // all-to-all
  EXPECT_NEAR(l.exchange_s, 2 * per_layer, 1e-12);
  // The same group across nodes (one rank per node) runs at the across-node rates.
  r.ranks_per_node = 1;
  r.nodes = 2;
  k.inter_gbps = 0.5;
  k.inter_latency_us = 10;
  const LayoutPlan across = predict_layout(r, k, 2, 2, 1);
  EXPECT_NEAR(across.exchange_s,
              2 * ((attention + mlp + pairs / 2) / 0.5e9 + (2 * micro * 2 + 2 * micro * 2) * 10e-6),
              1e-12);
}

TEST(PlanCostModel, OversubscribedRanksShareTheCores) {
  PlanRequest r = tiny_request(4);
  r.node_mem_gib = 100;
  r.threads = 2;
  PlanCoefficients k = default_coefficients("cpu");
  k.elementwise_ns = 10;
  k.cores = 8;  // 4 ranks x 2 threads: every rank has its cores
  const LayoutPlan fits = predict_layout(r, k, 4, 1, 1);
  EXPECT_DOUBLE_EQ(fits.cpu_share, 1.0);
  k.cores = 2;  // a quarter of what they ask for
  const LayoutPlan shared = predict_layout(r, k, 4, 1, 1);
  EXPECT_DOUBLE_EQ(shared.cpu_share, 0.25);
  EXPECT_NEAR(shared.gemm_s, 4 * fits.gemm_s, 1e-15);
  EXPECT_NEAR(shared.attention_s, 4 * fits.attention_s, 1e-15);
  EXPECT_NEAR(shared.elementwise_s, 4 * fits.elementwise_s, 1e-15);
  EXPECT_NEAR(shared.weights_s, 4 * fits.weights_s, 1e-15);
  EXPECT_GT(fits.weights_s, 0.0);
  // One rank of the same node asks for 2 threads of the 2 cores.
  EXPECT_DOUBLE_EQ(predict_layout(r, k, 1, 1, 1).cpu_share, 1.0);
  // CUDA ranks are not limited by the host's cores.
  r.device = "cuda";
  EXPECT_DOUBLE_EQ(predict_layout(r, k, 4, 1, 1).cpu_share, 1.0);
}
