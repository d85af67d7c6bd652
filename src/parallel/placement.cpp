// Node-aware placement of the layout's ranks (include/sinkscope/placement.hpp).
#include "sinkscope/placement.hpp"

#include <algorithm>
#include <map>
#include <set>
#include <sstream>

#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"

namespace sinkscope {

NodeMap node_map_from_keys(const std::vector<std::string>& keys,
                           const std::vector<std::string>& names) {
  NodeMap m;
  std::map<std::string, int> index;
  for (size_t r = 0; r < keys.size(); ++r) {
    auto [it, inserted] = index.emplace(keys[r], static_cast<int>(m.node_names.size()));
    if (inserted) m.node_names.push_back(r < names.size() ? names[r] : keys[r]);
    m.node_of_rank.push_back(it->second);
  }
  return m;
}

NodeMap discover_nodes(const Comm& world) {
  const std::string key = world.node_key();
  // One record per rank: the node key, a newline, the host name (keys hold no newline).
  const auto all = world.allgather_bytes(key + "\n" + host_name());
  std::vector<std::string> keys, names;
  for (const auto& s : all) {
    const size_t nl = s.find('\n');
    keys.push_back(s.substr(0, nl));
    names.push_back(nl == std::string::npos ? s : s.substr(nl + 1));
  }
  return node_map_from_keys(keys, names);
}

EpPlacement parse_ep_placement(const std::string& text) {
  if (text == "any") return EpPlacement::kAny;
  if (text == "inside") return EpPlacement::kInside;
  if (text == "across") return EpPlacement::kAcross;
  throw InputError("--ep-placement " + text + ": use any, inside or across");
}

std::string to_string(EpPlacement p) {
  switch (p) {
    case EpPlacement::kInside:
      return "inside";
    case EpPlacement::kAcross:
      return "across";
    case EpPlacement::kAny:
      break;
  }
  return "any";
}

namespace {

// "node1 x4, node2 x4" (runs of equal counts shortened: "4 nodes x 8").
std::string node_counts(const NodeMap& nodes, const std::vector<int>& count) {
  std::ostringstream os;
  const bool equal = std::all_of(count.begin(), count.end(), [&](int c) { return c == count[0]; });
  if (equal && count.size() > 4) {
    os << count.size() << " nodes x " << count[0];
    return os.str();
  }
  for (size_t n = 0; n < count.size(); ++n)
    os << (n ? ", " : "") << nodes.node_names[n] << " x" << count[n];
  return os.str();
}

}  // namespace

Placement place_ranks(const NodeMap& nodes, int tp, int ep, int etp, const PlacementOptions& opt) {
  const int world = static_cast<int>(nodes.node_of_rank.size());
  const int num_nodes = nodes.num_nodes();
  if (world < 1 || tp < 1 || ep < 1 || etp < 1 || world % tp != 0 || world % (ep * etp) != 0)
    throw RuntimeFailure("place_ranks: sizes not checked by ShardPlan::make first");
  std::vector<int> count(static_cast<size_t>(num_nodes), 0);
  for (int n : nodes.node_of_rank) ++count[static_cast<size_t>(n)];

  Placement p;
  p.num_nodes = num_nodes;
  p.layout_rank.assign(static_cast<size_t>(world), 0);
  p.local_rank.assign(static_cast<size_t>(world), 0);
  p.node_of_layout_rank.assign(static_cast<size_t>(world), 0);
  // Node blocks in node order (nodes are numbered by their lowest rank, so rank 0 stays 0).
  std::vector<int> first(static_cast<size_t>(num_nodes), 0);
  for (int n = 1; n < num_nodes; ++n) first[n] = first[n - 1] + count[n - 1];
  for (int r = 0; r < world; ++r) {
    const int n = nodes.node_of_rank[r];
    p.local_rank[r] = nodes.local_rank(r);
    p.layout_rank[r] = first[n] + p.local_rank[r];
    p.node_of_layout_rank[p.layout_rank[r]] = n;
  }

  const std::string where = node_counts(nodes, count);
  for (int n = 0; n < num_nodes; ++n)
    if (count[n] % tp != 0) p.tp_inside_nodes = false;
  if (!p.tp_inside_nodes && !opt.allow_tp_across_nodes)
    throw InputError("--tp " + std::to_string(tp) +
                     ": a tp group would span nodes (ranks per node: " + where +
                     "); tp all-reduces every layer, so it must divide each node's ranks "
                     "(--allow-tp-across-nodes to run anyway)");

  // Expert group g is layout ranks [g * ep * etp, (g + 1) * ep * etp). "across" asks that every
  // group spans nodes, so the smallest span counts too.
  const int group = ep * etp;
  int smallest_span = num_nodes;
  for (int g = 0; g < world / group; ++g) {
    std::set<int> spanned;
    for (int r = g * group; r < (g + 1) * group; ++r) spanned.insert(p.node_of_layout_rank[r]);
    const int span = static_cast<int>(spanned.size());
    p.expert_group_nodes = std::max(p.expert_group_nodes, span);
    smallest_span = std::min(smallest_span, span);
  }
  const std::string group_text = "an expert group (ep x etp = " + std::to_string(group) + " ranks)";
  if (opt.ep == EpPlacement::kInside && p.expert_group_nodes > 1)
    throw InputError("--ep-placement inside: " + group_text + " would span " +
                     std::to_string(p.expert_group_nodes) + " nodes (ranks per node: " + where +
                     "); lower --ep or use --ep-placement any");
  if (opt.ep == EpPlacement::kAcross && smallest_span < 2)
    throw InputError("--ep-placement across: " + group_text +
                     " fits inside one node (ranks per node: " + where +
                     "); raise --ep or use --ep-placement any");

  std::ostringstream os;
  os << "placement: " << num_nodes << (num_nodes == 1 ? " node" : " nodes") << " (" << where
     << "), tp groups " << (p.tp_inside_nodes ? "inside nodes" : "ACROSS nodes (forced)")
     << ", expert groups ";
  if (p.expert_group_nodes == 1)
    os << "inside nodes";
  else
    os << "across " << p.expert_group_nodes << " nodes";
  os << " (--ep-placement " << to_string(opt.ep) << "), dp groups " << world / tp;
  if (num_nodes > 1) os << " over " << num_nodes << " nodes";
  p.summary = os.str();
  return p;
}

ShardPlan make_placed_plan(const NodeMap& nodes, int world_rank, int tp, int ep,
                           const ModelConfig& cfg, int etp, const PlacementOptions& opt) {
  const int world = static_cast<int>(nodes.node_of_rank.size());
  const ShardPlan sizes = ShardPlan::make(world, world_rank, tp, ep, cfg, etp);
  const Placement placed = place_ranks(nodes, sizes.tp, sizes.ep, sizes.etp, opt);
  ShardPlan plan = ShardPlan::make(world, placed.layout_rank[world_rank], tp, ep, cfg, sizes.etp);
  plan.node = nodes.node_of_rank[world_rank];
  plan.num_nodes = placed.num_nodes;
  plan.local_rank = placed.local_rank[world_rank];
  plan.placement = placed.summary;
  return plan;
}

}  // namespace sinkscope
