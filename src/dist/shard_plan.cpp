#include "sinkscope/shard_plan.hpp"

#include <boost/archive/text_iarchive.hpp>
#include <boost/archive/text_oarchive.hpp>
#include <boost/serialization/version.hpp>
#include <sstream>

#include "sinkscope/config.hpp"
#include "sinkscope/error.hpp"

BOOST_CLASS_VERSION(sinkscope::ShardPlan, 1)

namespace sinkscope {

ShardPlan ShardPlan::make(int world, int rank, int tp, int ep, const ModelConfig& c) {
  auto refuse = [](const std::string& why) { throw InputError("--tp/--ep: " + why); };
  if (tp < 1 || ep < 1) refuse("sizes must be at least 1");
  if (world % tp != 0)
    refuse("tp=" + std::to_string(tp) + " does not divide the " + std::to_string(world) + " ranks");
  if (world % ep != 0)
    refuse("ep=" + std::to_string(ep) + " does not divide the " + std::to_string(world) + " ranks");
  if (c.num_heads % tp != 0)
    refuse("tp=" + std::to_string(tp) + " does not divide the " + std::to_string(c.num_heads) + " attention heads");
  if (tp > c.num_kv_heads && tp % c.num_kv_heads != 0)
    refuse("tp=" + std::to_string(tp) + " exceeds the " + std::to_string(c.num_kv_heads) +
           " KV heads and is not a multiple of them (KV heads are replicated only evenly)");
  if (tp <= c.num_kv_heads && c.num_kv_heads % tp != 0)
    refuse("tp=" + std::to_string(tp) + " does not divide the " + std::to_string(c.num_kv_heads) + " KV heads");
  if (ep > 1 && c.num_experts == 0) refuse("ep=" + std::to_string(ep) + " but the model has no experts");
  if (c.num_experts > 0 && c.num_experts % ep != 0)
    refuse("ep=" + std::to_string(ep) + " does not divide the " + std::to_string(c.num_experts) + " experts");

  ShardPlan p;
  p.world_size = world;
  p.rank = rank;
  p.tp = tp;
  p.ep = ep;
  p.dp = world / tp;
  p.tp_rank = rank % tp;
  p.dp_rank = rank / tp;
  p.ep_rank = rank % ep;
  p.ep_group = rank / ep;
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
  return p;
}

void ShardPlan::probe_range(int64_t n, int dp, int dp_index, int64_t* begin, int64_t* end) {
  *begin = n * dp_index / dp;
  *end = n * (dp_index + 1) / dp;
}

int ShardPlan::expert_owner(int64_t e) const {
  return ep_group * ep + static_cast<int>(e / (num_experts / ep));
}

int ShardPlan::head_owner(int64_t h) const { return dp_rank * tp + static_cast<int>(h / (num_heads / tp)); }

std::string ShardPlan::describe() const {
  std::ostringstream os;
  os << "world=" << world_size << " tp=" << tp << " ep=" << ep << " dp=" << dp << " (attention: dp x tp; experts: "
     << ep << " per ep group, " << world_size / ep << " groups; heads/rank=" << num_heads / tp
     << ", kv heads/rank=" << (kv_end - kv_begin) << (tp > num_kv_heads ? " replicated" : "")
     << ", experts/rank=" << (num_experts ? num_experts / ep : 0) << ")";
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
