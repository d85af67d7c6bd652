#include <gtest/gtest.h>

#include "sinkscope/config.hpp"
#include "sinkscope/error.hpp"

using namespace sinkscope;

namespace {
const char* kBase =
    R"({"model_type":"qwen3_moe","vocab_size":100,"hidden_size":64,"num_hidden_layers":4,
  "num_attention_heads":4,"num_key_value_heads":2,"moe_intermediate_size":32,"intermediate_size":96,
  "num_experts":8,"num_experts_per_tok":2,"rms_norm_eps":1e-6%s})";
std::string with(const std::string& extra) {
  char buf[1024];
  std::snprintf(buf, sizeof(buf), kBase, extra.c_str());
  return buf;
}
void expect_error(const std::string& json, const std::string& fragment) {
  try {
    parse_model_config_text(json, "config.json");
    FAIL() << "accepted: " << json;
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find("config.json"), 0u) << "the message names the file";
  }
}
}  // namespace

TEST(Config, DefaultsAndAbsentHeadDim) {
  const ModelConfig c = parse_model_config_text(with(""), "c");
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);
  EXPECT_TRUE(c.norm_topk_prob);
  for (int l = 0; l < 4; ++l) EXPECT_TRUE(c.is_moe_layer(l));
}

TEST(Config, KeyVariants) {
  ModelConfig a = parse_model_config_text(with(R"(,"rope_theta":1000000.0,"head_dim":32)"), "c");
  EXPECT_DOUBLE_EQ(a.rope.theta, 1e6);
  EXPECT_EQ(a.head_dim, 32);
  ModelConfig b = parse_model_config_text(
      with(R"(,"rope_parameters":{"rope_type":"default","rope_theta":5e5})"), "c");
  EXPECT_DOUBLE_EQ(b.rope.theta, 5e5);
  std::string local = with("");
  local.replace(local.find("\"num_experts\""), 13, "\"num_local_experts\"");
  EXPECT_EQ(parse_model_config_text(local, "c").num_experts, 8);
  ModelConfig d = parse_model_config_text(with(R"(,"torch_dtype":"bfloat16")"), "c");
  EXPECT_EQ(d.dtype, "bfloat16");
  ModelConfig e = parse_model_config_text(with(R"(,"dtype":"float32")"), "c");
  EXPECT_EQ(e.dtype, "float32");
}

TEST(Config, SparseStepAndMlpOnlyLayers) {
  const ModelConfig c =
      parse_model_config_text(with(R"(,"decoder_sparse_step":2,"mlp_only_layers":[3])"), "c");
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_FALSE(c.is_moe_layer(2));
  EXPECT_FALSE(c.is_moe_layer(3));  // listed in mlp_only_layers
}

TEST(Config, RejectsContradictions) {
  // A repeated key: the last value wins (as in Python's json), so these override the base.
  expect_error(with(R"(,"num_experts_per_tok":9)"), "num_experts_per_tok");
  expect_error(R"({"model_type":"qwen3_moe","vocab_size":10,"hidden_size":30,"num_hidden_layers":1,
    "num_attention_heads":4,"moe_intermediate_size":8,"num_experts":2,"num_experts_per_tok":1})",
               "does not divide hidden_size");
  expect_error(with(R"(,"num_key_value_heads":3)"), "num_key_value_heads");
  expect_error(R"({"model_type":"gpt2","vocab_size":10})", "not supported");
  expect_error("{not json", "not valid JSON");
  expect_error(R"({"model_type":"qwen3_moe","hidden_size":64})", "vocab_size");
  expect_error(with(R"(,"rope_parameters":{"rope_type":"longrope","rope_theta":1e4})"), "longrope");
  // yarn (contract 1.3) needs the length it was trained at.
  expect_error(with(R"(,"rope_parameters":{"rope_type":"yarn","rope_theta":1e4,"factor":4})"),
               "original_max_position_embeddings");
}

TEST(Config, TopKAboveExpertsNamed) {
  const std::string j =
      R"({"model_type":"qwen3_moe","vocab_size":10,"hidden_size":16,"num_hidden_layers":1,
    "num_attention_heads":2,"moe_intermediate_size":8,"num_experts":2,"num_experts_per_tok":3})";
  expect_error(j, "num_experts_per_tok");
}

TEST(Config, RoundTripThroughJson) {
  ModelConfig c = parse_model_config_text(with(R"(,"mlp_only_layers":[1],"head_dim":8)"), "c");
  ModelConfig d = parse_model_config_text(model_config_to_json(c), "again");
  EXPECT_EQ(d.head_dim, 8);
  EXPECT_EQ(d.mlp_only_layers, c.mlp_only_layers);
  EXPECT_EQ(d.num_experts, c.num_experts);
  EXPECT_EQ(d.top_k, c.top_k);
}

