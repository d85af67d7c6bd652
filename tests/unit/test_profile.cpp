// Profile and convergence (docs/metrics.md sections 5 and 6) on constructed inputs.
#include <gtest/gtest.h>

#include <cmath>

#include "sinkscope/recorder.hpp"

using namespace sinkscope;

TEST(Convergence, ConstructedSeries) {
  std::vector<std::vector<float>> shares = {
      {1, 0, 0}, {0.5f, 0.5f, 0}, {0, 1, 0}, {0, 0.98f, 0.02f}, {0, 0.97f, 0.03f}};
  std::vector<int64_t> steps = {0, 128, 256, 512, 1024};
  std::vector<float> tv;
  int64_t step = 0;
  convergence(shares, steps, 0.05, &tv, &step);
  ASSERT_EQ(tv.size(), 4u);
  EXPECT_FLOAT_EQ(tv[0], 0.5f);
  EXPECT_FLOAT_EQ(tv[1], 0.5f);
  EXPECT_NEAR(tv[2], 0.02, 1e-6);
  EXPECT_NEAR(tv[3], 0.01, 1e-6);
  EXPECT_EQ(step, 256);         // after step 256 every tv is small
  shares.push_back({1, 0, 0});  // a late jump: not converged
  steps.push_back(2048);
  convergence(shares, steps, 0.05, &tv, &step);
  EXPECT_EQ(step, -1);
  convergence({{1, 0}}, {0}, 0.05, &tv, &step);
  EXPECT_TRUE(tv.empty());
  EXPECT_EQ(step, -1);
}

TEST(Profile, LayerShareFromConstructedAttributions) {
  const size_t L = 3, H = 2, E = 2;
  Analysis a;
  a.sink_score = FloatArray({L, H}, "layer,head");
  a.attr_embed = FloatArray({L, H}, "");
  a.attr_head = FloatArray({L, H, L, H}, "");
  a.attr_expert = FloatArray({L, H, L, E}, "");
  a.attr_mlp = FloatArray({L, H, L}, "");
  a.h_ratio = FloatArray({L + 1}, "");
  a.h_ratio.data = {1, 1, 4, 8};
  a.sink_score.at(2, 0) = 0.5f;  // the only sinking head
  a.sink_score.at(1, 1) = 0.25f;
  a.attr_expert.at(2, 0, 1, 1) = 2.f;  // layer 1 expert -> head 2.0
  a.attr_head.at(2, 0, 0, 1) = 1.f;    // layer 0 head -> head 2.0
  a.attr_head.at(2, 0, 0, 0) = -5.f;   // negative: ignored
  a.attr_embed.at(1, 1) = 4.f;         // embedding -> head 1.1
  a.attr_head.at(2, 1, 0, 0) = 100.f;  // head 2.1 does not sink: weight 0
  compute_profile(a);
  // weights: emb 0.25*4 = 1; layer0 0.5*1 = 0.5; layer1 0.5*2 = 1; total 2.5
  EXPECT_NEAR(a.layer_share.data[0], 0.4, 1e-6);
  EXPECT_NEAR(a.layer_share.data[1], 0.2, 1e-6);
  EXPECT_NEAR(a.layer_share.data[2], 0.4, 1e-6);
  EXPECT_NEAR(a.layer_share.data[3], 0.0, 1e-6);
  EXPECT_NEAR(a.first2_share, 0.6, 1e-6);
  EXPECT_EQ(a.peak_layer, 1);
  EXPECT_NEAR(a.entropy, -(0.4 * std::log(0.4) * 2 + 0.2 * std::log(0.2)), 1e-5);
  // norm gains: log1 - log1 = 0, log4, log2 -> shares 0, 2/3, 1/3
  EXPECT_NEAR(a.norm_gain_share.data[0], 0, 1e-6);
  EXPECT_NEAR(a.norm_gain_share.data[1], 2.0 / 3, 1e-6);
  EXPECT_NEAR(a.norm_gain_share.data[2], 1.0 / 3, 1e-6);
}
