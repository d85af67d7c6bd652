#include "cuda/collectives.hpp"

#include <chrono>
#include <cstdlib>
#include <cstring>

#include "cuda/check.hpp"
#include "cuda/nccl_comm.hpp"
#include "sinkscope/comm.hpp"

namespace sinkscope::cuda {
namespace {

using Clock = std::chrono::steady_clock;

bool nccl_wanted() {
  const char* v = std::getenv("SINKSCOPE_NCCL");
  return !(v && std::strcmp(v, "0") == 0);
}

class Timer {
 public:
  explicit Timer(double* acc) : acc_(acc), start_(Clock::now()) {}
  ~Timer() { *acc_ += std::chrono::duration<double>(Clock::now() - start_).count(); }

 private:
  double* acc_;
  Clock::time_point start_;
};

}  // namespace

DeviceCollectives::DeviceCollectives(ForwardComms comms, cudaStream_t stream)
    : comms_(comms), stream_(stream) {
  // Communicator creation is collective over each group, in the same order on every rank.
  if (nccl_wanted() && comms_.tp_group->size() > 1)
    tp_nccl_ = std::make_unique<NcclComm>(*comms_.tp_group, stream_);
  if (nccl_wanted() && comms_.ep_group->size() > 1)
    ep_nccl_ = std::make_unique<NcclComm>(*comms_.ep_group, stream_);
}

DeviceCollectives::~DeviceCollectives() = default;

int DeviceCollectives::tp_size() const { return comms_.tp_group->size(); }
int DeviceCollectives::tp_rank() const { return comms_.tp_group->rank(); }
int DeviceCollectives::ep_size() const { return comms_.ep_group->size(); }

void DeviceCollectives::tp_allreduce_sum(float* device, size_t n) {
  if (comms_.tp_group->size() == 1) return;
  Timer t(&seconds_);
  if (tp_nccl_) {
    tp_nccl_->allreduce_sum(device, n);
    return;
  }
  staging_.reserve(n > 0 ? n : 1);
  if (n > 0)
    CUDA_CHECK(cudaMemcpyAsync(staging_.get(), device, n * sizeof(float), cudaMemcpyDeviceToHost,
                               stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  comms_.tp_group->allreduce_sum(staging_.get(), n);
  if (n > 0)
    CUDA_CHECK(cudaMemcpyAsync(device, staging_.get(), n * sizeof(float), cudaMemcpyHostToDevice,
                               stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));  // staging_ is reused by the next call
}

void DeviceCollectives::ep_alltoallv(const std::vector<float>& send,
                                     const std::vector<size_t>& send_counts,
                                     std::vector<float>* recv, std::vector<size_t>* recv_counts) {
  Timer t(&seconds_);
  if (!ep_nccl_) {
    comms_.ep_group->alltoallv(send, send_counts, recv, recv_counts);
    return;
  }
  // Counts over MPI (small), payload over NCCL.
  const int P = comms_.ep_group->size();
  std::string mine(reinterpret_cast<const char*>(send_counts.data()),
                   send_counts.size() * sizeof(size_t));
  const std::vector<std::string> all = comms_.ep_group->allgather_bytes(mine);
  recv_counts->assign(static_cast<size_t>(P), 0);
  size_t total = 0;
  for (int r = 0; r < P; ++r) {
    size_t c = 0;
    std::memcpy(&c, all[r].data() + static_cast<size_t>(comms_.ep_group->rank()) * sizeof(size_t),
                sizeof(size_t));
    (*recv_counts)[r] = c;
    total += c;
  }
  send_dev_.reserve(send.size() > 0 ? send.size() : 1);
  recv_dev_.reserve(total > 0 ? total : 1);
  if (!send.empty())
    CUDA_CHECK(cudaMemcpyAsync(send_dev_.get(), send.data(), send.size() * sizeof(float),
                               cudaMemcpyHostToDevice, stream_));
  ep_nccl_->alltoallv(send_dev_.get(), send_counts, recv_dev_.get(), *recv_counts);
  recv->resize(total);
  if (total > 0)
    CUDA_CHECK(cudaMemcpyAsync(recv->data(), recv_dev_.get(), total * sizeof(float),
                               cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace sinkscope::cuda
