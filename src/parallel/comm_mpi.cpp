// The MPI communicator (CPU buffers). MPI stays behind this file: no MPI type leaks into headers.
#include "sinkscope/build_config.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"

#if SINKSCOPE_HAVE_MPI
#include <mpi.h>

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <iostream>
#include <thread>

namespace sinkscope {
namespace {

// One check macro for every MPI call: names the call, file:line, rank and host.
[[noreturn]] void mpi_fail(int code, const char* call, const char* file, int line) {
  char msg[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  MPI_Error_string(code, msg, &len);
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  throw RuntimeFailure(std::string(call) + " failed at " + file + ":" + std::to_string(line) +
                       " on rank " + std::to_string(rank) + " (" + host_name() + "): " + msg);
}
#define SINKSCOPE_MPI_CHECK(call)                                                                 \
  do {                                                                                            \
    const int sinkscope_mpi_rc_ = (call);                                                         \
    if (sinkscope_mpi_rc_ != MPI_SUCCESS) mpi_fail(sinkscope_mpi_rc_, #call, __FILE__, __LINE__); \
  } while (0)

// Counts above INT_MAX travel in chunks of this many elements.
constexpr size_t kChunk = size_t{1} << 30;

// A wait that outlives --rank-timeout: some rank stopped (SIGSTOP, a hung filesystem, a node
// that froze) or hangs. Nothing can complete any more, so this rank reports in one line and ends
// the job; a rank that waits less than the whole job time would otherwise wait forever.
[[noreturn]] void wait_timed_out(const std::string& what, double seconds) {
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::cerr << "sinkscope: failure on rank " << rank << " (" << host_name() << "): " << what
            << " did not complete within " << seconds
            << " s (--rank-timeout): a rank stopped or hangs; ending the job" << std::endl;
  MPI_Abort(MPI_COMM_WORLD, 2);
  std::_Exit(2);
}

class MpiComm final : public Comm {
 public:
  MpiComm(MPI_Comm c, bool owned, double wait_limit = 0)
      : comm_(c), owned_(owned), wait_limit_(wait_limit) {
    SINKSCOPE_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    SINKSCOPE_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;
  MpiComm(MpiComm&& o) noexcept
      : comm_(o.comm_),
        owned_(o.owned_),
        rank_(o.rank_),
        size_(o.size_),
        wait_limit_(o.wait_limit_) {
    o.owned_ = false;
  }
  ~MpiComm() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owned_ && !finalized) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string kind() const override { return "mpi"; }
  void set_wait_limit(double seconds) override { wait_limit_ = seconds; }

  std::unique_ptr<Comm> split(int color, int key) const override {
    // MPI has no nonblocking split; it runs once per analysis, right after the ranks agreed.
    MPI_Comm out;
    SINKSCOPE_MPI_CHECK(MPI_Comm_split(comm_, color, key, &out));
    return std::make_unique<MpiComm>(out, true, wait_limit_);
  }
  std::string node_key() const override {
    // The ranks that can share memory are one node, as the launcher placed them (PMIx locality
    // under srun or mpirun); the key is that group's lowest world rank, with its host name.
    MPI_Comm node;
    SINKSCOPE_MPI_CHECK(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node));
    int world = 0, lowest = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &world);
    MPI_Request request;
    const int rc = MPI_Iallreduce(&world, &lowest, 1, MPI_INT, MPI_MIN, node, &request);
    if (rc == MPI_SUCCESS) wait(&request, 1, "MPI_Iallreduce (node discovery)");
    MPI_Comm_free(&node);
    SINKSCOPE_MPI_CHECK(rc);
    return std::to_string(lowest) + "@" + host_name();
  }
  void barrier() const override {
    MPI_Request request;
    SINKSCOPE_MPI_CHECK(MPI_Ibarrier(comm_, &request));
    wait(&request, 1, "MPI_Ibarrier");
  }

  void allreduce_sum(float* data, size_t n) const override {
    allreduce(data, n, MPI_FLOAT, MPI_SUM);
  }
  void allreduce_sum(double* data, size_t n) const override {
    allreduce(data, n, MPI_DOUBLE, MPI_SUM);
  }
  void allreduce_max(int64_t* data, size_t n) const override {
    allreduce(data, n, MPI_INT64_T, MPI_MAX);
  }

  void alltoallv(const std::vector<float>& send, const std::vector<size_t>& send_counts,
                 std::vector<float>* recv, std::vector<size_t>* recv_counts) const override {
    if (static_cast<int>(send_counts.size()) != size_)
      throw RuntimeFailure("alltoallv: one count per rank needed");
    std::vector<uint64_t> sc(send_counts.begin(), send_counts.end()),
        rc(static_cast<size_t>(size_));
    MPI_Request counts;
    SINKSCOPE_MPI_CHECK(
        MPI_Ialltoall(sc.data(), 1, MPI_UINT64_T, rc.data(), 1, MPI_UINT64_T, comm_, &counts));
    wait(&counts, 1, "MPI_Ialltoall (alltoallv counts)");
    recv_counts->assign(rc.begin(), rc.end());
    size_t total = 0;
    for (auto c : rc) total += c;
    recv->assign(total, 0.f);
    // Point-to-point in chunks, so no count passes INT_MAX.
    std::vector<MPI_Request> reqs;
    size_t soff = 0, roff = 0;
    for (int r = 0; r < size_; ++r) {
      for (size_t done = 0; done < rc[r]; done += kChunk) {
        const int n = static_cast<int>(std::min(kChunk, rc[r] - done));
        reqs.emplace_back();
        SINKSCOPE_MPI_CHECK(
            MPI_Irecv(recv->data() + roff + done, n, MPI_FLOAT, r, 7, comm_, &reqs.back()));
      }
      roff += rc[r];
    }
    for (int r = 0; r < size_; ++r) {
      for (size_t done = 0; done < sc[r]; done += kChunk) {
        const int n = static_cast<int>(std::min(kChunk, sc[r] - done));
        reqs.emplace_back();
        SINKSCOPE_MPI_CHECK(
            MPI_Isend(send.data() + soff + done, n, MPI_FLOAT, r, 7, comm_, &reqs.back()));
      }
      soff += sc[r];
    }
    wait(reqs.data(), static_cast<int>(reqs.size()), "alltoallv (MPI_Isend/MPI_Irecv)");
  }

  std::vector<std::string> gather_bytes(const std::string& mine, int root) const override {
    std::vector<std::string> out;
    if (rank_ == root) {
      out.resize(static_cast<size_t>(size_));
      for (int r = 0; r < size_; ++r) out[r] = r == root ? mine : recv_bytes(r);
    } else {
      send_bytes(mine, root);
    }
    return out;
  }
  std::vector<std::string> allgather_bytes(const std::string& mine) const override {
    std::vector<std::string> all = gather_bytes(mine, 0);
    for (int r = 0; r < size_; ++r) {
      std::string s = rank_ == 0 ? all[r] : std::string();
      broadcast_bytes(&s, 0);
      if (rank_ != 0) all.push_back(std::move(s));
    }
    return all;
  }
  void broadcast_bytes(std::string* data, int root) const override {
    uint64_t n = data->size();
    MPI_Request request;
    SINKSCOPE_MPI_CHECK(MPI_Ibcast(&n, 1, MPI_UINT64_T, root, comm_, &request));
    wait(&request, 1, "MPI_Ibcast from rank " + std::to_string(world_rank(root)));
    data->resize(n);
    for (size_t done = 0; done < n; done += kChunk) {
      const int c = static_cast<int>(std::min<uint64_t>(kChunk, n - done));
      SINKSCOPE_MPI_CHECK(MPI_Ibcast(data->data() + done, c, MPI_BYTE, root, comm_, &request));
      wait(&request, 1, "MPI_Ibcast from rank " + std::to_string(world_rank(root)));
    }
  }
  int first_failed_rank(bool ok) const override {
    int mine = ok ? INT_MAX : rank_, first = INT_MAX;
    MPI_Request request;
    SINKSCOPE_MPI_CHECK(MPI_Iallreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm_, &request));
    wait(&request, 1, "MPI_Iallreduce (error agreement)");
    return first == INT_MAX ? -1 : first;
  }
  [[noreturn]] void abort(int status) const override {
    MPI_Abort(MPI_COMM_WORLD, status);
    std::_Exit(status);
  }

