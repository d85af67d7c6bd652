// Communicators (docs/parallel-layout.md): one interface, a single-process
// implementation and an MPI one (CPU buffers). No MPI types here.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sinkscope {

std::string host_name();

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string kind() const = 0;  // "single" or "mpi"

  // Sub-communicator of the ranks with the same color, ordered by key.
  virtual std::unique_ptr<Comm> split(int color, int key) const = 0;

  virtual void barrier() const = 0;
  // In place, element-wise sum over ranks; the result is identical on every rank.
  virtual void allreduce_sum(float* data, size_t n) const = 0;
  virtual void allreduce_sum(double* data, size_t n) const = 0;
  virtual void allreduce_max(int64_t* data, size_t n) const = 0;
  // Every rank sends send_counts[r] floats to rank r (blocks in rank order); returns what arrives,
  // with recv_counts[r] floats from rank r. Counts above INT_MAX are chunked.
  virtual void alltoallv(const std::vector<float>& send, const std::vector<size_t>& send_counts,
                         std::vector<float>* recv, std::vector<size_t>* recv_counts) const = 0;
  // Byte blobs (Boost.Serialization archives): gathered to root in rank order / to everyone.
  virtual std::vector<std::string> gather_bytes(const std::string& mine, int root) const = 0;
  virtual std::vector<std::string> allgather_bytes(const std::string& mine) const = 0;
  virtual void broadcast_bytes(std::string* data, int root) const = 0;

  // Error agreement: every rank says whether its step succeeded; returns the lowest failed rank,
  // or -1 when all succeeded. Used after input validation so bad input exits 1 on every rank.
  virtual int first_failed_rank(bool ok) const = 0;
  // Ends every rank of the job now (MPI_Abort); never returns.
  [[noreturn]] virtual void abort(int status) const = 0;

  // Bounds every wait of this communicator and of those split from it later (--rank-timeout): a
  // collective or receive still incomplete after `seconds` means a rank stopped or hangs; the
  // waiting rank prints one line naming the wait and ends the job (MPI_Abort, status 2).
  // 0 waits forever. Communicators without waits (single process) ignore it.
  virtual void set_wait_limit(double seconds) { (void)seconds; }

  // A string that is equal on exactly the ranks of one node (include/sinkscope/placement.hpp).
  // Every rank calls it together. MPI: the lowest world rank of the shared-memory split
  // (MPI_COMM_TYPE_SHARED) with its host name; otherwise the host name.
  virtual std::string node_key() const { return host_name(); }
};

std::unique_ptr<Comm> make_single_comm();

// World communicator of an MPI job. Initialises MPI on first call (thread level FUNNELED) and
// finalises at exit. Throws RuntimeFailure when sinkscope was built without MPI.
std::unique_ptr<Comm> make_mpi_world(int* argc, char*** argv);
// True when this process was started by mpirun/srun (launcher environment variables present).
bool launched_under_mpi();
// Calls MPI_Finalize when MPI was initialised (idempotent).
void finalize_mpi();

}  // namespace sinkscope
