// Every point where the CUDA backend talks to other ranks, in one place. With more than one rank
// in a group the device buffers travel over NCCL (one rank per GPU, bootstrapped over the group's
// MPI communicator; bounded waits, abort on error: cuda/nccl_comm.hpp). SINKSCOPE_NCCL=0 stages
// through host memory and the host communicators instead (MPI), e.g. to compare the two.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
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

  // The MoE exchange over the ep group, device memory to device memory: this rank sends
  // send_bytes[r] bytes (contiguous, in rank order) to rank r and receives recv_bytes[r] from it
  // (both sides know the sizes: the counts travel before, over MPI). NCCL where it is in use,
  // else through pinned host memory and the ep group's Comm.
  void ep_alltoallv(const void* send, const std::vector<size_t>& send_bytes, void* recv,
                    const std::vector<size_t>& recv_bytes);
  // The same exchange in two halves, so the caller can enqueue work that needs neither buffer in
  // between: begin enqueues it behind the stream's work so far (over NCCL on a stream of its own,
  // at high priority, so it runs next to that work); end returns once it is done (bounded wait) and
  // orders the stream's later work after it. With host staging begin does all of it.
  void ep_exchange_begin(const void* send, const std::vector<size_t>& send_bytes, void* recv,
                         const std::vector<size_t>& recv_bytes);
  void ep_exchange_end();

  // Seconds spent communicating (the benchmark's communication time): over NCCL the device time
  // between events around the NCCL operations, with host staging the wall time of the call.
  double seconds() const { return seconds_; }

 private:
  // Enqueues `enqueue` on `on` between two events, waits (bounded) and adds the device time between
  // them.
  template <class F>
  void timed(NcclComm& comm, cudaStream_t on, const char* what, F enqueue);
  void host_alltoallv(const void* send, const std::vector<size_t>& send_bytes, void* recv,
                      const std::vector<size_t>& recv_bytes);

  ForwardComms comms_;
  cudaStream_t stream_;
  PinnedBuffer<float> staging_;
  PinnedBuffer<uint8_t> staging_bytes_;
  std::unique_ptr<NcclComm> tp_nccl_, ep_nccl_;
  cudaStream_t ep_stream_ = nullptr;  // the ep exchange's NCCL stream
  cudaEvent_t ev_begin_ = nullptr, ev_end_ = nullptr, ev_fork_ = nullptr;
  bool ep_pending_ = false;
  double seconds_ = 0;
};

}  // namespace sinkscope::cuda
