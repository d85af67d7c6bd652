#include <gtest/gtest.h>

#include <filesystem>

#include "sinkscope/analyze.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/io.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/sweep.hpp"
#include "sinkscope/synth.hpp"
#include "test_util.hpp"

using namespace sinkscope;
namespace fs = std::filesystem;

TEST(Sweep, StepsFromFolderNames) {
  EXPECT_EQ(step_from_name("/runs/a/step1024"), 1024);
  EXPECT_EQ(step_from_name("/runs/a/step_2048/"), 2048);
  EXPECT_EQ(step_from_name("iter_0000500"), 500);
  EXPECT_EQ(step_from_name("checkpoint-77"), 77);
  EXPECT_EQ(step_from_name("final"), -1);
}

TEST(Sweep, ListsSortedByStep) {
  test::TempDir dir;
  for (const char* n : {"step512", "step0", "step64"}) fs::create_directories(dir / n);
  auto cps = list_checkpoints({}, dir / "step*", {});
  ASSERT_EQ(cps.size(), 3u);
  EXPECT_EQ(cps[0].step, 0);
  EXPECT_EQ(cps[1].step, 64);
  EXPECT_EQ(cps[2].name, "step512");
  EXPECT_THROW(list_checkpoints({}, dir / "nothing*", {}), InputError);
  EXPECT_THROW(list_checkpoints({dir / "step0"}, "", {1, 2}), InputError);
  // A folder without a step in its name is refused unless --steps gives it.
  fs::create_directories(dir / "final");
  EXPECT_THROW(list_checkpoints({dir / "step0", dir / "final"}, "", {}), InputError);
  EXPECT_EQ(list_checkpoints({dir / "step0", dir / "final"}, "", {0, 9}).back().name, "final");
  auto given = list_checkpoints({dir / "step0", dir / "step64"}, "", {10, 5});
  EXPECT_EQ(given[0].step, 5);
}

class SweepFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg = test::tiny_config();
    for (int i = 0; i < 3; ++i) {
      const std::string d = dir / ("step" + std::to_string(i * 100));
      synthesize(cfg, d, false, static_cast<uint64_t>(i + 1));
    }
    cps = list_checkpoints({}, dir / "step*", {});
    fs::create_directories(dir / "out/checkpoints");
    tokens = make_probes("random:3:8:1", cfg.vocab_size);
    auto world = make_single_comm();
    for (const auto& c : cps) {
      AnalyzeOptions o;
      o.model = c.dir;
      o.step = c.step;
      write_analysis(dir / ("out/checkpoints/" + c.name + ".h5"),
                     analyze_checkpoint(o, tokens, *world));
    }
  }
  test::TempDir dir;
  ModelConfig cfg;
  std::vector<SweepCheckpoint> cps;
  IntArray tokens;
};

TEST_F(SweepFiles, AssemblesAndValidatesFiles) {
  Sweep s = assemble_sweep(cps, dir / "out", 0.05);
  EXPECT_EQ(s.names.size(), 3u);
  EXPECT_EQ(s.steps, (std::vector<int64_t>{0, 100, 200}));
  EXPECT_EQ(s.convergence_tv.size(), 2u);
  EXPECT_TRUE(s.failed.empty());
  std::string why;
  const std::string f = dir / "out/checkpoints/step100.h5";
  EXPECT_TRUE(analysis_file_matches(f, tokens_sha256(tokens), cfg, &why)) << why;
  EXPECT_FALSE(analysis_file_matches(f, "other", cfg, &why));
  ModelConfig other = cfg;
  other.num_layers += 1;
  EXPECT_FALSE(analysis_file_matches(f, tokens_sha256(tokens), other, &why));
  // A truncated file is damaged, and assembling lists it as failed.
  const std::string bytes = test::read_file(f);
  test::write_file(f, bytes.substr(0, bytes.size() / 2));
  EXPECT_FALSE(analysis_file_matches(f, tokens_sha256(tokens), cfg, &why));
  EXPECT_NE(why.find("damaged"), std::string::npos);
  s = assemble_sweep(cps, dir / "out", 0.05);
  EXPECT_EQ(s.failed, std::vector<std::string>{"step100"});
  EXPECT_EQ(s.names.size(), 2u);
}

TEST_F(SweepFiles, RefusesMixedProbeLengths) {
  auto world = make_single_comm();
  AnalyzeOptions o;
  o.model = cps[1].dir;
  write_analysis(dir / "out/checkpoints/step100.h5",
                 analyze_checkpoint(o, make_probes("random:3:9:1", cfg.vocab_size), *world));
  try {
    assemble_sweep(cps, dir / "out", 0.05);
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("different lengths"), std::string::npos) << e.what();
  }
}

// Hub checkpoint names of the public training traces (OLMoE, OLMo-2, Pythia, DeepSpeed,
// Megatron): the step is the number after step/iter, whatever comes before or after it.
TEST(Sweep, StepsFromHubCheckpointNames) {
  EXPECT_EQ(step_from_name("/hub/OLMoE-1B-7B/step10000-tokens41B"), 10000);
  EXPECT_EQ(step_from_name("stage1-step1000-tokens5B"), 1000);
  EXPECT_EQ(step_from_name("/runs/pythia-160m/step143000/"), 143000);
  EXPECT_EQ(step_from_name("global_step500"), 500);
  EXPECT_EQ(step_from_name("iter_0001000"), 1000);
  EXPECT_EQ(step_from_name("checkpoint-250"), 250);
  EXPECT_EQ(step_from_name("final"), -1);
}
