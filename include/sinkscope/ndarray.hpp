// A small owning host array with a shape and named axes: what the analysis file stores.
#pragma once

#include <cstddef>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace sinkscope {

template <typename T>
struct NdArray {
  std::vector<size_t> shape;  // empty shape = scalar with one element
  std::string dims;           // comma-separated axis names, e.g. "layer,head"
  std::vector<T> data;        // C order

  NdArray() = default;
  NdArray(std::vector<size_t> shape_, std::string dims_, T fill = T{})
      : shape(std::move(shape_)), dims(std::move(dims_)), data(count(shape), fill) {}

  static size_t count(const std::vector<size_t>& s) {
    return std::accumulate(s.begin(), s.end(), size_t{1}, [](size_t a, size_t b) { return a * b; });
  }
  size_t size() const { return data.size(); }
  bool empty() const { return data.empty(); }
  T* ptr() { return data.data(); }
  const T* ptr() const { return data.data(); }

  // Row-major indexing helpers for the common ranks.
  T& at(size_t i) { return data[i]; }
  T& at(size_t i, size_t j) { return data[i * shape[1] + j]; }
  T& at(size_t i, size_t j, size_t k) { return data[(i * shape[1] + j) * shape[2] + k]; }
  T& at(size_t i, size_t j, size_t k, size_t l) {
    return data[((i * shape[1] + j) * shape[2] + k) * shape[3] + l];
  }
  const T& at(size_t i) const { return data[i]; }
  const T& at(size_t i, size_t j) const { return data[i * shape[1] + j]; }
  const T& at(size_t i, size_t j, size_t k) const {
    return data[(i * shape[1] + j) * shape[2] + k];
  }
  const T& at(size_t i, size_t j, size_t k, size_t l) const {
    return data[((i * shape[1] + j) * shape[2] + k) * shape[3] + l];
  }
};

using FloatArray = NdArray<float>;
using IntArray = NdArray<int32_t>;

}  // namespace sinkscope
