#include <gtest/gtest.h>

#include "checkpoint/omp_threads.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/model.hpp"
#include "sinkscope/shard_plan.hpp"
#include "sinkscope/synth.hpp"
#include "test_util.hpp"

using namespace sinkscope;

TEST(ShardPlan, MegatronLayout) {
  ModelConfig c = test::tiny_config();  // 4 heads, 2 KV heads, 4 experts
  const ShardPlan p = ShardPlan::make(4, 3, 2, 2, c);
  EXPECT_EQ(p.dp, 2);
  EXPECT_EQ(p.tp_rank, 1);
  EXPECT_EQ(p.dp_rank, 1);
  EXPECT_EQ(p.head_begin, 2);
  EXPECT_EQ(p.head_end, 4);
  EXPECT_EQ(p.kv_begin, 1);
  EXPECT_EQ(p.kv_end, 2);
  EXPECT_EQ(p.ep_rank, 1);
  EXPECT_EQ(p.expert_begin, 2);
  EXPECT_EQ(p.expert_end, 4);
  EXPECT_EQ(p.expert_owner(0), 0);  // index inside the expert group (ranks 2, 3)
  EXPECT_EQ(p.expert_owner(3), 1);
  EXPECT_EQ(p.head_owner(1), 2);
}

TEST(ShardPlan, ReplicatesKvHeadsWhenTpExceedsThem) {
  ModelConfig c = test::tiny_config();
  for (int r = 0; r < 4; ++r) {
    const ShardPlan p = ShardPlan::make(4, r, 4, 1, c);
    EXPECT_EQ(p.local_heads(), 1);
    EXPECT_EQ(p.local_kv_heads(), 1);
    EXPECT_EQ(p.kv_begin, r / 2);  // heads 0,1 share KV head 0
  }
}

TEST(ShardPlan, RefusesSizesThatDoNotFit) {
  ModelConfig c = test::tiny_config();
  auto reason = [&](int world, int tp, int ep) {
    try {
      ShardPlan::make(world, 0, tp, ep, c);
    } catch (const InputError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(reason(4, 3, 1).find("does not divide the 4 ranks"), std::string::npos);
  EXPECT_NE(reason(8, 8, 1).find("attention heads"), std::string::npos);
  EXPECT_NE(reason(8, 1, 8).find("experts"), std::string::npos);
  EXPECT_NE(reason(3, 1, 2).find("does not divide the 3 ranks"), std::string::npos);
  EXPECT_EQ(reason(4, 2, 4), "");
}

TEST(ShardPlan, ExpertTensorParallel) {
  ModelConfig c = test::tiny_config();  // moe_intermediate_size 16
  // world 4 = ep 2 x etp 2: rank 3 holds experts 2-3, second half of their width.
  const ShardPlan p = ShardPlan::make(4, 3, 2, 2, c, 2);
  EXPECT_EQ(p.etp_rank, 1);
  EXPECT_EQ(p.ep_rank, 1);
  EXPECT_EQ(p.ep_group, 0);
  EXPECT_EQ(p.expert_begin, 2);
  EXPECT_EQ(p.inter_begin, 8);
  EXPECT_EQ(p.inter_end, 16);
  EXPECT_EQ(p.expert_owner(1, 1), 1);
  EXPECT_EQ(p.expert_owner(2, 0), 2);
  EXPECT_EQ(ShardPlan::make(4, 0, 2, 2, c, 0).etp, 2);  // default: etp = tp where it fits
  EXPECT_EQ(ShardPlan::make(2, 0, 2, 2, c, 0).etp, 1);
  EXPECT_THROW(ShardPlan::make(4, 0, 1, 4, c, 2), InputError);  // ep x etp = 8 > 4 ranks
  c.moe_intermediate_size = 15;
  EXPECT_THROW(ShardPlan::make(4, 0, 1, 2, c, 2), InputError);  // width not divisible
}

TEST(ShardPlan, SerialisationRoundTrip) {
  const ShardPlan p = ShardPlan::make(4, 2, 2, 4, test::tiny_config());
  const ShardPlan q = deserialize_plan(serialize_plan(p));
  EXPECT_EQ(p, q);
  EXPECT_THROW(deserialize_plan("garbage"), InputError);
  EXPECT_NE(p.describe().find("tp=2 ep=4 etp=1 dp=2"), std::string::npos);
}

TEST(ShardPlan, ProbeRangesCoverAllProbes) {
  for (int dp = 1; dp <= 5; ++dp) {
    int64_t covered = 0, prev_end = 0;
    for (int i = 0; i < dp; ++i) {
      int64_t b, e;
      ShardPlan::probe_range(7, dp, i, &b, &e);
      EXPECT_EQ(b, prev_end);
      covered += e - b;
      prev_end = e;
    }
    EXPECT_EQ(covered, 7);
  }
}

// A tp=2 ep=2 rank loads about half the attention and half the expert bytes of one rank.
TEST(ShardPlan, ShardedLoadReadsItsShare) {
  ModelConfig c = test::tiny_config(3);
  c.mlp_only_layers = {};
  test::TempDir dir;
  synthesize(c, dir.path(), false, 1);
  auto single = make_single_comm();
  ForwardComms comms{single.get(), single.get(), single.get()};
  Checkpoint full_ck = Checkpoint::open(dir.path());
  const uint64_t full =
      make_cpu_backend(full_ck, ShardPlan::make(1, 0, 1, 1, c), comms, {})->weight_bytes_loaded();
  Checkpoint part_ck = Checkpoint::open(dir.path());
  const uint64_t part =
      make_cpu_backend(part_ck, ShardPlan::make(4, 3, 2, 2, c), comms, {})->weight_bytes_loaded();
  // Replicated: norms and routers. Sharded: q/k/v/o and experts, which are almost everything.
  const double D = c.hidden_size, d = c.head_dim, L = c.num_layers;
  const double attn = L * (2 * c.num_heads * d * D + 2 * c.num_kv_heads * d * D) * 2;
  const double experts = L * c.num_experts * 3 * c.moe_intermediate_size * D * 2;
  const double replicated = static_cast<double>(full) - attn - experts;
  EXPECT_NEAR(static_cast<double>(part), replicated + attn / 2 + experts / 2, 1.0);
  EXPECT_LT(static_cast<double>(part), 0.55 * static_cast<double>(full));
  Checkpoint etp_ck = Checkpoint::open(dir.path());
  const uint64_t quarter =
      make_cpu_backend(etp_ck, ShardPlan::make(4, 3, 2, 2, c, 2), comms, {})->weight_bytes_loaded();
  EXPECT_NEAR(static_cast<double>(quarter), replicated + attn / 2 + experts / 4, 1.0);
}

// Loading uses --threads (ForwardOptions::threads) or OpenMP's thread count, whichever is more:
// the CPU backend sets the checkpoint's read threads before it loads.
TEST(ShardPlan, CpuLoadUsesTheBackendsThreads) {
  const ModelConfig c = test::tiny_config(3);
  test::TempDir dir;
  synthesize(c, dir.path(), false, 1);
  auto single = make_single_comm();
  ForwardComms comms{single.get(), single.get(), single.get()};
  for (int threads : {1, 3, 64}) {
    Checkpoint ck = Checkpoint::open(dir.path());
    ck.set_read_threads(7);  // whatever was set before
    ForwardOptions options;
    options.threads = threads;
    make_cpu_backend(ck, ShardPlan::make(1, 0, 1, 1, c), comms, options);
    EXPECT_EQ(ck.read_threads(), std::max(threads, max_threads()));
  }
}
