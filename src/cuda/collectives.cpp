#include "cuda/collectives.hpp"

#include <chrono>
#include <cstdlib>
#include <cstring>

#include "cuda/check.hpp"
#include "cuda/nccl_comm.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"

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
  if (nccl_wanted() && comms_.ep_group->size() > 1) {
    int least = 0, greatest = 0;
    CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    CUDA_CHECK(cudaStreamCreateWithPriority(&ep_stream_, cudaStreamNonBlocking, greatest));
    ep_nccl_ = std::make_unique<NcclComm>(*comms_.ep_group, ep_stream_);
  }
  if (uses_nccl()) {
    CUDA_CHECK(cudaEventCreate(&ev_begin_));
    CUDA_CHECK(cudaEventCreate(&ev_end_));
    CUDA_CHECK(cudaEventCreateWithFlags(&ev_fork_, cudaEventDisableTiming));
  }
}

DeviceCollectives::~DeviceCollectives() {
  ep_nccl_.reset();  // before its stream goes
  if (ep_stream_) {
    cudaStreamSynchronize(ep_stream_);
    cudaStreamDestroy(ep_stream_);
  }
  if (ev_begin_) cudaEventDestroy(ev_begin_);
  if (ev_end_) cudaEventDestroy(ev_end_);
  if (ev_fork_) cudaEventDestroy(ev_fork_);
}

int DeviceCollectives::tp_size() const { return comms_.tp_group->size(); }
int DeviceCollectives::tp_rank() const { return comms_.tp_group->rank(); }
int DeviceCollectives::ep_size() const { return comms_.ep_group->size(); }

template <class F>
void DeviceCollectives::timed(NcclComm& comm, cudaStream_t on, const char* what, F enqueue) {
  CUDA_CHECK(cudaEventRecord(ev_begin_, on));
  enqueue();
  CUDA_CHECK(cudaEventRecord(ev_end_, on));
  comm.wait(what);
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, ev_begin_, ev_end_));
  seconds_ += 1e-3 * ms;
}

void DeviceCollectives::tp_allreduce_sum(float* device, size_t n) {
  if (comms_.tp_group->size() == 1) return;
  if (ep_pending_) throw RuntimeFailure("tp all-reduce while an ep exchange is in flight");
  if (tp_nccl_) {
    timed(*tp_nccl_, stream_, "ncclAllReduce", [&] { tp_nccl_->allreduce_sum(device, n); });
    return;
  }
  Timer t(&seconds_);
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

void DeviceCollectives::ep_alltoallv(const void* send, const std::vector<size_t>& send_bytes,
                                     void* recv, const std::vector<size_t>& recv_bytes) {
  ep_exchange_begin(send, send_bytes, recv, recv_bytes);
  ep_exchange_end();
}

void DeviceCollectives::ep_exchange_begin(const void* send, const std::vector<size_t>& send_bytes,
                                          void* recv, const std::vector<size_t>& recv_bytes) {
  const int P = comms_.ep_group->size();
  if (static_cast<int>(send_bytes.size()) != P || static_cast<int>(recv_bytes.size()) != P)
    throw RuntimeFailure("ep all-to-all: one count per rank needed");
  if (ep_pending_) throw RuntimeFailure("ep all-to-all: an exchange is already in flight");
  if (!ep_nccl_) {
    host_alltoallv(send, send_bytes, recv, recv_bytes);
    return;
  }
  // The exchange waits for the stream's work so far (the send buffer), then runs on its own stream.
  CUDA_CHECK(cudaEventRecord(ev_fork_, stream_));
  CUDA_CHECK(cudaStreamWaitEvent(ep_stream_, ev_fork_, 0));
  CUDA_CHECK(cudaEventRecord(ev_begin_, ep_stream_));
  ep_nccl_->alltoallv_bytes(send, send_bytes, recv, recv_bytes);
  CUDA_CHECK(cudaEventRecord(ev_end_, ep_stream_));
  ep_pending_ = true;
}

void DeviceCollectives::ep_exchange_end() {
  if (!ep_pending_) return;
  ep_pending_ = false;
  ep_nccl_->wait("NCCL all-to-all");
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, ev_begin_, ev_end_));
  seconds_ += 1e-3 * ms;
  CUDA_CHECK(cudaStreamWaitEvent(stream_, ev_end_, 0));
}

void DeviceCollectives::host_alltoallv(const void* send, const std::vector<size_t>& send_bytes,
                                       void* recv, const std::vector<size_t>& recv_bytes) {
  const int P = comms_.ep_group->size();
  // Host staging: each block is padded to whole floats for Comm::alltoallv.
  Timer t(&seconds_);
  auto words = [](size_t bytes) { return (bytes + sizeof(float) - 1) / sizeof(float); };
  size_t send_total = 0, recv_total = 0, send_words = 0;
  for (int r = 0; r < P; ++r) {
    send_total += send_bytes[static_cast<size_t>(r)];
    recv_total += recv_bytes[static_cast<size_t>(r)];
    send_words += words(send_bytes[static_cast<size_t>(r)]);
  }
  staging_bytes_.reserve(send_total > 0 ? send_total : 1);
  if (send_total > 0)
    CUDA_CHECK(
        cudaMemcpyAsync(staging_bytes_.get(), send, send_total, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::vector<float> packed(send_words, 0.f), got;
  std::vector<size_t> send_counts(static_cast<size_t>(P)), got_counts;
  for (size_t r = 0, src = 0, dst = 0; r < static_cast<size_t>(P); ++r) {
    std::memcpy(packed.data() + dst, staging_bytes_.get() + src, send_bytes[r]);
    send_counts[r] = words(send_bytes[r]);
    src += send_bytes[r];
    dst += send_counts[r];
  }
  comms_.ep_group->alltoallv(packed, send_counts, &got, &got_counts);
  staging_bytes_.reserve(recv_total > 0 ? recv_total : 1);
  for (size_t r = 0, src = 0, dst = 0; r < static_cast<size_t>(P); ++r) {
    if (got_counts[r] != words(recv_bytes[r]))
      throw RuntimeFailure("ep all-to-all: rank " + std::to_string(r) + " sent " +
                           std::to_string(got_counts[r]) + " words, " +
                           std::to_string(words(recv_bytes[r])) + " were expected");
    std::memcpy(staging_bytes_.get() + dst, got.data() + src, recv_bytes[r]);
    src += got_counts[r];
    dst += recv_bytes[r];
  }
  if (recv_total > 0)
    CUDA_CHECK(
        cudaMemcpyAsync(recv, staging_bytes_.get(), recv_total, cudaMemcpyHostToDevice, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));  // staging_bytes_ is reused by the next call
}

}  // namespace sinkscope::cuda
