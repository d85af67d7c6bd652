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

#include "sinkscope/sweep.hpp"

// Contract 1.2 outcomes on constructed profiles.
TEST(Convergence12, ConstructedOutcomes) {
  ConvergenceInput in;
  in.profiles = {{1, 0, 0}, {0.5f, 0.5f, 0}, {0, 1, 0}, {0, 0.98f, 0.02f}, {0, 0.97f, 0.03f}};
  in.steps = {0, 128, 256, 512, 1024};
  in.has_sink = {false, true, true, true, true};
  in.noise_floor = {0, 0, 0, 0, 0};
  in.tau = 0.05;
  ConvergenceResult r = assess_convergence(in);
  // Gaps in doublings of step + 1: log2(129), then about 1 each.
  EXPECT_NEAR(r.distance_per_doubling[0], 0.5 / std::log2(129.0), 1e-6);
  EXPECT_EQ(r.still, (std::vector<int32_t>{0, 0, 1, 1}));
  EXPECT_EQ(r.outcome, "converged at step 256");
  EXPECT_EQ(r.step, 256);

  // A noise floor above the late distances' threshold does not change that; one above the big
  // change hides it: nothing is seen to move, so nothing converged.
  in.noise_floor = {0.6, 0.6, 0.6, 0.6, 0.6};
  r = assess_convergence(in);
  EXPECT_EQ(r.outcome, "not converged");

  // Only one still pair at the end: not converged (the shipped trace's 1.0 "converged at 1024").
  in.noise_floor.assign(5, 0);
  in.profiles[3] = {0, 0.5f, 0.5f};
  in.profiles[4] = {0, 0.48f, 0.52f};
  r = assess_convergence(in);
  EXPECT_EQ(r.still, (std::vector<int32_t>{0, 0, 0, 1}));
  EXPECT_EQ(r.outcome, "not converged");

  // No sink at the last checkpoint.
  in.has_sink.back() = false;
  EXPECT_EQ(assess_convergence(in).outcome, "no sink");
  // Three checkpoints cannot show a change and then two still pairs.
  in.profiles.resize(3);
  in.steps.resize(3);
  in.has_sink = {true, true, true};
  in.noise_floor.resize(3);
  EXPECT_EQ(assess_convergence(in).outcome, "too few checkpoints");

  // The sink must exist at every checkpoint from S on: a still tail without a sink at its start
  // begins where the sink does.
  in.profiles = {{1, 0}, {0, 1}, {0, 1}, {0, 1}, {0, 1}};
  in.steps = {1, 2, 4, 8, 16};
  in.has_sink = {true, true, false, true, true};
  in.noise_floor.assign(5, 0);
  r = assess_convergence(in);
  EXPECT_EQ(r.outcome, "not converged");  // from step 8: one still pair only
  in.has_sink = {true, true, true, true, true};
  EXPECT_EQ(assess_convergence(in).outcome, "converged at step 2");
  // Unequal gaps: the same TV over a short gap is a faster change. 0.04 between steps 1000 and
  // 1100 is 0.29 per doubling, above tau.
  in.profiles = {{1, 0}, {0, 1}, {0, 1}, {0.04f, 0.96f}, {0.04f, 0.96f}};
  in.steps = {100, 200, 1000, 1100, 2200};
  r = assess_convergence(in);
  EXPECT_EQ(r.still, (std::vector<int32_t>{0, 1, 0, 1}));
  EXPECT_EQ(r.outcome, "not converged");
}
