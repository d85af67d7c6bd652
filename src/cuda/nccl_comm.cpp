#include "cuda/nccl_comm.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "cuda/check.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"

namespace sinkscope::cuda {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Counts above INT_MAX are not an issue for NCCL (size_t counts), but a single send above 2^31
// elements is split anyway so no transport sees a message it cannot describe.
constexpr size_t kChunk = size_t{1} << 30;

}  // namespace

#define SINKSCOPE_NCCL_CHECK(call)                                                             \
  do {                                                                                         \
    const ncclResult_t sinkscope_nccl_rc_ = (call);                                            \
    if (sinkscope_nccl_rc_ != ncclSuccess && sinkscope_nccl_rc_ != ncclInProgress)             \
      fail(std::string(#call) + " failed at " __FILE__ ":" + std::to_string(__LINE__) + ": " + \
           ncclGetErrorString(sinkscope_nccl_rc_));                                            \
  } while (0)

NcclComm::NcclComm(const Comm& group, cudaStream_t stream, double timeout_s)
    : stream_(stream), rank_(group.rank()), size_(group.size()), timeout_s_(timeout_s) {
  if (const char* t = std::getenv("SINKSCOPE_NCCL_TIMEOUT")) timeout_s_ = std::atof(t);
  ncclUniqueId id;
  std::string bytes;
  if (rank_ == 0) {
    SINKSCOPE_NCCL_CHECK(ncclGetUniqueId(&id));
    bytes.assign(reinterpret_cast<const char*>(&id), sizeof(id));
  }
  group.broadcast_bytes(&bytes, 0);
  if (bytes.size() != sizeof(id))
    throw RuntimeFailure("NCCL bootstrap: the unique id did not arrive");
  std::memcpy(&id, bytes.data(), sizeof(id));
  // Blocking initialisation (what nccl-tests does): it returns once every rank of the group has
  // joined; a rank that dies before joining ends the job through the MPI launcher. Every later
  // operation is waited for with a bound (wait()).
  SINKSCOPE_NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_));
}

NcclComm::~NcclComm() {
  if (comm_ && !aborted_) {
    // Destroy after the work in flight is done; an error here has nowhere to go.
    cudaStreamSynchronize(stream_);
    ncclCommFinalize(comm_);
    ncclCommDestroy(comm_);
  }
}

void NcclComm::fail(const std::string& what) {
  if (comm_ && !aborted_) {
    aborted_ = true;
    ncclCommAbort(comm_);
  }
  int device = -1;
  cudaGetDevice(&device);
  throw RuntimeFailure(what + " (rank " + std::to_string(rank_) + " of " + std::to_string(size_) +
                       ", host " + host_name() + ", device " + std::to_string(device) + ")");
}

void NcclComm::wait(const char* what) {
  const auto start = Clock::now();
  for (;;) {
    const cudaError_t q = cudaStreamQuery(stream_);
    if (q == cudaSuccess) return;
    if (q != cudaErrorNotReady) fail(std::string(what) + ": " + cudaGetErrorString(q));
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(comm_, &state);
    if (state != ncclSuccess && state != ncclInProgress)
      fail(std::string(what) + ": NCCL error " + ncclGetErrorString(state));
    if (seconds_since(start) > timeout_s_)
      fail(std::string(what) + " timed out after " + std::to_string(timeout_s_) +
           " s (a peer failed or hangs)");
    std::this_thread::yield();
  }
}

void NcclComm::allreduce_sum(float* device, size_t n) {
  if (size_ == 1 || n == 0) return;
  SINKSCOPE_NCCL_CHECK(ncclGroupStart());
  for (size_t done = 0; done < n; done += kChunk)
    SINKSCOPE_NCCL_CHECK(ncclAllReduce(device + done, device + done, std::min(kChunk, n - done),
                                       ncclFloat32, ncclSum, comm_, stream_));
  SINKSCOPE_NCCL_CHECK(ncclGroupEnd());
}

void NcclComm::alltoallv_bytes(const void* send, const std::vector<size_t>& send_bytes, void* recv,
                               const std::vector<size_t>& recv_bytes) {
  if (static_cast<int>(send_bytes.size()) != size_ || static_cast<int>(recv_bytes.size()) != size_)
    throw RuntimeFailure("NCCL alltoallv: one count per rank needed");
  const auto* sp = static_cast<const uint8_t*>(send);
  auto* rp = static_cast<uint8_t*>(recv);
  size_t soff = 0, roff = 0;
  SINKSCOPE_NCCL_CHECK(ncclGroupStart());
  for (int r = 0; r < size_; ++r) {
    for (size_t done = 0; done < send_bytes[r]; done += kChunk)
      SINKSCOPE_NCCL_CHECK(ncclSend(sp + soff + done, std::min(kChunk, send_bytes[r] - done),
                                    ncclUint8, r, comm_, stream_));
    for (size_t done = 0; done < recv_bytes[r]; done += kChunk)
      SINKSCOPE_NCCL_CHECK(ncclRecv(rp + roff + done, std::min(kChunk, recv_bytes[r] - done),
                                    ncclUint8, r, comm_, stream_));
    soff += send_bytes[r];
    roff += recv_bytes[r];
  }
  SINKSCOPE_NCCL_CHECK(ncclGroupEnd());
}

}  // namespace sinkscope::cuda