// Rope settings are honoured or refused, never ignored (a top-level rope_theta does not hide a
// rope_parameters block), and malformed ones are refused by name.
TEST(Config, RopeSettingsHonouredOrRefused) {
  expect_error(with(R"(,"rope_theta":1e4,"rope_parameters":{"rope_type":"dynamic","factor":4})"),
               "dynamic");
  expect_error(with(R"(,"rope_scaling":"linear")"), "rope_scaling");
  expect_error(with(R"(,"rope_scaling":[1,2])"), "rope_scaling");
  expect_error(with(R"(,"rope_scaling":4)"), "rope_scaling");
  const ModelConfig lin =
      parse_model_config_text(with(R"(,"rope_scaling":{"type":"linear","factor":4})"), "c");
  EXPECT_EQ(lin.rope.kind, RopeKind::kLinear);
  const ModelConfig plain = parse_model_config_text(with(""), "c");
  const auto a = lin.rope.inv_freq(lin.head_dim), b = plain.rope.inv_freq(plain.head_dim);
  ASSERT_EQ(a.size(), b.size());
  for (size_t j = 0; j < a.size(); ++j) EXPECT_DOUBLE_EQ(a[j] * 4, b[j]);
}

// Llama-3 frequencies as transformers computes them (theta 1e4, d 16, factor 8, low 1, high 4,
// original context 16): the fastest pair kept... smoothed, the slower ones divided by 8.
TEST(Config, Llama3Frequencies) {
  const ModelConfig c = parse_model_config_text(
      R"({"model_type":"llama","vocab_size":10,"hidden_size":64,"num_hidden_layers":1,
      "num_attention_heads":4,"intermediate_size":8,"rope_parameters":{"rope_type":"llama3",
      "rope_theta":10000.0,"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
      "original_max_position_embeddings":16}})",
      "c");
  const auto f = c.rope.inv_freq(c.head_dim);
  ASSERT_EQ(f.size(), 8u);
  EXPECT_NEAR(f[0], 0.57606, 1e-5);
  EXPECT_NEAR(f[1], 0.039528, 1e-6);
  EXPECT_NEAR(f[2], 0.0125, 1e-7);
}

// Family defaults: OLMoE and Mixtral size experts with intermediate_size; GPT-NeoX rotates a
// quarter of each head and wires the residual in parallel; unknown activations are refused.
TEST(Config, FamilyDefaults) {
  const ModelConfig o = parse_model_config_text(
      R"({"model_type":"olmoe","vocab_size":10,"hidden_size":16,"num_hidden_layers":2,
      "num_attention_heads":2,"intermediate_size":8,"num_experts":4,"num_experts_per_tok":2})",
      "c");
  EXPECT_EQ(o.moe_intermediate_size, 8);
  EXPECT_FALSE(o.norm_topk_prob);
  EXPECT_EQ(o.qk_norm, QkNormKind::kFullWidth);
  const ModelConfig n = parse_model_config_text(
      R"({"model_type":"gpt_neox","vocab_size":10,"hidden_size":64,"num_hidden_layers":2,
      "num_attention_heads":4,"intermediate_size":8,"rotary_pct":0.25,"rotary_emb_base":500})",
      "c");
  EXPECT_EQ(n.block, BlockKind::kParallel);
  EXPECT_EQ(n.rope.rotary_dim, 4);
  EXPECT_DOUBLE_EQ(n.rope.theta, 500);
  EXPECT_EQ(n.norm, NormKind::kLayer);
  EXPECT_TRUE(n.qkv_bias && n.o_bias && n.mlp_bias);
  expect_error(R"({"model_type":"llama","vocab_size":10,"hidden_size":16,"num_hidden_layers":1,
      "num_attention_heads":2,"intermediate_size":8,"hidden_act":"relu2"})",
               "hidden_act");
  expect_error(R"({"model_type":"olmoe","vocab_size":10,"hidden_size":16,"num_hidden_layers":2,
      "num_attention_heads":2,"intermediate_size":8,"num_experts":4,"num_experts_per_tok":2,
      "clip_qkv":8})",
               "clip_qkv");
}

// Counts far beyond any model are refused before anything is sized by them.
TEST(Config, HugeCountsRefused) {
  expect_error(with(R"(,"num_hidden_layers":1000000000000)"), "num_hidden_layers");
  expect_error(with(R"(,"num_experts":10000000)"), "num_experts");
  expect_error(with(R"(,"head_dim":0)"), "head_dim");
  expect_error(with(R"(,"mlp_only_layers":[99])"), "mlp_only_layers");
}
