#include "cuda/collectives.hpp"

#include "cuda/check.hpp"
#include "sinkscope/comm.hpp"

namespace sinkscope::cuda {

int DeviceCollectives::tp_size() const { return comms_.tp_group->size(); }
int DeviceCollectives::tp_rank() const { return comms_.tp_group->rank(); }
int DeviceCollectives::ep_size() const { return comms_.ep_group->size(); }

void DeviceCollectives::tp_allreduce_sum(float* device, size_t n) {
  if (comms_.tp_group->size() == 1) return;
  staging_.reserve(n > 0 ? n : 1);
  if (n > 0) CUDA_CHECK(cudaMemcpyAsync(staging_.get(), device, n * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  comms_.tp_group->allreduce_sum(staging_.get(), n);
  if (n > 0) CUDA_CHECK(cudaMemcpyAsync(device, staging_.get(), n * sizeof(float), cudaMemcpyHostToDevice, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));  // staging_ is reused by the next call
}

void DeviceCollectives::ep_alltoallv(const std::vector<float>& send, const std::vector<size_t>& send_counts,
                                     std::vector<float>* recv, std::vector<size_t>* recv_counts) {
  comms_.ep_group->alltoallv(send, send_counts, recv, recv_counts);
}

}  // namespace sinkscope::cuda
