// The single-process communicator: every collective is the identity.
#include <unistd.h>

#include <cstdlib>

#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"

namespace sinkscope {
namespace {

class SingleComm final : public Comm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string kind() const override { return "single"; }
  std::unique_ptr<Comm> split(int, int) const override { return std::make_unique<SingleComm>(); }
  void barrier() const override {}
  void allreduce_sum(float*, size_t) const override {}
  void allreduce_sum(double*, size_t) const override {}
  void allreduce_max(int64_t*, size_t) const override {}
  void alltoallv(const std::vector<float>& send, const std::vector<size_t>& send_counts,
                 std::vector<float>* recv, std::vector<size_t>* recv_counts) const override {
    if (send_counts.size() != 1 || send_counts[0] != send.size())
      throw RuntimeFailure("alltoallv: counts do not match the buffer");
    *recv = send;
    *recv_counts = send_counts;
  }
  std::vector<std::string> gather_bytes(const std::string& mine, int) const override {
    return {mine};
  }
  std::vector<std::string> allgather_bytes(const std::string& mine) const override {
    return {mine};
  }
  void broadcast_bytes(std::string*, int) const override {}
  int first_failed_rank(bool ok) const override { return ok ? -1 : 0; }
  [[noreturn]] void abort(int status) const override { std::_Exit(status); }
};

}  // namespace

std::unique_ptr<Comm> make_single_comm() { return std::make_unique<SingleComm>(); }

std::string host_name() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "unknown-host";
  return buf;
}

bool launched_under_mpi() {
  for (const char* v :
       {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_PMIXP_ABORT_AGENT_PORT"})
    if (std::getenv(v)) return true;
  return false;
}

}  // namespace sinkscope
