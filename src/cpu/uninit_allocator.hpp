// Host memory for buffers that are written in full before they are read (the CPU backend's fp32
// weights): std::vector with an allocator that leaves new elements uninitialised, so that a resize
// does not zero memory that the conversion overwrites anyway, and whose large blocks are 2 MiB
// aligned and advised as transparent huge pages, so that the threads that write them first (the
// converting threads, each its own chunks) fault them in 2 MiB at a time instead of 4 KiB.
#pragma once

#include <sys/mman.h>

#include <atomic>
#include <cstddef>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace sinkscope {

// Blocks of at least this many bytes are aligned to kHugePageBytes and advised MADV_HUGEPAGE.
inline constexpr size_t kHugeAllocMin = size_t{4} << 20;
inline constexpr size_t kHugePageBytes = size_t{2} << 20;
// The kernel keeps the huge-page advice of a range in a mapping (VMA) of its own, so each advised
// block inside the heap can add two mappings, and a process may hold vm.max_map_count of them
// (65530 by default; past it even malloc fails). The first kMaxAdvisedBlocks blocks of the process
// are advised (at most about a quarter of that default); later ones stay on 4 KiB pages. Blocks
// freed and allocated again mostly land in ranges advised already, which adds no mapping.
inline constexpr int kMaxAdvisedBlocks = 8192;

// Advises [p, p + bytes) MADV_HUGEPAGE while fewer than kMaxAdvisedBlocks blocks have been.
inline void advise_huge_pages(void* p, size_t bytes) noexcept {
  static std::atomic<int> advised{0};
  if (advised.load(std::memory_order_relaxed) >= kMaxAdvisedBlocks) return;
  advised.fetch_add(1, std::memory_order_relaxed);
  ::madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
}

// Default-initialises in place of value-initialising: `resize(n)` and `vector(n)` leave trivial
// elements (float, int) with indeterminate values. Construction with arguments (`vector(n, 0.f)`,
// `assign`, `push_back`) is as usual.
template <class T>
class UninitAllocator {
 public:
  using value_type = T;

  UninitAllocator() noexcept = default;
  template <class U>
  UninitAllocator(const UninitAllocator<U>&) noexcept {}

  T* allocate(size_t n) {
    if (n > max_size()) throw std::bad_array_new_length();
    const size_t bytes = n * sizeof(T);
    if (bytes < kHugeAllocMin) return static_cast<T*>(::operator new(bytes, align()));
    void* p = ::operator new (bytes, std::align_val_t{kHugePageBytes});
    advise_huge_pages(p, bytes);
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) noexcept {
    const size_t bytes = n * sizeof(T);
    if (bytes < kHugeAllocMin)
      ::operator delete(p, bytes, align());
    else
      ::operator delete (p, bytes, std::align_val_t{kHugePageBytes});
  }
  static constexpr size_t max_size() noexcept { return size_t(-1) / sizeof(T); }

  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;  // default-initialisation: no zeroing
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }

  friend bool operator==(const UninitAllocator&, const UninitAllocator&) noexcept { return true; }

 private:
  static constexpr std::align_val_t align() noexcept {
    return std::align_val_t{alignof(T) > __STDCPP_DEFAULT_NEW_ALIGNMENT__
                                ? alignof(T)
                                : __STDCPP_DEFAULT_NEW_ALIGNMENT__};
  }
};

// A vector whose resize does not initialise its trivial elements (see UninitAllocator).
template <class T>
using UninitVector = std::vector<T, UninitAllocator<T>>;

}  // namespace sinkscope
