// Owning device and pinned-host buffers (plain cudaMalloc / cudaMallocHost, no managed memory).
// Move-only; a buffer grows with reserve() and never shrinks, so a backend's scratch settles at the
// largest micro-batch it has seen. Every byte allocated is counted for the benchmark's report.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cuda/check.hpp"

namespace sinkscope::cuda {

// Bytes currently held by DeviceBuffers of this process (weights and scratch).
inline std::atomic<uint64_t>& device_bytes_held() {
  static std::atomic<uint64_t> bytes{0};
  return bytes;
}

// Where a buffer's memory comes from: device memory (counted in device_bytes_held) or pinned host
// memory.
struct DeviceMemory {
  static void* allocate(size_t bytes) {
    void* p = nullptr;
    CUDA_CHECK(cudaMalloc(&p, bytes));
    device_bytes_held() += bytes;
    return p;
  }
  // No throw from destructors; a failure here shows up at the next checked call.
  static void free(void* p, size_t bytes) {
    cudaFree(p);
    device_bytes_held() -= bytes;
  }
};
struct PinnedMemory {
  static void* allocate(size_t bytes) {
    void* p = nullptr;
    CUDA_CHECK(cudaMallocHost(&p, bytes));
    return p;
  }
  static void free(void* p, size_t) { cudaFreeHost(p); }
};

template <typename T, class Memory>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) { reserve(n); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), cap_(std::exchange(o.cap_, 0)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      cap_ = std::exchange(o.cap_, 0);
    }
    return *this;
  }
  ~Buffer() { release(); }

  // Ensures room for n elements; the old contents are not kept.
  void reserve(size_t n) {
    if (n <= cap_) return;
    release();
    ptr_ = static_cast<T*>(Memory::allocate(n * sizeof(T)));
    cap_ = n;
  }
  T* get() { return ptr_; }
  const T* get() const { return ptr_; }
  size_t capacity() const { return cap_; }
  size_t bytes() const { return cap_ * sizeof(T); }
  // Element access on the host: pinned buffers only.
  template <class M = Memory, class = std::enable_if_t<std::is_same_v<M, PinnedMemory>>>
  T& operator[](size_t i) {
    return ptr_[i];
  }
  template <class M = Memory, class = std::enable_if_t<std::is_same_v<M, PinnedMemory>>>
  const T& operator[](size_t i) const {
    return ptr_[i];
  }

 private:
  void release() {
    if (ptr_) Memory::free(ptr_, cap_ * sizeof(T));
    ptr_ = nullptr;
    cap_ = 0;
  }
  T* ptr_ = nullptr;
  size_t cap_ = 0;
};

template <typename T>
using DeviceBuffer = Buffer<T, DeviceMemory>;
template <typename T>
using PinnedBuffer = Buffer<T, PinnedMemory>;

// bf16 as stored on the device; host code never does arithmetic on it.
using bf16_bits = uint16_t;

}  // namespace sinkscope::cuda
