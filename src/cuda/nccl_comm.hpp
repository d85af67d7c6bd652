// NCCL communicator for device buffers, bootstrapped over the MPI communicator of the same ranks
// (one rank per GPU). Every wait is bounded: the stream is polled together with
// ncclCommGetAsyncError, and an error or a timeout aborts the communicator (ncclCommAbort) and
// throws, so a failing peer never hangs the job (docs/multi-gpu.md).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <string>
#include <vector>

namespace sinkscope {
class Comm;
}

namespace sinkscope::cuda {

class NcclComm {
 public:
  // Collective over every rank of `group`: its rank 0 creates the unique id and broadcasts it.
  // `timeout_s` bounds every wait (SINKSCOPE_NCCL_TIMEOUT overrides it).
  NcclComm(const Comm& group, cudaStream_t stream, double timeout_s = 300.0);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }

  // The operations are enqueued on the stream; wait() bounds the wait for them (and for all of the
  // stream's earlier work).
  // In place, element-wise sum over the ranks of n floats of device memory.
  void allreduce_sum(float* device, size_t n);
  // Every rank sends send_bytes[r] bytes (contiguous, in rank order) to rank r and receives
  // recv_bytes[r] bytes from it (grouped ncclSend/ncclRecv).
  void alltoallv_bytes(const void* send, const std::vector<size_t>& send_bytes, void* recv,
                       const std::vector<size_t>& recv_bytes);
  // Returns once the stream is idle; throws (after ncclCommAbort) on an NCCL error, a CUDA error
  // or when the timeout passes.
  void wait(const char* what);

 private:
  [[noreturn]] void fail(const std::string& what);

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_;
  int rank_ = 0, size_ = 1;
  double timeout_s_;
  bool aborted_ = false;
};

}  // namespace sinkscope::cuda