 private:
  // Completes `requests`. Without a limit: MPI_Waitall. With one: MPI_Testall polled until the
  // deadline; the first polls spin (collectives inside the forward pass finish in microseconds),
  // later ones yield the core and then sleep, so a long wait does not burn a CPU that another
  // rank of an oversubscribed node needs.
  void wait(MPI_Request* requests, int count, const std::string& what) const {
    if (wait_limit_ <= 0) {
      SINKSCOPE_MPI_CHECK(MPI_Waitall(count, requests, MPI_STATUSES_IGNORE));
      return;
    }
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    // World rank r reports r seconds (at most 10) later than rank 0: the first rank to give up
    // ends the job, so one line reports it, not one per waiting rank.
    int world = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &world);
    const auto deadline =
        start + std::chrono::duration_cast<Clock::duration>(
                    std::chrono::duration<double>(wait_limit_ + std::min(world, 10)));
    for (uint64_t poll = 0;; ++poll) {
      int done = 0;
      SINKSCOPE_MPI_CHECK(MPI_Testall(count, requests, &done, MPI_STATUSES_IGNORE));
      if (done) return;
      if (poll < 64) continue;
      const auto now = Clock::now();
      if (now > deadline) wait_timed_out(what, wait_limit_);
      if (now - start < std::chrono::milliseconds(10))
        sched_yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
  int world_rank(int rank) const {
    if (comm_ == MPI_COMM_WORLD) return rank;
    MPI_Group mine, world;
    int translated = MPI_UNDEFINED;
    if (MPI_Comm_group(comm_, &mine) == MPI_SUCCESS &&
        MPI_Comm_group(MPI_COMM_WORLD, &world) == MPI_SUCCESS) {
      MPI_Group_translate_ranks(mine, 1, &rank, world, &translated);
      MPI_Group_free(&mine);
      MPI_Group_free(&world);
    }
    return translated == MPI_UNDEFINED ? rank : translated;
  }
  template <typename T>
  void allreduce(T* data, size_t n, MPI_Datatype type, MPI_Op op) const {
    for (size_t done = 0; done < n; done += kChunk) {
      const int c = static_cast<int>(std::min(kChunk, n - done));
      MPI_Request request;
      SINKSCOPE_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data + done, c, type, op, comm_, &request));
      wait(&request, 1, "MPI_Iallreduce");
    }
  }
  void send_bytes(const std::string& s, int to) const {
    uint64_t n = s.size();
    const std::string what = "MPI_Isend to rank " + std::to_string(world_rank(to));
    MPI_Request request;
    SINKSCOPE_MPI_CHECK(MPI_Isend(&n, 1, MPI_UINT64_T, to, 11, comm_, &request));
    wait(&request, 1, what);
    for (size_t done = 0; done < n; done += kChunk) {
      const int c = static_cast<int>(std::min<uint64_t>(kChunk, n - done));
      SINKSCOPE_MPI_CHECK(MPI_Isend(s.data() + done, c, MPI_BYTE, to, 12, comm_, &request));
      wait(&request, 1, what);
    }
  }
  std::string recv_bytes(int from) const {
    // A receive knows its peer: the message names the rank that went silent.
    const std::string what = "MPI_Irecv from rank " + std::to_string(world_rank(from));
    uint64_t n = 0;
    MPI_Request request;
    SINKSCOPE_MPI_CHECK(MPI_Irecv(&n, 1, MPI_UINT64_T, from, 11, comm_, &request));
    wait(&request, 1, what);
    std::string s(n, '\0');
    for (size_t done = 0; done < n; done += kChunk) {
      const int c = static_cast<int>(std::min<uint64_t>(kChunk, n - done));
      SINKSCOPE_MPI_CHECK(MPI_Irecv(s.data() + done, c, MPI_BYTE, from, 12, comm_, &request));
      wait(&request, 1, what);
    }
    return s;
  }

  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0, size_ = 1;
  double wait_limit_ = 0;  // seconds; 0 = wait forever
};

}  // namespace

std::unique_ptr<Comm> make_mpi_world(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    SINKSCOPE_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
    // Errors come back as codes so they become exceptions with context instead of aborting bare.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  return std::make_unique<MpiComm>(MPI_COMM_WORLD, false);
}

void finalize_mpi() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Finalize();
}

}  // namespace sinkscope

#else  // built without MPI

namespace sinkscope {
std::unique_ptr<Comm> make_mpi_world(int*, char***) {
  throw RuntimeFailure("this sinkscope was built without MPI (configure with -DSINKSCOPE_MPI=ON)");
}
void finalize_mpi() {}
}  // namespace sinkscope

#endif
