#include "checkpoint/mxfp4.hpp"

#include <cmath>

namespace sinkscope {

float e2m1_value(uint8_t nibble) {
  static const float kMagnitude[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  const float m = kMagnitude[nibble & 7];
  return (nibble & 8) ? -m : m;
}

int64_t decode_mxfp4(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t groups,
                     float* out) {
  float table[16];
  for (int i = 0; i < 16; ++i) table[i] = e2m1_value(static_cast<uint8_t>(i));
  const int64_t n = rows * groups;
  for (int64_t g = 0; g < n; ++g)
    if (scales[g] == 255) return g;
#pragma omp parallel for schedule(static) if (n > 4096)
  for (int64_t g = 0; g < n; ++g) {
    const float s = std::ldexp(1.f, static_cast<int>(scales[g]) - 127);
    const uint8_t* b = blocks + g * 16;
    float* o = out + g * 32;
    for (int j = 0; j < 16; ++j) {
      o[2 * j] = table[b[j] & 0x0F] * s;
      o[2 * j + 1] = table[b[j] >> 4] * s;
    }
  }
  return n;
}

}  // namespace sinkscope
