// Reading the golden fixtures' expected.safetensors and comparing with tolerances, shared by the
// Qwen3-MoE goldens (test_golden.cpp) and the family goldens (test_families.cpp).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "sinkscope/checkpoint.hpp"

namespace sinkscope::golden {

// expected.safetensors: every tensor as doubles, with its shape (F32 and I32 only).
struct Expected {
  std::map<std::string, std::vector<double>> values;
  std::map<std::string, std::vector<int64_t>> shapes;
};

inline Expected load_expected(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  const auto infos = parse_safetensors_header(bytes.data() + 8, n, bytes.size() - 8 - n, path);
  Expected e;
  for (const auto& t : infos) {
    const char* p = bytes.data() + 8 + n + t.begin;
    const size_t count = (t.end - t.begin) / t.elem_size;
    std::vector<double> v(count);
    for (size_t i = 0; i < count; ++i) {
      if (t.dtype_str == "F32") {
        float f;
        std::memcpy(&f, p + 4 * i, 4);
        v[i] = f;
      } else if (t.dtype_str == "I32") {
        int32_t x;
        std::memcpy(&x, p + 4 * i, 4);
        v[i] = x;
      } else {
        ADD_FAILURE() << path << ": unexpected dtype " << t.dtype_str << " of " << t.name;
      }
    }
    e.values[t.name] = std::move(v);
    e.shapes[t.name] = t.shape;
  }
  return e;
}

// |got - want| <= abs_tol + rel_tol |want| + scale_tol max|want| everywhere (NaN where want is).
inline void expect_close(const std::string& name, const std::vector<float>& got,
                         const std::vector<double>& want, double abs_tol, double rel_tol,
                         double scale_tol) {
  ASSERT_EQ(got.size(), want.size()) << name;
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(want[i])) {
      EXPECT_TRUE(std::isnan(got[i])) << name << "[" << i << "]";
      continue;
    }
    const double err = std::fabs(got[i] - want[i]);
    const double allowed = abs_tol + rel_tol * std::fabs(want[i]) + scale_tol * scale;
    if (std::isnan(got[i])) {
      worst = INFINITY, at = i;
      break;
    }
    if (err / allowed > worst) worst = err / allowed, at = i;
  }
  EXPECT_LE(worst, 1.0) << name << ": worst at [" << at << "]: got " << got[at] << ", want "
                        << want[at] << " (error / allowed = " << worst << ")";
}

}  // namespace sinkscope::golden
