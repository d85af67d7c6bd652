// gpt-oss pieces against hand-derived values: the MXFP4 format (OCP Microscaling spec: e2m1
// values, e8m0 scales, transformers' nibble order), yarn's inverse frequencies, the window/sink
// softmax, the clamped SwiGLU and the config keys (layer_types, defaults).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "checkpoint/mxfp4.hpp"
#include "cpu/sink_kernels.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/error.hpp"

using namespace sinkscope;

TEST(Mxfp4, E2m1ValuesOfTheSpec) {
  // sign | exponent (2 bits, bias 1) | mantissa (1 bit); exponent 0 is subnormal: 0.5 * m.
  const float expected[16] = {0.f,  0.5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                              -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(e2m1_value(static_cast<uint8_t>(i)), expected[i]) << "nibble " << i;
    EXPECT_EQ(std::signbit(e2m1_value(static_cast<uint8_t>(i))), i >= 8) << "nibble " << i;
  }
}

TEST(Mxfp4, NibbleOrderAndE8m0Scale) {
  // Two blocks of one row: the first with scale 2^0, the second with 2^3 (byte 130).
  std::vector<uint8_t> blocks(32, 0), scales = {127, 130};
  blocks[0] = 0x21;   // element 0 = low nibble 0x1 (0.5), element 1 = high nibble 0x2 (1.0)
  blocks[15] = 0xF7;  // element 30 = 0x7 (6), element 31 = 0xF (-6)
  blocks[16] = 0x9B;  // block 1: element 0 = 0xB (-1.5) * 8, element 1 = 0x9 (-0.5) * 8
  std::vector<float> out(64, -99.f);
  ASSERT_EQ(decode_mxfp4(blocks.data(), scales.data(), 1, 2, out.data()), 2);
  EXPECT_EQ(out[0], 0.5f);
  EXPECT_EQ(out[1], 1.0f);
  EXPECT_EQ(out[2], 0.f);
  EXPECT_EQ(out[30], 6.f);
  EXPECT_EQ(out[31], -6.f);
  EXPECT_EQ(out[32], -12.f);
  EXPECT_EQ(out[33], -4.f);
  // The smallest and largest finite scales: 2^-127 (a float subnormal) and 2^127.
  std::vector<uint8_t> b1(16, 0x22), s1 = {0};
  std::vector<float> o1(32);
  decode_mxfp4(b1.data(), s1.data(), 1, 1, o1.data());
  EXPECT_EQ(o1[0], std::ldexp(1.f, -127));
  s1[0] = 254;
  decode_mxfp4(b1.data(), s1.data(), 1, 1, o1.data());
  EXPECT_EQ(o1[5], std::ldexp(1.f, 127));
  // 255 is e8m0's NaN: reported by index, never decoded.
  std::vector<uint8_t> s2 = {127, 255};
  EXPECT_EQ(decode_mxfp4(blocks.data(), s2.data(), 1, 2, out.data()), 1);
}

TEST(Yarn, InverseFrequenciesAndAttentionFactor) {
  // GptOssConfig's defaults: theta 150000, factor 32, beta 32 / 1, no truncation, 4096 positions,
  // head_dim 64. Correction range (by hand): low = 64 ln(4096 / (32 2 pi)) / (2 ln 150000) =
  // 8.0928, high = 64 ln(4096 / (2 pi)) / (2 ln 150000) = 17.398.
  const ModelConfig c = parse_model_config_text(
      R"({"model_type":"gpt_oss","vocab_size":10,"hidden_size":64,"num_hidden_layers":2,
          "num_attention_heads":1,"head_dim":64,"intermediate_size":32,"num_local_experts":2,
          "num_experts_per_tok":1})",
      "config.json");
  ASSERT_EQ(c.rope.kind, RopeKind::kYarn);
  EXPECT_EQ(c.rope.theta, 150000.0);
  EXPECT_NEAR(c.rope.attention_factor, 0.1 * std::log(32.0) + 1.0, 1e-12);  // 1.34657
  const std::vector<double> f = c.rope.inv_freq(64);
  ASSERT_EQ(f.size(), 32u);
  // j <= 8: below the ramp, unscaled; j >= 18: interpolated (/ 32); j = 12: ramp 0.41989.
  EXPECT_NEAR(f[0], 1.0, 1e-15);
  EXPECT_NEAR(f[8], std::pow(150000.0, -16.0 / 64), 1e-15);
  EXPECT_NEAR(f[18], std::pow(150000.0, -36.0 / 64) / 32, 1e-15);
  // The ramp is computed in float32, as transformers does: 1e-7 relative.
  EXPECT_NEAR(f[12], 0.006794959489732219, 1e-7 * 0.0068);
  // With truncation the range is [8, 18]: j = 12 sits at ramp 0.4.
  ModelConfig t = c;
  t.rope.truncate = true;
  const double p12 = std::pow(150000.0, -24.0 / 64);
  EXPECT_NEAR(t.rope.inv_freq(64)[12], p12 * 0.6 + p12 / 32 * 0.4, 1e-7 * p12);
}

