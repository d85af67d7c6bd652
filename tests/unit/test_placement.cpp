// Placement over nodes (include/sinkscope/placement.hpp): layout ranks numbered node by node,
// tp groups refused across nodes unless allowed, the --ep-placement policy, the layout string.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/placement.hpp"
#include "sinkscope/shard_plan.hpp"
#include "test_util.hpp"

using namespace sinkscope;

namespace {

// A node map from one host name per world rank.
NodeMap nodes_of(const std::vector<std::string>& hosts) { return node_map_from_keys(hosts, hosts); }

std::string refusal(const NodeMap& m, int tp, int ep, int etp, const PlacementOptions& o) {
  try {
    place_ranks(m, tp, ep, etp, o);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Placement, NodesNumberedByTheirLowestRank) {
  const NodeMap m = nodes_of({"b", "a", "b", "a", "c"});
  EXPECT_EQ(m.node_of_rank, (std::vector<int>{0, 1, 0, 1, 2}));
  EXPECT_EQ(m.node_names, (std::vector<std::string>{"b", "a", "c"}));
  EXPECT_EQ(m.num_nodes(), 3);
}

TEST(Placement, BlockDistributionKeepsRankOrder) {
  const Placement p =
      place_ranks(nodes_of({"n1", "n1", "n1", "n1", "n2", "n2", "n2", "n2"}), 4, 8, 1, {});
  EXPECT_EQ(p.layout_rank, (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(p.local_rank, (std::vector<int>{0, 1, 2, 3, 0, 1, 2, 3}));
  EXPECT_TRUE(p.tp_inside_nodes);
  EXPECT_EQ(p.expert_group_nodes, 2);
  EXPECT_NE(p.summary.find("2 nodes (n1 x4, n2 x4), tp groups inside nodes, expert groups across 2 "
                           "nodes (--ep-placement any), dp groups 2 over 2 nodes"),
            std::string::npos)
      << p.summary;
}

TEST(Placement, CyclicDistributionIsRenumberedNodeByNode) {
  // srun --distribution=cyclic / mpirun --map-by node: consecutive world ranks alternate nodes.
  const Placement p = place_ranks(nodes_of({"n1", "n2", "n1", "n2"}), 2, 2, 1, {});
  EXPECT_EQ(p.layout_rank, (std::vector<int>{0, 2, 1, 3}));
  EXPECT_EQ(p.node_of_layout_rank, (std::vector<int>{0, 0, 1, 1}));
  EXPECT_EQ(p.local_rank, (std::vector<int>{0, 0, 1, 1}));
  EXPECT_TRUE(p.tp_inside_nodes);
  EXPECT_EQ(p.expert_group_nodes, 1);
}

TEST(Placement, TpAcrossNodesIsRefusedUnlessAllowed) {
  const NodeMap m = nodes_of({"n1", "n1", "n2", "n2"});
  const std::string why = refusal(m, 4, 1, 1, {});
  EXPECT_EQ(why,
            "--tp 4: a tp group would span nodes (ranks per node: n1 x2, n2 x2); tp all-reduces "
            "every layer, so it must divide each node's ranks (--allow-tp-across-nodes to run "
            "anyway)");
  PlacementOptions forced;
  forced.allow_tp_across_nodes = true;
  const Placement p = place_ranks(m, 4, 1, 1, forced);
  EXPECT_FALSE(p.tp_inside_nodes);
  EXPECT_NE(p.summary.find("tp groups ACROSS nodes (forced)"), std::string::npos);
  // Uneven nodes: 3 + 1 ranks cannot hold tp groups of 2 inside nodes.
  EXPECT_NE(refusal(nodes_of({"n1", "n1", "n1", "n2"}), 2, 1, 1, {}).find("n1 x3, n2 x1"),
            std::string::npos);
}

TEST(Placement, EpPolicy) {
  const NodeMap m = nodes_of({"n1", "n1", "n2", "n2"});
  PlacementOptions inside, across;
  inside.ep = EpPlacement::kInside;
  across.ep = EpPlacement::kAcross;
  EXPECT_EQ(place_ranks(m, 2, 2, 1, inside).expert_group_nodes, 1);
  EXPECT_NE(refusal(m, 2, 4, 1, inside)
                .find("--ep-placement inside: an expert group (ep x etp = "
                      "4 ranks) would span 2 nodes"),
            std::string::npos);
  EXPECT_EQ(place_ranks(m, 2, 4, 1, across).expert_group_nodes, 2);
  // etp counts: ep 2 x etp 2 = 4 ranks spans both nodes.
  EXPECT_EQ(place_ranks(m, 2, 2, 2, across).expert_group_nodes, 2);
  EXPECT_NE(refusal(m, 2, 2, 1, across)
                .find("--ep-placement across: an expert group (ep x etp = "
                      "2 ranks) fits inside one node"),
            std::string::npos);
  EXPECT_EQ(parse_ep_placement("inside"), EpPlacement::kInside);
  try {
    parse_ep_placement("everywhere");
    FAIL() << "accepted --ep-placement everywhere";
  } catch (const InputError& e) {
    EXPECT_EQ(std::string(e.what()), "--ep-placement everywhere: use any, inside or across");
  }
}

TEST(Placement, PlacedPlanTakesTheLayoutRank) {
  ModelConfig c = test::tiny_config();  // 4 heads, 2 KV heads, 4 experts
  const NodeMap m = nodes_of({"n1", "n2", "n1", "n2"});
  // World rank 2 is the second rank of n1: layout rank 1, tp rank 1 of dp group 0.
  const ShardPlan p = make_placed_plan(m, 2, 2, 2, c, 1, {});
  EXPECT_EQ(p.rank, 1);
  EXPECT_EQ(p.dp_rank, 0);
  EXPECT_EQ(p.tp_rank, 1);
  EXPECT_EQ(p.node, 0);
  EXPECT_EQ(p.num_nodes, 2);
  EXPECT_EQ(p.local_rank, 1);
  EXPECT_NE(p.describe().find("; placement: 2 nodes (n1 x2, n2 x2)"), std::string::npos);
  // Rank 0 stays layout rank 0 (it writes the output).
  EXPECT_EQ(make_placed_plan(m, 0, 2, 2, c, 1, {}).rank, 0);
  // Sizes are still checked first, with ShardPlan::make's message.
  EXPECT_THROW(make_placed_plan(m, 0, 3, 1, c, 1, {}), InputError);
  // The new fields survive serialisation.
  EXPECT_EQ(deserialize_plan(serialize_plan(p)), p);
}

TEST(Placement, SingleCommIsOneNode) {
  const auto comm = make_single_comm();
  const NodeMap m = discover_nodes(*comm);
  EXPECT_EQ(m.num_nodes(), 1);
  EXPECT_EQ(m.node_names.at(0), host_name());
}
