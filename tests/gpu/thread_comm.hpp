// A communicator whose ranks are threads of one process: lets the GPU test run tp/ep layouts of
// the CUDA backend (all ranks on one GPU) without MPI. Every collective is an all-gather of byte
// blobs through shared slots between two barriers; sums are taken in rank order, so results are
// identical on every rank. Test code only.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"

namespace sinkscope::test {

class ThreadGroup {
 public:
  explicit ThreadGroup(int size) : size_(size), barrier_(size), slots_(static_cast<size_t>(size)) {}
  int size() const { return size_; }

  std::vector<std::string> allgather(int rank, const std::string& mine) {
    slots_[static_cast<size_t>(rank)] = mine;
    barrier_.arrive_and_wait();
    std::vector<std::string> all = slots_;
    barrier_.arrive_and_wait();
    return all;
  }
  void barrier() { barrier_.arrive_and_wait(); }

  // The sub-group of split number `epoch` with `color`, made by the first member to ask.
  std::shared_ptr<ThreadGroup> subgroup(int epoch, int color, int size) {
    std::lock_guard<std::mutex> lock(mu_);
    auto& g = splits_[{epoch, color}];
    if (!g) g = std::make_shared<ThreadGroup>(size);
    return g;
  }

 private:
  int size_;
  std::barrier<> barrier_;
  std::vector<std::string> slots_;
  std::mutex mu_;
  std::map<std::pair<int, int>, std::shared_ptr<ThreadGroup>> splits_;
};

class ThreadComm final : public Comm {
 public:
  ThreadComm(std::shared_ptr<ThreadGroup> group, int rank) : g_(std::move(group)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_->size(); }
  std::string kind() const override { return "threads"; }

  std::unique_ptr<Comm> split(int color, int key) const override {
    const int epoch = splits_++;
    std::string mine(2 * sizeof(int), '\0');
    std::memcpy(mine.data(), &color, sizeof(int));
    std::memcpy(mine.data() + sizeof(int), &key, sizeof(int));
    auto all = g_->allgather(rank_, mine);
    std::vector<std::pair<int, int>> members;  // (key, rank) of my color
    for (int r = 0; r < size(); ++r) {
      int c, k;
      std::memcpy(&c, all[static_cast<size_t>(r)].data(), sizeof(int));
      std::memcpy(&k, all[static_cast<size_t>(r)].data() + sizeof(int), sizeof(int));
      if (c == color) members.push_back({k, r});
    }
    std::sort(members.begin(), members.end());
    int new_rank = 0;
    for (size_t i = 0; i < members.size(); ++i)
      if (members[i].second == rank_) new_rank = static_cast<int>(i);
    return std::make_unique<ThreadComm>(
        g_->subgroup(epoch, color, static_cast<int>(members.size())), new_rank);
  }

  void barrier() const override { g_->barrier(); }
  void allreduce_sum(float* data, size_t n) const override {
    reduce(data, n, [](float& a, float b) { a += b; });
  }
  void allreduce_sum(double* data, size_t n) const override {
    reduce(data, n, [](double& a, double b) { a += b; });
  }
  void allreduce_max(int64_t* data, size_t n) const override {
    reduce(data, n, [](int64_t& a, int64_t b) { a = std::max(a, b); });
  }

  void alltoallv(const std::vector<float>& send, const std::vector<size_t>& send_counts,
                 std::vector<float>* recv, std::vector<size_t>* recv_counts) const override {
    const size_t P = static_cast<size_t>(size());
    if (send_counts.size() != P) throw RuntimeFailure("alltoallv: one count per rank expected");
    std::string mine(P * sizeof(size_t) + send.size() * sizeof(float), '\0');
    std::memcpy(mine.data(), send_counts.data(), P * sizeof(size_t));
    std::memcpy(mine.data() + P * sizeof(size_t), send.data(), send.size() * sizeof(float));
    auto all = g_->allgather(rank_, mine);
    recv->clear();
    recv_counts->assign(P, 0);
    for (size_t r = 0; r < P; ++r) {
      std::vector<size_t> counts(P);
      std::memcpy(counts.data(), all[r].data(), P * sizeof(size_t));
      size_t off = 0;
      for (size_t q = 0; q < static_cast<size_t>(rank_); ++q) off += counts[q];
      const float* src = reinterpret_cast<const float*>(all[r].data() + P * sizeof(size_t)) + off;
      recv->insert(recv->end(), src, src + counts[static_cast<size_t>(rank_)]);
      (*recv_counts)[r] = counts[static_cast<size_t>(rank_)];
    }
  }

  std::vector<std::string> gather_bytes(const std::string& mine, int root) const override {
    auto all = g_->allgather(rank_, mine);
    return rank_ == root ? all : std::vector<std::string>{};
  }
  std::vector<std::string> allgather_bytes(const std::string& mine) const override {
    return g_->allgather(rank_, mine);
  }
  void broadcast_bytes(std::string* data, int root) const override {
    *data = g_->allgather(rank_, *data)[static_cast<size_t>(root)];
  }
  int first_failed_rank(bool ok) const override {
    auto all = g_->allgather(rank_, ok ? "1" : "0");
    for (size_t r = 0; r < all.size(); ++r)
      if (all[r] == "0") return static_cast<int>(r);
    return -1;
  }
  [[noreturn]] void abort(int status) const override { std::_Exit(status); }

 private:
  template <typename T, typename Op>
  void reduce(T* data, size_t n, Op op) const {
    std::string mine(n * sizeof(T), '\0');
    if (n) std::memcpy(mine.data(), data, n * sizeof(T));
    auto all = g_->allgather(rank_, mine);
    for (size_t i = 0; i < n; ++i) {
      T acc;
      std::memcpy(&acc, all[0].data() + i * sizeof(T), sizeof(T));
      for (size_t r = 1; r < all.size(); ++r) {
        T v;
        std::memcpy(&v, all[r].data() + i * sizeof(T), sizeof(T));
        op(acc, v);
      }
      data[i] = acc;
    }
  }

  std::shared_ptr<ThreadGroup> g_;
  int rank_;
  mutable int splits_ = 0;
};

}  // namespace sinkscope::test
