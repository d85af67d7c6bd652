// One object owns a run's parallel plan and its communicators: the world, the tp group (the ranks
// of a dp group) and the expert group (docs/parallel-layout.md). No MPI types here.
#pragma once

#include <memory>

#include "sinkscope/comm.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {

// Communicators the forward pass uses: the tp group (ranks of a dp group), the ep group, and the
// world (for the micro-batch count agreement). Single-process runs pass single comms.
struct ForwardComms {
  const Comm* world = nullptr;
  const Comm* tp_group = nullptr;
  const Comm* ep_group = nullptr;
};

class ParallelContext {
 public:
  // Splits `world` (which must outlive the context) into the groups `plan` describes. Every rank
  // of the world calls it together.
  ParallelContext(const Comm& world, ShardPlan plan);

  const ShardPlan& plan() const { return plan_; }
  const Comm& world() const { return *world_; }
  const Comm& tp_group() const { return *tp_; }
  const Comm& ep_group() const { return *ep_; }
  ForwardComms comms() const { return {world_, tp_.get(), ep_.get()}; }

 private:
  const Comm* world_;
  ShardPlan plan_;
  std::unique_ptr<Comm> tp_, ep_;
};

}  // namespace sinkscope
