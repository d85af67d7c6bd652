// Where a job's ranks live, and which layout position each takes so that tensor-parallel groups
// stay inside a node (docs/parallel-layout.md, "Across nodes"). No MPI types here.
//
// The layout (ShardPlan) groups consecutive layout ranks: a tp group is tp consecutive ranks, an
// expert group ep x etp consecutive ranks. Placement numbers the ranks node by node (nodes in the
// order of their lowest world rank, ranks of a node in world-rank order), so the layout does not
// depend on how the launcher spread the ranks (srun's block or cyclic distribution, mpirun
// --map-by node): world rank 0 is always layout rank 0 (it writes the output). Then
//   - a tp group lies inside one node when every node holds a multiple of tp ranks; otherwise
//     the layout is refused (tp all-reduces every layer) unless --allow-tp-across-nodes;
//   - expert groups lie inside a node or span nodes as ep x etp and the node sizes make them;
//     --ep-placement inside|across states which one the run requires (any: either);
//   - dp groups (disjoint probes) are the remaining split, across nodes.
#pragma once

#include <string>
#include <vector>

#include "sinkscope/shard_plan.hpp"

namespace sinkscope {

class Comm;
struct ModelConfig;

// node_of_rank[r]: the node of world rank r; nodes are numbered 0, 1, ... in the order of their
// lowest world rank. node_names[n]: node n's host name (for messages and the layout string).
struct NodeMap {
  std::vector<int> node_of_rank;
  std::vector<std::string> node_names;
  int num_nodes() const { return static_cast<int>(node_names.size()); }
  // The index of world rank `rank` among the ranks of its node, in rank order.
  int local_rank(int rank) const {
    int index = 0;
    for (int r = 0; r < rank; ++r) index += node_of_rank[r] == node_of_rank[rank] ? 1 : 0;
    return index;
  }
};

// Every rank of `world` calls it together. Nodes come from the communicator's node_key(): MPI's
// shared-memory split (the ranks that can share memory), else the host name.
NodeMap discover_nodes(const Comm& world);
// The same map from one node key per rank (in rank order); used by discover_nodes and the tests.
NodeMap node_map_from_keys(const std::vector<std::string>& keys,
                           const std::vector<std::string>& names);

enum class EpPlacement { kAny, kInside, kAcross };
// "any", "inside", "across"; anything else is an InputError naming --ep-placement.
EpPlacement parse_ep_placement(const std::string& text);
std::string to_string(EpPlacement p);

struct PlacementOptions {
  EpPlacement ep = EpPlacement::kAny;
  bool allow_tp_across_nodes = false;
};

struct Placement {
  std::vector<int> layout_rank;          // world rank -> layout rank (the ShardPlan's rank)
  std::vector<int> node_of_layout_rank;  // layout rank -> node
  std::vector<int> local_rank;           // world rank -> its index among its node's ranks
  int num_nodes = 1;
  bool tp_inside_nodes = true;
  int expert_group_nodes = 1;  // most nodes any expert group spans
  std::string summary;         // one line, appended to ShardPlan::describe()
};

// Throws InputError with a one-line reason naming the option when the layout breaks the rules
// above. tp, ep and etp are the plan's (etp resolved, ep x etp and tp dividing the world).
Placement place_ranks(const NodeMap& nodes, int tp, int ep, int etp, const PlacementOptions& opt);

// ShardPlan::make at this rank's layout position: checks the sizes (ShardPlan::make), places the
// ranks (place_ranks) and fills the plan's node, num_nodes, local_rank and placement. etp as in
// ShardPlan::make (0: the default). Throws InputError with one line.
ShardPlan make_placed_plan(const NodeMap& nodes, int world_rank, int tp, int ep,
                           const ModelConfig& cfg, int etp, const PlacementOptions& opt);

}  // namespace sinkscope