TEST(GptOssConfig, LayerTypesAndDefaults) {
  const std::string base =
      R"({"model_type":"gpt_oss","vocab_size":10,"hidden_size":64,"num_hidden_layers":3,
          "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"intermediate_size":32,
          "num_local_experts":4,"num_experts_per_tok":2,"sliding_window":8)";
  // Absent layer_types: sliding, full, sliding (GptOssConfig's default).
  const ModelConfig c = parse_model_config_text(base + "}", "config.json");
  EXPECT_TRUE(c.learned_sinks && c.router_bias && c.expert_bias && c.qkv_bias && c.o_bias);
  EXPECT_EQ(c.act, Activation::kSwigluClamped);
  EXPECT_EQ(c.swiglu_limit, 7.0);
  EXPECT_EQ(c.router, RouterKind::kTopKSoftmax);
  EXPECT_EQ(c.window(0), 8);
  EXPECT_EQ(c.window(1), 0);
  EXPECT_EQ(c.window(2), 8);
  const ModelConfig full = parse_model_config_text(
      base + R"(,"layer_types":["full_attention","full_attention","sliding_attention"]})", "c");
  EXPECT_EQ(full.window(0), 0);
  EXPECT_EQ(full.window(2), 8);
  for (const char* bad : {R"(,"layer_types":["full_attention"]})",
                          R"(,"layer_types":["full_attention","local","full_attention"]})"}) {
    try {
      parse_model_config_text(base + bad, "config.json");
      FAIL() << "accepted " << bad;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("config.json: key 'layer_types'"), std::string::npos)
          << e.what();
    }
  }
  // What `synth` writes reads back the same.
  const ModelConfig back = parse_model_config_text(model_config_to_json(full), "synth");
  EXPECT_EQ(back.sliding_layers, full.sliding_layers);
  EXPECT_EQ(back.rope.inv_freq(16), full.rope.inv_freq(16));
  EXPECT_EQ(back.rope.attention_factor, full.rope.attention_factor);
}

TEST(SinkKernels, WindowAndSinkSoftmax) {
  // Query rows 2 and 3 of four keys, all scores 0; window 2: row 2 keeps keys 1-2, row 3 keys 2-3.
  std::vector<float> s(2 * 4, 0.f), mass(2);
  const float sink = std::log(2.f);  // the sink weighs as much as two keys
  cpu::window_sink_softmax_rows(s.data(), 2, 4, 2, 2, &sink, mass.data());
  const std::vector<float> want = {0, 0.25f, 0.25f, 0, 0, 0, 0.25f, 0.25f};
  for (size_t i = 0; i < s.size(); ++i) EXPECT_NEAR(s[i], want[i], 1e-7) << i;
  EXPECT_NEAR(mass[0], 0.5f, 1e-7);
  EXPECT_NEAR(mass[1], 0.5f, 1e-7);
  // The same rows with the columns starting at key 1 (the keys before the window skipped).
  std::vector<float> o(2 * 3, 0.f);
  cpu::window_sink_softmax_rows(o.data(), 2, 3, 2, 2, &sink, nullptr, 1);
  const std::vector<float> want_o = {0.25f, 0.25f, 0, 0, 0.25f, 0.25f};
  for (size_t i = 0; i < o.size(); ++i) EXPECT_NEAR(o[i], want_o[i], 1e-7) << i;
  // No window, no sink: the causal softmax.
  std::vector<float> c = {1.f, 5.f, 0.f, 0.f};
  cpu::window_sink_softmax_rows(c.data(), 1, 4, 1, 0, nullptr, nullptr);
  EXPECT_NEAR(c[0], 1 / (1 + std::exp(4.f)), 1e-7);
  EXPECT_EQ(c[2], 0.f);
}

TEST(SinkKernels, ClampedSwiglu) {
  const float g[3] = {1.f, 10.f, -2.f}, u[3] = {0.5f, 9.f, -8.f};
  float h[3];
  cpu::swiglu_clamped(g, u, h, 3, 7.f, 1.702f);
  EXPECT_NEAR(h[0], 1.5f * (1.f / (1.f + std::exp(-1.702f))), 1e-6);
  EXPECT_NEAR(h[1], 8.f * (7.f / (1.f + std::exp(-1.702f * 7.f))), 1e-5);   // both clamped at 7
  EXPECT_NEAR(h[2], -6.f * (-2.f / (1.f + std::exp(1.702f * 2.f))), 1e-6);  // up clamped at -7
}
