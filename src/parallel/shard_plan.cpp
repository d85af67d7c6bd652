#include "sinkscope/shard_plan.hpp"
#include "sinkscope/parallel.hpp"

#include <boost/archive/text_iarchive.hpp>
#include <boost/archive/text_oarchive.hpp>
#include <boost/serialization/string.hpp>
#include <boost/serialization/version.hpp>
#include <sstream>

#include "sinkscope/config.hpp"
#include "sinkscope/error.hpp"

BOOST_CLASS_VERSION(sinkscope::ShardPlan, 2)

namespace sinkscope {

ShardPlan ShardPlan::make(int world, int rank, int tp, int ep, const ModelConfig& c, int etp) {
  auto refuse = [](const std::string& why) { throw InputError("--tp/--ep/--etp: " + why); };
  if (tp < 1 || ep < 1 || etp < 0) refuse("sizes must be at least 1");
  if (etp == 0)
    etp = world % (tp * ep) == 0 && c.moe_intermediate_size % tp == 0 && c.num_experts > 0 ? tp : 1;
  if (world % tp != 0)
    refuse("tp=" + std::to_string(tp) + " does not divide the " + std::to_string(world) + " ranks");
  if (world % ep != 0)
    refuse("ep=" + std::to_string(ep) + " does not divide the " + std::to_string(world) + " ranks");
  if (c.num_heads % tp != 0)
    refuse("tp=" + std::to_string(tp) + " does not divide the " + std::to_string(c.num_heads) +
           " attention heads");
  if (tp > c.num_kv_heads && tp % c.num_kv_heads != 0)
    refuse("tp=" + std::to_string(tp) + " exceeds the " + std::to_string(c.num_kv_heads) +
           " KV heads and is not a multiple of them (KV heads are replicated only evenly)");
  if (tp <= c.num_kv_heads && c.num_kv_heads % tp != 0)
    refuse("tp=" + std::to_string(tp) + " does not divide the " + std::to_string(c.num_kv_heads) +
           " KV heads");
  if (ep > 1 && c.num_experts == 0)
    refuse("ep=" + std::to_string(ep) + " but the model has no experts");
  if (c.num_experts > 0 && c.num_experts % ep != 0)
    refuse("ep=" + std::to_string(ep) + " does not divide the " + std::to_string(c.num_experts) +
           " experts");
  if (world % (ep * etp) != 0)
    refuse("ep x etp = " + std::to_string(ep * etp) + " does not divide the " +
           std::to_string(world) + " ranks");
  if (etp > 1 && (c.num_experts == 0 || c.moe_intermediate_size % etp != 0))
    refuse("etp=" + std::to_string(etp) +
           " does not divide the expert width (moe_intermediate_size " +
           std::to_string(c.moe_intermediate_size) + ")");

  ShardPlan p;
  p.world_size = world;
  p.rank = rank;
  p.tp = tp;
  p.ep = ep;
  p.dp = world / tp;
  p.tp_rank = rank % tp;
  p.dp_rank = rank / tp;
  p.etp = etp;
  p.etp_rank = rank % etp;
  p.ep_rank = (rank / etp) % ep;
  p.ep_group = rank / (ep * etp);
  p.num_heads = c.num_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.num_experts = c.num_experts;
  const int64_t hper = c.num_heads / tp;
  p.head_begin = p.tp_rank * hper;
  p.head_end = p.head_begin + hper;
  if (tp <= c.num_kv_heads) {
    const int64_t kper = c.num_kv_heads / tp;
    p.kv_begin = p.tp_rank * kper;
    p.kv_end = p.kv_begin + kper;
  } else {  // replicated: this rank's heads all share one KV head
    const int64_t group = c.num_heads / c.num_kv_heads;
    p.kv_begin = p.head_begin / group;
    p.kv_end = p.kv_begin + 1;
  }
  const int64_t eper = c.num_experts / ep;
  p.expert_begin = p.ep_rank * eper;
  p.expert_end = p.expert_begin + eper;
  p.moe_inter = c.moe_intermediate_size;
  const int64_t iper = c.moe_intermediate_size / etp;
  p.inter_begin = p.etp_rank * iper;
  p.inter_end = p.inter_begin + iper;
  return p;
}

void ShardPlan::probe_range(int64_t n, int dp, int dp_index, int64_t* begin, int64_t* end) {
  *begin = n * dp_index / dp;
  *end = n * (dp_index + 1) / dp;
}

int ShardPlan::expert_owner(int64_t e, int slice) const {
  return static_cast<int>(e / (num_experts / ep)) * etp + slice;
}

int ShardPlan::head_owner(int64_t h) const {
  return dp_rank * tp + static_cast<int>(h / (num_heads / tp));
}

std::string ShardPlan::describe() const {
  std::ostringstream os;
  os << "world=" << world_size << " tp=" << tp << " ep=" << ep << " etp=" << etp << " dp=" << dp
     << " (attention: dp x tp; experts: ep x etp = " << ep * etp << " ranks per expert group, "
     << world_size / (ep * etp) << " groups; heads/rank=" << num_heads / tp
     << ", kv heads/rank=" << (kv_end - kv_begin) << (tp > num_kv_heads ? " replicated" : "")
     << ", experts/rank=" << (num_experts ? num_experts / ep : 0)
     << (etp > 1 ? " x 1/" + std::to_string(etp) + " of their width" : "") << ")";
  if (!placement.empty()) os << "; " << placement;
  return os.str();
}

std::string serialize_plan(const ShardPlan& p) {
  std::ostringstream os;
  {
    boost::archive::text_oarchive ar(os);
    ar << p;
  }
  return os.str();
}

ShardPlan deserialize_plan(const std::string& bytes) {
  ShardPlan p;
  try {
    std::istringstream is(bytes);
    boost::archive::text_iarchive ar(is);
    ar >> p;
  } catch (const std::exception& e) {
    throw InputError(std::string("cannot decode a shard plan: ") + e.what());
  }
  return p;
}

}  // namespace sinkscope

namespace sinkscope {

ParallelContext::ParallelContext(const Comm& world, ShardPlan plan)
    : world_(&world),
      plan_(plan),
      tp_(world.split(plan.dp_rank, plan.tp_rank)),
      ep_(world.split(plan.ep_group, plan.ep_rank * plan.etp + plan.etp_rank)) {}

}  // namespace sinkscope
