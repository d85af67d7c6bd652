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
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_TRUE(c.norm_topk_prob);
  for (int l = 0; l < 4; ++l) EXPECT_TRUE(c.is_moe_layer(l));
}

TEST(Config, KeyVariants) {
  ModelConfig a = parse_model_config_text(with(R"(,"rope_theta":1000000.0,"head_dim":32)"), "c");
  EXPECT_DOUBLE_EQ(a.rope_theta, 1e6);
  EXPECT_EQ(a.head_dim, 32);
  ModelConfig b = parse_model_config_text(
      with(R"(,"rope_parameters":{"rope_type":"default","rope_theta":5e5})"), "c");
  EXPECT_DOUBLE_EQ(b.rope_theta, 5e5);
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
  expect_error(R"({"model_type":"llama","vocab_size":10})", "not supported");
  expect_error("{not json", "not valid JSON");
  expect_error(R"({"model_type":"qwen3_moe","hidden_size":64})", "vocab_size");
  expect_error(with(R"(,"rope_parameters":{"rope_type":"yarn","rope_theta":1e4})"), "yarn");
}

TEST(Config, TopKAboveExpertsNamed) {
  const std::string j =
      R"({"model_type":"qwen3_moe","vocab_size":10,"hidden_size":16,"num_hidden_layers":1,
    "num_attention_heads":2,"moe_intermediate_size":8,"num_experts":2,"num_experts_per_tok":3})";
  expect_error(j, "exceeds num_experts");
}

TEST(Config, RoundTripThroughJson) {
  ModelConfig c = parse_model_config_text(with(R"(,"mlp_only_layers":[1],"head_dim":8)"), "c");
  ModelConfig d = parse_model_config_text(model_config_to_json(c), "again");
  EXPECT_EQ(d.head_dim, 8);
  EXPECT_EQ(d.mlp_only_layers, c.mlp_only_layers);
  EXPECT_EQ(d.num_experts, c.num_experts);
  EXPECT_EQ(d.top_k, c.top_k);
}
