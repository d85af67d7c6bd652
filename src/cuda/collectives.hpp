// Every point where the CUDA backend talks to other ranks, in one place. Today they stage through
// host memory and the host communicators of ForwardComms (MPI or single-process); an NCCL
// implementation of this class replaces them without touching the forward pass.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <vector>

#include "cuda/device_buffer.hpp"
#include "sinkscope/model.hpp"

namespace sinkscope::cuda {

class DeviceCollectives {
 public:
  DeviceCollectives(ForwardComms comms, cudaStream_t stream) : comms_(comms), stream_(stream) {}

  int tp_size() const;
  int tp_rank() const;
  int ep_size() const;

  // In place, element-wise sum over the tp group of n floats of device memory (all of the stream's
  // earlier work included). Every tp rank must call it, also with n == 0.
  void tp_allreduce_sum(float* device, size_t n);

  // The MoE exchange over the ep group, on host buffers (Comm::alltoallv semantics).
  void ep_alltoallv(const std::vector<float>& send, const std::vector<size_t>& send_counts, std::vector<float>* recv,
                    std::vector<size_t>* recv_counts);

 private:
  ForwardComms comms_;
  cudaStream_t stream_;
  PinnedBuffer<float> staging_;
};

}  // namespace sinkscope::cuda
