// Every point where the CUDA backend talks to other ranks, in one place. With more than one rank
// in a group the device buffers travel over NCCL (one rank per GPU, bootstrapped over the group's
// MPI communicator; bounded waits, abort on error: cuda/nccl_comm.hpp). SINKSCOPE_NCCL=0 stages
// through host memory and the host communicators instead (MPI), e.g. to compare the two.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <vector>

#include "cuda/device_buffer.hpp"
#include "sinkscope/model.hpp"

namespace sinkscope::cuda {

class NcclComm;

class DeviceCollectives {
 public:
  DeviceCollectives(ForwardComms comms, cudaStream_t stream);
  ~DeviceCollectives();
  DeviceCollectives(const DeviceCollectives&) = delete;
  DeviceCollectives& operator=(const DeviceCollectives&) = delete;

  int tp_size() const;
  int tp_rank() const;
  int ep_size() const;
  bool uses_nccl() const { return tp_nccl_ != nullptr || ep_nccl_ != nullptr; }

  // In place, element-wise sum over the tp group of n floats of device memory (all of the stream's
  // earlier work included). Every tp rank must call it, also with n == 0.
  void tp_allreduce_sum(float* device, size_t n);

  // The MoE exchange over the ep group (Comm::alltoallv semantics on host vectors). With NCCL the
  // counts travel over MPI and the payload over NCCL through device staging buffers.
  void ep_alltoallv(const std::vector<float>& send, const std::vector<size_t>& send_counts,
                    std::vector<float>* recv, std::vector<size_t>* recv_counts);

  // Seconds spent inside the collectives (the benchmark's communication time).
  double seconds() const { return seconds_; }

 private:
  ForwardComms comms_;
  cudaStream_t stream_;
  PinnedBuffer<float> staging_;
  DeviceBuffer<float> send_dev_, recv_dev_;
  std::unique_ptr<NcclComm> tp_nccl_, ep_nccl_;
  double seconds_ = 0;
};

}  // namespace sinkscope::cuda
