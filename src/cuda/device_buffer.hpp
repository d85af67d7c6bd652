// Owning device and pinned-host buffers (plain cudaMalloc / cudaMallocHost, no managed memory).
// Move-only; a buffer grows with reserve() and never shrinks, so a backend's scratch settles at the
// largest micro-batch it has seen. Every byte allocated is counted for the benchmark's report.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "cuda/check.hpp"

namespace sinkscope::cuda {

// Bytes currently held by DeviceBuffers of this process (weights and scratch).
inline std::atomic<uint64_t>& device_bytes_held() {
  static std::atomic<uint64_t> bytes{0};
  return bytes;
}

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { reserve(n); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), cap_(std::exchange(o.cap_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      cap_ = std::exchange(o.cap_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { release(); }

  // Ensures room for n elements; the old contents are not kept.
  void reserve(size_t n) {
    if (n <= cap_) return;
    release();
    void* p = nullptr;
    CUDA_CHECK(cudaMalloc(&p, n * sizeof(T)));
    ptr_ = static_cast<T*>(p);
    cap_ = n;
    device_bytes_held() += n * sizeof(T);
  }
  T* get() { return ptr_; }
  const T* get() const { return ptr_; }
  size_t capacity() const { return cap_; }
  size_t bytes() const { return cap_ * sizeof(T); }

 private:
  void release() {
    if (ptr_) {
      cudaFree(
          ptr_);  // no throw from destructors; a failure here shows up at the next checked call
      device_bytes_held() -= cap_ * sizeof(T);
    }
    ptr_ = nullptr;
    cap_ = 0;
  }
  T* ptr_ = nullptr;
  size_t cap_ = 0;
};

template <typename T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  PinnedBuffer(PinnedBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), cap_(std::exchange(o.cap_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      cap_ = std::exchange(o.cap_, 0);
    }
    return *this;
  }
  ~PinnedBuffer() { release(); }
  void reserve(size_t n) {
    if (n <= cap_) return;
    release();
    void* p = nullptr;
    CUDA_CHECK(cudaMallocHost(&p, n * sizeof(T)));
    ptr_ = static_cast<T*>(p);
    cap_ = n;
  }
  T* get() { return ptr_; }
  const T* get() const { return ptr_; }
  T& operator[](size_t i) { return ptr_[i]; }
  const T& operator[](size_t i) const { return ptr_[i]; }

 private:
  void release() {
    if (ptr_) cudaFreeHost(ptr_);
    ptr_ = nullptr;
    cap_ = 0;
  }
  T* ptr_ = nullptr;
  size_t cap_ = 0;
};

// bf16 as stored on the device; host code never does arithmetic on it.
using bf16_bits = uint16_t;

}  // namespace sinkscope::cuda
